"""The chest CT phantom of a LIDC scan (medrobust.data.chest_phantom), on the session's mini annotation DB (real rows
of scans 1-30 and 58, no mocks): where the findings land, what their boxes cover, and the phantom's tissues."""

from __future__ import annotations

import time

import numpy as np
import pytest

from medrobust.data.chest_phantom import (
    NATIVE_SIZE,
    chest_anatomy,
    finding_masks,
    lung_depth_at,
    render_slice,
    render_volume,
)
from medrobust.data.luna_targets import LunaSelection, luna_findings


@pytest.fixture(scope="module")
def selection(lidc_mini_db) -> LunaSelection:
    return luna_findings(lidc_mini_db)


@pytest.fixture(scope="module")
def centre_slices(selection, lidc_mini_db) -> dict[str, object]:
    """Every finding's slice through its centre, rendered once at 128 x 128: finding id -> (finding, sample)."""
    out = {}
    for scan in selection.scans:
        for f in scan.findings:
            out[f.nodule_id] = (f, render_slice(scan, _centre_slice(f), 128, seed=0, db_path=lidc_mini_db))
    return out


def _centre_slice(finding) -> int:
    return int(round(finding.centre_voxel[2]))


def _scan_of(selection, finding):
    return next(s for s in selection.scans if s.scan_id == finding.scan_id)


def _box_of(sample, finding_id: str) -> np.ndarray:
    assert finding_id in sample.finding_ids, f"{finding_id} not boxed in {sample.finding_ids}"
    return sample.boxes[sample.finding_ids.index(finding_id)]


# ----------------------------------------------------------------------------- boxes
def test_target_boxes_cover_bright_pixels(selection, centre_slices):
    """Inside a target's box (on its central slice) the mean HU stands clearly above the lung around the box."""
    targets = selection.targets
    assert len(targets) >= 20
    contrasts = []
    for f in targets:
        _, sample = centre_slices[f.nodule_id]
        r0, c0, r1, c1 = _box_of(sample, f.nodule_id).astype(int)
        image, lung = sample.image[0], sample.lung_mask
        inside = image[r0:r1, c0:c1].mean()
        ring = np.zeros_like(lung)
        ring[max(r0 - 3, 0):r1 + 3, max(c0 - 3, 0):c1 + 3] = True
        ring[r0:r1, c0:c1] = False
        around = np.median(image[ring & lung])
        contrasts.append(inside - around)
    contrasts = np.array(contrasts)
    print(f"\ntarget box contrast over the lung around it (HU): min {contrasts.min():.0f}, "
          f"median {np.median(contrasts):.0f} ({len(contrasts)} targets)")
    assert contrasts.min() > 100


def test_boxes_lie_in_the_image(selection, centre_slices, lidc_mini_db):
    """Every box is non-empty and within the image, in 2-D and 3-D, and labels / targets / ids line up with it."""
    samples = [s for _, s in centre_slices.values()]
    scan = max(selection.scans, key=lambda s: len(s.findings))
    samples.append(render_volume(scan, scan.slice_z.size // 2, 48, db_path=lidc_mini_db))
    for sample in samples:
        spatial = np.array(sample.image.shape[1:])
        d = spatial.size
        assert sample.boxes.dtype == np.float32 and sample.boxes.shape == (len(sample.finding_ids), 2 * d)
        assert sample.labels.dtype == np.int64 and np.all(sample.labels == 0)
        assert sample.is_target.dtype == bool and sample.is_target.shape == sample.labels.shape
        lo, hi = sample.boxes[:, :d], sample.boxes[:, d:]
        assert np.all(lo >= 0) and np.all(hi <= spatial) and np.all(hi > lo)


def test_centre_slice_has_the_target_and_a_far_slice_has_nothing(selection, centre_slices, lidc_mini_db):
    """A target is boxed on the slice through its centre (with its target flag); a slice far from every finding has
    no box."""
    for f in selection.targets:
        _, sample = centre_slices[f.nodule_id]
        assert sample.is_target[sample.finding_ids.index(f.nodule_id)]
    checked = 0
    for scan in selection.scans:
        if not scan.findings:
            continue
        used = np.zeros(scan.slice_z.size, bool)
        for f in scan.findings:
            used[max(f.box_min[2] - 5, 0):f.box_max[2] + 6] = True
        free = np.flatnonzero(~used)
        if free.size:
            sample = render_slice(scan, int(free[free.size // 2]), 128, db_path=lidc_mini_db)
            assert sample.boxes.shape == (0, 4) and sample.finding_ids == []
            checked += 1
    assert checked >= 5


def test_largest_slice_boxes_each_finding(selection, lidc_mini_db):
    """Each finding is boxed on its consensus' largest slice, which lies near its centre (within a slice, or a
    quarter of a long lesion's extent)."""
    for scan in selection.scans[:8]:
        for fm in finding_masks(scan, lidc_mini_db):
            assert abs(fm.largest_slice - fm.finding.centre_voxel[2]) <= max(1.5, fm.mask.shape[0] / 4)
            sample = render_slice(scan, fm.largest_slice, 64, db_path=lidc_mini_db)
            assert fm.finding.nodule_id in sample.finding_ids


def test_box_centre_is_the_native_centre_scaled(selection, centre_slices):
    """On the central slice a finding's box centre is its native centre times size / 512, within about a pixel."""
    errors = []
    for f, sample in centre_slices.values():
        box = _box_of(sample, f.nodule_id)
        centre = (box[:2] + box[2:]) / 2
        expected = (np.array(f.centre_voxel[:2]) + 0.5) * 128 / NATIVE_SIZE
        errors.append(np.abs(centre - expected).max())
    errors = np.array(errors)
    print(f"\nbox centre vs scaled native centre (px): median {np.median(errors):.2f}, max {errors.max():.2f}")
    assert errors.max() <= 1.25


# ----------------------------------------------------------------------------- anatomy
def test_every_finding_lies_in_lung(selection, centre_slices):
    """Each finding's centre pixel is lung in the rendered slice (the lungs bulge where needed); the fraction the
    unfitted lung outlines would hold is printed."""
    in_rendered = []
    for f, sample in centre_slices.values():
        row, col = ((np.array(f.centre_voxel[:2]) + 0.5) * 128 / NATIVE_SIZE).astype(int)
        in_rendered.append(bool(sample.lung_mask[row, col]))
    unfitted = [lung_depth_at(chest_anatomy(s, 0, fit_findings=False), f) > 0
                for s in selection.scans for f in s.findings]
    print(f"\nfindings in lung: rendered {np.mean(in_rendered):.3f}, unfitted outline {np.mean(unfitted):.3f} "
          f"({len(in_rendered)} findings)")
    assert all(in_rendered)


def test_lungs_are_lung_valued_and_outside_is_air(centre_slices):
    """Median lung HU is -850 +- 150; the image corners (outside the body) are air; the body has soft tissue."""
    for f, sample in list(centre_slices.values())[::4]:
        image = sample.image[0]
        assert abs(np.median(image[sample.lung_mask]) + 850) < 150
        corners = np.concatenate([image[:8, :8].ravel(), image[:8, -8:].ravel(), image[-8:, :8].ravel()])
        assert abs(np.median(corners) + 1000) < 50
        assert np.sum((image > -150) & (image < 150)) > 0.05 * image.size  # fat / soft tissue of the body
        assert sample.image.dtype == np.float32 and sample.image.shape == (1, 128, 128)


def test_lung_shape_depends_on_scan_and_seed_only(selection):
    """The anatomy is drawn per (seed, scan): same arguments, same lungs; another seed or scan, other lungs."""
    a, b = selection.scans[:2]
    assert chest_anatomy(a, 0) == chest_anatomy(a, 0)
    assert chest_anatomy(a, 0).lungs != chest_anatomy(a, 1).lungs
    assert chest_anatomy(a, 0).lungs != chest_anatomy(b, 0).lungs


# ----------------------------------------------------------------------------- determinism, 3-D, inputs, speed
def test_deterministic_and_seed_sensitive(selection, lidc_mini_db):
    f = selection.targets[0]
    scan, k = _scan_of(selection, f), _centre_slice(f)
    one, two = (render_slice(scan, k, 96, seed=3, db_path=lidc_mini_db) for _ in range(2))
    other = render_slice(scan, k, 96, seed=4, db_path=lidc_mini_db)
    np.testing.assert_array_equal(one.image, two.image)
    np.testing.assert_array_equal(one.boxes, two.boxes)
    assert np.abs(one.image - other.image).mean() > 5
    np.testing.assert_array_equal(one.boxes, other.boxes)  # the readers' outlines do not depend on the seed
    vol = [render_volume(scan, k, 32, seed=s, db_path=lidc_mini_db).image for s in (3, 3, 4)]
    np.testing.assert_array_equal(vol[0], vol[1])
    assert np.abs(vol[0] - vol[2]).mean() > 5


def test_volume_shapes_and_boxes(selection, lidc_mini_db):
    """A 64^3 volume about a target's centre slice holds that target at the centre slice (z) and at its scaled
    in-plane centre; ``depth_mm`` sets the slice spacing; boxes agree with the 2-D ones in-plane."""
    f = max(selection.targets, key=lambda t: t.diameter_mm)
    scan, k = _scan_of(selection, f), _centre_slice(f)
    vol = render_volume(scan, k, 64, db_path=lidc_mini_db)
    px = NATIVE_SIZE / 64 * scan.pixel_spacing_mm
    assert vol.image.shape == (1, 64, 64, 64) and vol.image.dtype == np.float32
    assert vol.spacing_mm == pytest.approx((px, px, px)) and vol.lung_mask.shape == (64, 64, 64)
    box = _box_of(vol, f.nodule_id)
    centre = (box[:3] + box[3:]) / 2
    z_offset = (f.centre_xyz_mm[2] - scan.slice_z[k]) / px
    assert abs(centre[0] - (32 + 0.5 + z_offset)) <= 1.0
    np.testing.assert_allclose(centre[1:], (np.array(f.centre_voxel[:2]) + 0.5) * 64 / NATIVE_SIZE, atol=1.25)
    z0, r0, c0, z1, r1, c1 = box.astype(int)
    lung_hu = np.median(vol.image[0][vol.lung_mask])
    assert vol.image[0, z0:z1, r0:r1, c0:c1].mean() > lung_hu + 100  # the lesion, not the lung, fills its box
    thin = render_volume(scan, k, 64, depth_mm=64.0, db_path=lidc_mini_db)
    assert thin.spacing_mm[0] == pytest.approx(1.0)
    thin_box = _box_of(thin, f.nodule_id)
    assert thin_box[3] - thin_box[0] > box[3] - box[0]  # 1 mm slices: the lesion spans more of them
    flat = render_slice(scan, k, 64, db_path=lidc_mini_db)
    np.testing.assert_allclose(_box_of(flat, f.nodule_id), thin_box[[1, 2, 4, 5]], atol=1)
    # every finding the volume's z-range overlaps is boxed
    z_lo = scan.slice_z[k] - 32.5 * px
    z_hi = z_lo + 64 * px
    for g in scan.findings:
        if z_lo < g.centre_xyz_mm[2] < z_hi:
            assert g.nodule_id in vol.finding_ids


def test_a_window_crops_the_whole_field_of_view_at_the_same_voxel_size(selection, lidc_mini_db):
    """``field_mm`` = half the FOV over 32 voxels is the middle of the whole FOV over 64 voxels (same voxels): every
    finding wholly inside keeps its box, moved by 16 voxels along each axis; moving the window's centre moves the
    boxes the other way, by the native shift over the voxel size."""
    f = max(selection.targets, key=lambda t: t.diameter_mm)
    scan, k = _scan_of(selection, f), _centre_slice(f)
    fov_mm = NATIVE_SIZE * scan.pixel_spacing_mm
    whole = render_volume(scan, k, 64, db_path=lidc_mini_db)
    middle = render_volume(scan, k, 32, field_mm=fov_mm / 2, centre_rc=(256.0, 256.0), db_path=lidc_mini_db)
    assert middle.spacing_mm == pytest.approx(whole.spacing_mm)
    inside = [i for i, box in enumerate(whole.boxes) if (box[:3] >= 16).all() and (box[3:] <= 48).all()]
    assert inside, "no finding in the middle of the whole-FOV cube"
    for i in inside:
        np.testing.assert_array_equal(_box_of(middle, whole.finding_ids[i]), whole.boxes[i] - 16)
    box = _box_of(middle, f.nodule_id)
    native_centre = (np.array(f.centre_voxel[:2]) + 0.5)
    around = render_volume(scan, k, 32, field_mm=fov_mm / 2, centre_rc=tuple(native_centre), db_path=lidc_mini_db)
    shift = (native_centre - 256.0) / (NATIVE_SIZE / 64)  # output voxels
    moved = _box_of(around, f.nodule_id)
    np.testing.assert_allclose((moved[1:3] + moved[4:6]) / 2, (box[1:3] + box[4:6]) / 2 - shift, atol=1.0)
    np.testing.assert_allclose((moved[1:3] + moved[4:6]) / 2, 16.0, atol=1.25)  # centred on the target


def test_bad_arguments_are_refused(selection, lidc_mini_db):
    scan = selection.scans[0]
    for kwargs in ({"size": 4}, {"size": 128.0}, {"slice_index": scan.slice_z.size}, {"slice_index": -1}):
        args = {"slice_index": 0, "size": 64, **kwargs}
        with pytest.raises(ValueError):
            render_slice(scan, db_path=lidc_mini_db, **args)
    with pytest.raises(ValueError, match="depth_mm"):
        render_volume(scan, 0, 32, depth_mm=0.0, db_path=lidc_mini_db)
    with pytest.raises(ValueError, match="field_mm"):
        render_volume(scan, 0, 32, field_mm=float("nan"), db_path=lidc_mini_db)
    with pytest.raises(ValueError, match="centre_rc"):
        render_volume(scan, 0, 32, centre_rc=(256.0, 256.0), db_path=lidc_mini_db)


def test_speed_sanity(selection, lidc_mini_db):
    """Times printed, not asserted (shared machines): a 128^2 slice, a 64^3 volume, a scan's masks."""
    f = selection.targets[0]
    scan, k = _scan_of(selection, f), _centre_slice(f)
    finding_masks(scan, lidc_mini_db)  # cached per scan
    start = time.perf_counter()
    for _ in range(5):
        render_slice(scan, k, 128, db_path=lidc_mini_db)
    per_slice = (time.perf_counter() - start) / 5
    start = time.perf_counter()
    render_volume(scan, k, 64, db_path=lidc_mini_db)
    per_volume = time.perf_counter() - start
    print(f"\n128x128 slice {per_slice * 1e3:.0f} ms, 64^3 volume {per_volume * 1e3:.0f} ms")
    assert per_slice > 0 and per_volume > 0
