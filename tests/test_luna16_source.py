"""The real LUNA16 source: MetaImage read / write, world -> voxel, boxes on the findings, targets vs irrelevant
findings, the subset folds, batches through the datamodule, the cache, and bad inputs -- on a tiny LUNA16 folder
the tests write in the real layout (subset<k>/<seriesuid>.mhd + .raw / .zraw, the annotation CSVs)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_luna_data import box_region, check_batch

from medrobust.data.luna16 import UNSIZED_DIAMETER_MM, enclosed_dark_points, read_annotations, world_to_cell
from medrobust.data.metaimage import MetaImageError, read_metaimage, read_metaimage_header, write_metaimage
from medrobust.datamodules.luna import LunaDataModule

SIZE = 64  # the scans are 64 x 64 in-plane: 2-D samples keep the native grid, so a pixel is a voxel
ALL_FOLDS = {"train": [0, 3, 4, 5, 6, 7], "val": [1, 8], "test": [2, 9]}
BACKGROUND_HU, SPHERE_HU = -800, 200
UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.{}".format


def esc(path) -> str:
    """A path (or any text) as a literal in a ``match`` pattern."""
    return re.escape(str(path))


def uid(n: int) -> str:
    return UID(100 + n)


# the scans with findings: voxel index (slice, row, col) and diameter (mm) of each finding, the scan's geometry
SCANS = {
    uid(0): dict(subset=0, shape=(40, 64, 64), spacing=(2.0, 0.75, 0.75), origin=(-24.0, -30.5, -100.0),
                 flip_y=False, compress=False,
                 targets=[((20, 30, 22), 9.0), ((10, 44, 46), 6.0)],
                 excluded=[((30, 18, 40), 5.0), ((20, 14, 52), -1.0)]),  # -1: unsized (LUNA16: 10 mm)
    uid(1): dict(subset=1, shape=(40, 64, 64), spacing=(1.5, 0.9, 0.9), origin=(10.0, 40.0, -50.0),
                 flip_y=True, compress=False, targets=[((25, 18, 40), 8.0)], excluded=[]),
    uid(2): dict(subset=2, shape=(30, 64, 64), spacing=(2.5, 0.8, 0.8), origin=(5.0, -7.0, 300.0),
                 flip_y=False, compress=True, targets=[((12, 32, 20), 10.0)], excluded=[]),
}  # fmt: skip


def world_of(scan: dict, index) -> tuple[float, float, float]:
    """World (x, y, z) mm of a voxel index (slice, row, col), written out by hand for the tests (not the module's
    code): x along columns, y along rows (against them when flipped), z along slices."""
    k, r, c = index
    sz, sy, sx = scan["spacing"]
    ox, oy, oz = scan["origin"]
    return ox + c * sx, oy + (-1 if scan["flip_y"] else 1) * r * sy, oz + k * sz


def sphere_volume(scan: dict, rng: np.random.Generator) -> np.ndarray:
    """int16 HU: noisy background with a bright ball of each finding's diameter (unsized ones at 10 mm)."""
    shape, spacing = scan["shape"], np.array(scan["spacing"])
    vol = BACKGROUND_HU + rng.normal(0, 20, shape)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    for index, diameter in scan["targets"] + scan["excluded"]:
        radius = (diameter if diameter > 0 else UNSIZED_DIAMETER_MM) / 2
        vol[(((grid - index) * spacing) ** 2).sum(-1) <= radius**2] = SPHERE_HU
    return np.rint(vol).astype(np.int16)


def write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.write_text("\n".join([header, *rows]) + "\n")


def annotation_rows(kind: str) -> list[str]:
    return [f"{u},{','.join(f'{v:.4f}' for v in world_of(s, index))},{d}"
            for u, s in SCANS.items() for index, d in s[kind]]  # fmt: skip


def write_luna16(root: Path) -> Path:
    """Three scans with findings (subsets 0-2; one flipped in y, one compressed) and a finding-free 16 x 32 x 32
    scan in each of subsets 3-9, plus annotations.csv and annotations_excluded.csv."""
    rng = np.random.default_rng(0)
    for u, scan in SCANS.items():
        direction = np.diag([1.0, -1.0 if scan["flip_y"] else 1.0, 1.0])
        write_metaimage(root / f"subset{scan['subset']}" / f"{u}.mhd", sphere_volume(scan, rng), scan["spacing"],
                        scan["origin"], direction, compress=scan["compress"])  # fmt: skip
    for subset in range(3, 10):
        empty = dict(shape=(16, 32, 32), spacing=(2.0, 1.0, 1.0), targets=[], excluded=[])
        write_metaimage(root / f"subset{subset}" / f"{uid(subset)}.mhd", sphere_volume(empty, rng), empty["spacing"],
                        (-16.0, -16.0, -16.0))  # fmt: skip
    columns = "seriesuid,coordX,coordY,coordZ,diameter_mm"
    write_csv(root / "annotations.csv", columns, annotation_rows("targets"))
    write_csv(root / "annotations_excluded.csv", columns, annotation_rows("excluded"))
    return root


@pytest.fixture(scope="module")
def luna_root(tmp_path_factory) -> Path:
    return write_luna16(tmp_path_factory.mktemp("luna16") / "LUNA16")


def make_dm(root: Path, cache: Path, **kwargs) -> LunaDataModule:
    options = dict(source="luna16", root=str(root), cache_dir=str(cache), folds=ALL_FOLDS, image_size=SIZE,
                   negatives_per_positive=1.0, batch_size=4, augment=False)  # fmt: skip
    return LunaDataModule(**{**options, **kwargs})


@pytest.fixture(scope="module")
def dm2d(luna_root, tmp_path_factory) -> LunaDataModule:
    dm = make_dm(luna_root, tmp_path_factory.mktemp("cache2d"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def samples(dm: LunaDataModule) -> dict[str, dict]:
    """Every item of every split, by id."""
    sets = (dm.data_train, dm.data_val, dm.data_test)
    return {item["id"]: item for ds in sets for item in (ds[i] for i in range(len(ds)))}


def bright_centre(image: torch.Tensor, region: tuple[slice, ...]) -> np.ndarray:
    """Centroid (pixels, half-open convention) of the sphere's pixels within ``region`` grown by 3 pixels."""
    grown = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in region)
    bright = np.argwhere(image[grown].numpy() > 0.6)  # 200 HU -> 0.857, background -800 HU -> 0.14
    return bright.mean(0) + [s.start for s in grown] + 0.5


# ------------------------------------------------------------------------------ MetaImage
@pytest.mark.parametrize("name, compress, dtype", [("a.mhd", False, np.int16), ("b.mhd", True, np.int16),
                                                   ("c.mha", False, np.float32), ("d.mha", True, np.uint8)])
def test_metaimage_round_trip(tmp_path, name, compress, dtype):
    array = (np.arange(5 * 6 * 7) % 250).astype(dtype).reshape(5, 6, 7)
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # swapped and flipped axes
    path = write_metaimage(tmp_path / name, array, (2.5, 0.7, 0.8), (-10.5, 20.25, 300.0), direction, compress)
    image = read_metaimage(path)
    assert image.array.dtype == dtype and np.array_equal(image.array, array)
    assert np.allclose(image.spacing, [2.5, 0.7, 0.8]) and np.allclose(image.origin, [-10.5, 20.25, 300.0])
    assert np.array_equal(image.direction, direction)
    data_files = {p.name for p in tmp_path.iterdir()} - {name}
    assert data_files == (set() if name.endswith(".mha") else {Path(name).stem + (".zraw" if compress else ".raw")})
    header = path.read_bytes().split(b"ElementDataFile")[0].decode()
    assert "DimSize = 7 6 5" in header and "ElementSpacing = 0.8 0.7 2.5" in header  # x fastest, as ITK writes


def test_metaimage_big_endian_and_synonyms(tmp_path):
    """A hand-written header: MSB data, Origin for Offset, a data file named in a subfolder, keys LUNA16 carries."""
    array = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "v.bin").write_bytes(array.tobytes())
    (tmp_path / "v.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = True\nCompressedData = False\n"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOrigin = 1 2 3\nCenterOfRotation = 0 0 0\nAnatomicalOrientation = RAI\n"
        "ElementSpacing = 0.5 0.5 1.25\nDimSize = 4 3 2\nElementType = MET_SHORT\nElementDataFile = data/v.bin\n")
    image = read_metaimage(tmp_path / "v.mhd")
    assert np.array_equal(image.array, array.astype(np.int16)) and image.array.dtype == np.int16
    assert image.origin.tolist() == [1, 2, 3] and image.spacing.tolist() == [1.25, 0.5, 0.5]


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.replace("DimSize = 64 64 40\n", ""), r"missing key DimSize"),
    (lambda h: h.replace("DimSize = 64 64 40", "DimSize = 64 64"), r"DimSize: expected 3 integers"),
    (lambda h: h.replace("ElementType = MET_SHORT", "ElementType = MET_HALF"), r"ElementType: unknown element type"),
    (lambda h: h.replace("ElementSpacing = 0.75", "ElementSpacing = -0.75"), r"ElementSpacing: expected 3 positive"),
    (lambda h: h.replace("TransformMatrix = 1.0", "TransformMatrix = 2.0"), r"TransformMatrix: expected an ortho"),
    (lambda h: h.replace("NDims = 3\n", "NDims 3\n"), r"line 2: expected 'Key = Value'"),
    (lambda h: h.replace("ElementDataFile", "DataFile"), r"missing key ElementDataFile"),
])  # fmt: skip
def test_malformed_headers_name_the_file_and_the_key(luna_root, tmp_path, edit, match):
    header = tmp_path / "scan.mhd"
    header.write_text(edit((luna_root / "subset0" / f"{uid(0)}.mhd").read_text()))
    with pytest.raises(MetaImageError, match=rf"{esc(header)}: .*{match}"):
        read_metaimage_header(header)


def test_data_file_missing_or_of_the_wrong_size(luna_root, tmp_path):
    folder = shutil.copytree(luna_root / "subset0", tmp_path / "s")
    header, raw = folder / f"{uid(0)}.mhd", folder / f"{uid(0)}.raw"
    raw.write_bytes(raw.read_bytes()[:-2])  # one voxel short
    with pytest.raises(MetaImageError, match=rf"{esc(raw)}: 327678 bytes of data where the header {esc(header)} "
                                             r"\(DimSize 64 64 40, ElementType MET_SHORT\) needs 327680"):
        read_metaimage(header)
    raw.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{esc(header)}: ElementDataFile '{esc(uid(0))}.raw': no such file"):
        read_metaimage(header)


# ------------------------------------------------------------------------------ geometry and boxes
def test_world_to_cell_inverts_the_geometry_also_with_a_flipped_axis(luna_root):
    for u, scan in SCANS.items():
        header = read_metaimage_header(luna_root / f"subset{scan['subset']}" / f"{u}.mhd")
        assert header.direction[1, 1] == (-1.0 if scan["flip_y"] else 1.0)
        for index, _ in scan["targets"]:
            assert np.allclose(world_to_cell(header, world_of(scan, index)), np.array(index) + 0.5)


def test_2d_boxes_lie_on_the_spheres_and_are_sized_by_the_diameter(dm2d):
    items = samples(dm2d)
    checked = 0
    for u, scan in SCANS.items():
        for n, (index, diameter) in enumerate(scan["targets"]):
            item = items[f"{u}:n{n:02d}/z{index[0]}"]  # the slice through the target's centre
            (box,) = [b for b, f in zip(item["boxes"], finding_ids(dm2d, item)) if f == f"{u}:n{n:02d}"]
            centre = (box[:2] + box[2:]).numpy() / 2
            assert np.abs(centre - (np.array(index[1:]) + 0.5)).max() <= 1.0, (item["id"], box)
            assert np.abs(bright_centre(item["image"][0], box_region(box)) - centre).max() <= 1.0, item["id"]
            extent = diameter / np.array(scan["spacing"][1:])  # pixels across, per axis
            assert ((box[2:] - box[:2]).numpy() >= extent).all() and ((box[2:] - box[:2]).numpy() <= extent + 2).all()
            assert np.allclose(item["spacing"].numpy(), scan["spacing"][1:])  # 64 px of a 64 px field of view
            checked += 1
    assert checked == 4


def finding_ids(dm: LunaDataModule, item: dict) -> list[str]:
    a = dm.cached_arrays()
    j = int(np.flatnonzero(a["ids"] == item["id"])[0])
    return a["box_finding_ids"][a["box_offsets"][j] : a["box_offsets"][j + 1]].tolist()


def test_targets_and_irrelevant_findings(dm2d):
    items = samples(dm2d)
    first = items[f"{uid(0)}:n00/z20"]  # slice 20 also cuts the unsized irrelevant finding (10 mm)
    assert finding_ids(dm2d, first) == [f"{uid(0)}:n00", f"{uid(0)}:x01"]
    assert first["box_target"].tolist() == [True, False]
    unsized = first["boxes"][1]
    assert 10 / 0.75 <= float(unsized[2] - unsized[0]) <= 10 / 0.75 + 2
    counts = {name: c for name, c in dm2d.split_counts.items()}
    assert counts["train"]["targets"] == 2 and counts["train"]["irrelevant"] == 1
    assert sum(c["positive"] for c in counts.values()) == 4  # one sample per target's slice
    assert not any(items[i]["boxes"].numel() for i in items if ":n" not in i)  # 2-D negatives hold no finding


def test_3d_cubes_box_their_target_on_the_centre_slice(luna_root, tmp_path):
    dm = make_dm(luna_root, tmp_path, spatial_dims=3, image_size=32, field_mm=None,
                 folds={"train": [0], "val": [1], "test": [2]})  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, 3, 32)
    for item in samples(dm).values():
        if ":n" not in item["id"]:
            continue
        u, n = item["id"].split("/")[0].rsplit(":n", 1)
        scan = SCANS[u]
        index, diameter = scan["targets"][int(n)]
        spacing = item["spacing"].numpy()
        assert np.allclose(spacing, scan["spacing"][1] * 2)  # 64 px -> 32, isotropic
        (box,) = [b for b, f in zip(item["boxes"], finding_ids(dm, item)) if f == f"{u}:n{n}"]
        centre = (box[:3] + box[3:]).numpy() / 2
        assert abs(centre[0] - 16.5) <= 1.0 and np.abs(centre[1:] - (np.array(index[1:]) + 0.5) / 2).max() <= 1.0
        assert np.abs(bright_centre(item["image"][0], box_region(box)) - centre).max() <= 1.0, item["id"]
        assert ((box[3:] - box[:3]).numpy() >= diameter / spacing).all()


def test_3d_windows_hold_their_target_jittered_and_negatives_sit_in_lung(luna_root, tmp_path):
    """field_mm: a 24 mm window (16 voxels of 1.5 mm) per target; its ball is boxed where the image shows it, in the
    window's middle half, at a different place in each window."""
    dm = make_dm(luna_root, tmp_path, spatial_dims=3, image_size=16, field_mm=24.0,
                 folds={"train": [0], "val": [1], "test": [2]})  # fmt: skip
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), 3, 16)
    centres = []
    for item in samples(dm).values():
        assert torch.allclose(item["spacing"], torch.tensor(1.5))
        if ":n" not in item["id"]:
            continue
        target = item["id"].split("/")[0]
        (box,) = [b for b, f in zip(item["boxes"], finding_ids(dm, item)) if f == target]
        centre = (box[:3] + box[3:]).numpy() / 2
        assert np.abs(bright_centre(item["image"][0], box_region(box)) - centre).max() <= 1.0, item["id"]
        centres.append(centre)
    centres = np.array(centres)
    assert len(centres) == 4 and ((centres >= 4 - 1) & (centres <= 12 + 1)).all(), centres
    assert len({tuple(np.round(c)) for c in centres - centres.mean(0)}) == 4  # jittered, not all alike


def test_enclosed_dark_points_lie_in_the_lungs_not_the_air_outside():
    """A body (tissue ellipse) holding two dark lungs, in air: only the lungs' pixels are lung points."""
    rows, cols = np.mgrid[:128, :128]
    plane = np.full((128, 128), -1000, dtype=np.int16)
    plane[((rows - 64) / 50) ** 2 + ((cols - 64) / 60) ** 2 <= 1] = 40
    lungs = (((rows - 64) / 30) ** 2 + ((np.abs(cols - 64) - 30) / 20) ** 2) <= 1
    plane[lungs] = -850
    points = enclosed_dark_points(plane, stride=4)
    assert len(points) > 50
    r, c = np.floor(points).astype(int).T
    assert lungs[r, c].all()


# ------------------------------------------------------------------------------ folds, batches, cache
def test_subset_folds_make_the_splits(dm2d):
    a = dm2d.cached_arrays()
    for name, ds in zip(("train", "val", "test"), (dm2d.data_train, dm2d.data_val, dm2d.data_test)):
        assert set(a["subsets"][ds.idx].tolist()) <= set(ALL_FOLDS[name]) and len(ds) > 0, name
        assert set(a["patient_ids"][ds.idx].tolist()) & {uid(s) for s in ALL_FOLDS[name]}  # patient = seriesuid
    assert sum(map(len, (dm2d.data_train, dm2d.data_val, dm2d.data_test))) == len(a["ids"])
    assert (a["positive"].sum(), (~a["positive"]).sum()) == (4, 4)  # negatives_per_positive=1.0


def test_batches_have_the_luna_format(dm2d):
    for loader in (dm2d.train_dataloader(), dm2d.val_dataloader()):
        batch = next(iter(loader))
        check_batch(batch, 2, SIZE)
    assert dm2d.input_bounds == (0.0, 1.0) and dm2d.num_classes == 1 and dm2d.spatial_dims == 2


def test_the_cache_is_reused_and_keyed_by_the_samples_settings(luna_root, dm2d, tmp_path):
    path = dm2d.cache_path()
    assert path.parent == Path(dm2d.cache_dir) and path.name.startswith("luna16_2d_") and path.exists()
    assert not list(luna_root.rglob("*.npz"))  # nothing written into the dataset
    stamp = path.stat().st_mtime_ns
    again = make_dm(luna_root, path.parent)
    again.prepare_data()
    again.setup("fit")
    assert again.cache_path() == path and path.stat().st_mtime_ns == stamp  # read, not rebuilt
    swapped = make_dm(luna_root, path.parent, folds={"train": ALL_FOLDS["train"], "val": [2, 9], "test": [1, 8]})
    assert swapped.cache_path() == path  # the same subsets read: the assignment is applied at load time
    for change in ({"image_size": 32}, {"seed": 1}, {"folds": {"train": [0], "val": [1]}}, {"spatial_dims": 3}):
        assert make_dm(luna_root, path.parent, **change).cache_path() != path, change


def test_restricted_folds_leave_out_and_count_the_other_annotations(luna_root, tmp_path, caplog):
    dm = make_dm(luna_root, tmp_path, folds={"train": [0], "val": [1]})
    with caplog.at_level(logging.WARNING, logger="medrobust"):
        dm.setup("fit")
    assert "1 annotations of 1 series lie outside the subsets read" in caplog.text
    meta = json.loads(dm.cache_path().with_suffix(".json").read_text())
    assert meta["ignored_annotations"] == 1 and meta["n_series"] == 2
    assert len(dm.data_test) == 0 and set(dm.cached_arrays()["subsets"].tolist()) == {0, 1}


def test_candidates_csv_is_checked_and_counted(luna_root, tmp_path):
    root = shutil.copytree(luna_root, tmp_path / "LUNA16")
    u, scan = uid(0), SCANS[uid(0)]
    rows = [f"{u},{','.join(map(str, world_of(scan, index)))},{c}" for (index, _), c in zip(scan["targets"], (1, 0))]
    write_csv(root / "candidates.csv", "seriesuid,coordX,coordY,coordZ,class", rows)
    dm = make_dm(root, tmp_path / "cache", folds={"train": [0], "val": [1]})
    dm.prepare_data()
    assert json.loads(dm.cache_path().with_suffix(".json").read_text())["candidates"] == {"0": 1, "1": 1}
    write_csv(root / "candidates.csv", "seriesuid,coordX,coordY,coordZ,class", [rows[0][:-1] + "2"])
    with pytest.raises(ValueError, match=rf"{esc(root / 'candidates.csv')}, line 2, column class: expected 0 or 1"):
        make_dm(root, tmp_path / "cache2", folds={"train": [0], "val": [1]}).prepare_data()


# ------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def broken_root(luna_root, tmp_path) -> Path:
    """A copy of the LUNA16 folder to break."""
    return shutil.copytree(luna_root, tmp_path / "LUNA16")


def build(root: Path, tmp_path: Path, **kwargs) -> None:
    make_dm(root, tmp_path / "cache", **kwargs).prepare_data()


def test_an_annotation_without_a_volume_names_its_seriesuid_and_csv(broken_root, tmp_path):
    with open(broken_root / "annotations.csv", "a") as fh:
        fh.write("1.2.3.404,0.0,0.0,0.0,5.0\n")
    where = esc(broken_root / "annotations.csv")
    with pytest.raises(FileNotFoundError, match=rf"{where}, line 6: seriesuid 1\.2\.3\.404 has no volume in any"):
        build(broken_root, tmp_path)


def test_a_centre_outside_its_volume_stops_a_target_and_leaves_out_an_irrelevant_finding(broken_root, tmp_path,
                                                                                        caplog):
    far = f"{uid(0)},{','.join(f'{v:.4f}' for v in world_of(SCANS[uid(0)], (20, 30, 200)))},5.0\n"  # col 200 of 64
    with open(broken_root / "annotations_excluded.csv", "a") as fh:
        fh.write(far)
    dm = make_dm(broken_root, tmp_path / "cache", folds={"train": [0], "val": [1], "test": [2]})
    with caplog.at_level(logging.WARNING, logger="medrobust"):
        dm.prepare_data()
    assert f"{broken_root / 'annotations_excluded.csv'}, line 4: the centre" in caplog.text
    assert "an irrelevant finding, left out" in caplog.text
    assert dm.cache_path().exists()  # built: the irrelevant finding outside its volume no longer stops it
    with open(broken_root / "annotations.csv", "a") as fh:
        fh.write(far)
    where = esc(broken_root / "annotations.csv")
    with pytest.raises(ValueError, match=rf"{where}, line 6: the centre .* of seriesuid {esc(uid(0))} lies outside"):
        build(broken_root, tmp_path / "second")


@pytest.mark.parametrize("column", ["coordY", "diameter_mm"])
def test_a_missing_csv_column_is_named(broken_root, tmp_path, column):
    csv = broken_root / "annotations.csv"
    lines = csv.read_text().splitlines()
    at = lines[0].split(",").index(column)
    csv.write_text("\n".join(",".join(v for i, v in enumerate(line.split(",")) if i != at) for line in lines))
    with pytest.raises(ValueError, match=rf"{esc(csv)}, line 1: missing column '{column}'"):
        build(broken_root, tmp_path)


@pytest.mark.parametrize("value, match", [("abc", r"line 3, column diameter_mm: expected a number, got 'abc'"),
                                          ("0", r"line 3, column diameter_mm: expected a positive diameter")])
def test_bad_csv_values_name_line_and_column(broken_root, tmp_path, value, match):
    csv = broken_root / "annotations.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + "," + value
    csv.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=rf"{esc(csv)}, {match}"):
        build(broken_root, tmp_path)


def test_a_broken_volume_in_the_dataset_names_its_file(broken_root, tmp_path):
    header = broken_root / "subset1" / f"{uid(1)}.mhd"
    header.write_text(header.read_text().replace("ElementType = MET_SHORT", "ElementType = MET_SHORTY"))
    with pytest.raises(MetaImageError, match=rf"{esc(header)}: ElementType"):
        build(broken_root, tmp_path)
    header.write_text(header.read_text().replace("MET_SHORTY", "MET_INT"))  # twice the bytes the .raw holds
    with pytest.raises(MetaImageError, match=rf"{esc(header.with_suffix('.raw'))}: 327680 bytes of data where"):
        build(broken_root, tmp_path)


def test_a_missing_subset_folder_or_annotations_csv(broken_root, tmp_path):
    shutil.rmtree(broken_root / "subset9")
    with pytest.raises(FileNotFoundError, match=r"data.folds names subset 9, but .*subset9 is not a folder"):
        build(broken_root, tmp_path)
    (broken_root / "annotations.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"data.root .*: no annotations.csv"):
        build(broken_root, tmp_path, folds={"train": [0]})


def test_root_and_folds_are_checked_when_built(tmp_path):
    with pytest.raises(ValueError, match=r"data\.root must be the LUNA16 folder"):
        LunaDataModule(source="luna16")
    with pytest.raises(FileNotFoundError, match=r"data\.root: the LUNA16 folder '/nonexistent/LUNA16'"):
        LunaDataModule(source="luna16", root="/nonexistent/LUNA16")
    for folds, match in (({"train": [0], "val": [0]}, r"subset 0 is in train and val"),
                         ({"train": [10]}, r"data\.folds\.train: .* from 0 to 9, got 10"),
                         ({"train": []}, r"data\.folds\.train must name at least one subset"),
                         ({"train": [0], "dev": [1]}, r"data\.folds must map train / val / test"),
                         ({"train": "0-7"}, r"data\.folds\.train must be a list")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            LunaDataModule(source="luna16", root=str(tmp_path), folds=folds)
    with pytest.raises(ValueError, match=r"data\.source must be one of \['phantom', 'luna16'\]"):
        LunaDataModule(source="luna")


def test_annotations_excluded_unsized_diameter(luna_root):
    rows = read_annotations(luna_root / "annotations_excluded.csv", is_target=False)
    assert [r.diameter_mm for r in rows] == [5.0, UNSIZED_DIAMETER_MM] and not any(r.is_target for r in rows)
