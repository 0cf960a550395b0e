"""AFIDs landmark phantom: fiducials follow each subject's deformation; the landmark DataModule's batches, splits,
cache and configs (phantom source; the real formats are in test_landmark_formats.py)."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medrobust.config import CONF_DIR
from medrobust.data.afids_phantom import AFIDS_CSV, MIDLINE, Deformation, draw_deformation, field_centre
from medrobust.data.afids_phantom import generate_afids, load_fiducials, load_template, subject_rng, warp
from medrobust.data.brain_anatomy import template_paths
from medrobust.datamodules.landmarks import LandmarkDataModule, split_by_subject

TINY = {2: dict(spatial_dims=2, num_subjects=10, image_size=48, batch_size=4),
        3: dict(spatial_dims=3, num_subjects=6, image_size=48, batch_size=2)}  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("afids")


def ready(dm: LandmarkDataModule) -> LandmarkDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def afids2d(root):
    return ready(LandmarkDataModule(root=str(root), **TINY[2]))


@pytest.fixture(scope="module")
def afids3d(root):
    return ready(LandmarkDataModule(root=str(root), **TINY[3]))


def points_of(dims: int) -> np.ndarray:
    ras = load_fiducials(midline_only=dims == 2).ras_mm
    return ras if dims == 3 else ras[:, 1:]


# ------------------------------------------------------------------------------ the deformation and its inverse
@pytest.mark.parametrize("dims", [2, 3])
def test_inverse_of_the_field_returns_through_the_pull_back(dims):
    points = points_of(dims)
    shape, h = (40,) * dims, 3.0
    deformation = draw_deformation(np.random.default_rng(1), shape, h, field_centre(points), elastic_mm=3.0)
    grads = np.gradient(deformation.displacement_mm, h, axis=tuple(range(1, dims + 1)))
    jacobian = np.moveaxis(np.stack([np.stack(g) for g in grads]), (0, 1), (-2, -1)) + np.eye(dims)
    assert np.linalg.det(jacobian).min() > 0.1  # the strongest allowed field does not fold: an inverse exists
    q = deformation.push_forward(points)
    back_voxels = (deformation.pull_back(q) - points) @ deformation.linear.T / h  # residual in output voxels
    assert np.abs(back_voxels).max() < 0.05
    # the elastic part matters: ignoring it misplaces fiducials by more than half a voxel
    affine_only = Deformation(deformation.linear, deformation.shift_mm, deformation.centre_mm,
                              0 * deformation.displacement_mm, h).push_forward(points)  # fmt: skip
    assert np.linalg.norm(affine_only - q, axis=1).max() > 0.5


@pytest.mark.parametrize("dims", [2, 3])
def test_generated_landmarks_are_the_fiducials_through_the_subjects_own_field(dims):
    out = generate_afids(["sub-a", "sub-b"], seed=5, spatial_dims=dims, image_size=40, progress=False)
    points, h = points_of(dims), {2: 2.5, 3: 3.6}[dims]
    for sid, landmarks in zip(out["subject_ids"], out["landmarks"]):
        deformation = draw_deformation(subject_rng(5, dims, sid), (40,) * dims, h, field_centre(points))
        residual = (deformation.pull_back(landmarks) - points) @ deformation.linear.T / h
        assert np.abs(residual).max() < 0.05
    assert np.abs(out["landmarks"][0] - out["landmarks"][1]).max() > 0.5  # subjects differ


@pytest.mark.parametrize("dims", [2, 3])
def test_a_blob_at_a_fiducial_lands_on_the_mapped_landmark(dims):
    """An image feature moves with the landmark: a bright blob drawn at AC in a source volume with a flipped,
    anisotropic affine, warped by a random deformation, has its centroid at the pushed-forward AC."""
    ac = points_of(dims)[0]
    spacing = np.array([-1.5, 1.0, 2.0][-dims:])  # voxel -> mm: first axis flipped, anisotropic
    affine = np.eye(dims + 1)
    affine[:dims, :dims] = np.diag(spacing)
    affine[:dims, dims] = ac - spacing * np.array([30.0, 33.0, 21.0][-dims:])  # AC at a non-centred voxel
    grids = np.meshgrid(*[np.arange(64.0)] * dims, indexing="ij")
    mm = sum(((g * s + o) - c) ** 2 for g, s, o, c in zip(grids, spacing, affine[:dims, dims], ac))
    blob = np.exp(-mm / (2 * 4.0**2))  # sigma 4 mm: ~1.6 output voxels
    shape, h = (32,) * dims, 2.5
    deformation = draw_deformation(np.random.default_rng(7), shape, h, ac + 9.0, elastic_mm=3.0)
    image = warp(blob, affine, deformation)
    expected = deformation.push_forward(ac[None])[0]
    assert np.all(expected > 5) and np.all(expected < 26)  # away from the edges: the centroid sees the whole blob
    weights = np.where(image > 0.05 * image.max(), image, 0.0)
    centroid = np.array([(weights * g).sum() / weights.sum() for g in np.meshgrid(*[np.arange(32.0)] * dims,
                                                                                   indexing="ij")])  # fmt: skip
    assert np.linalg.norm(centroid - expected) < 0.5
    assert np.linalg.norm(deformation.push_forward(ac[None])[0] - (np.asarray(shape) - 1) / 2) > 2  # not trivial


# ------------------------------------------------------------------------------ the template and its affine
def test_identity_subject_puts_ac_at_the_voxel_the_template_affine_says():
    t1 = nib.load(str(template_paths()["t1"]))
    affine, data = t1.affine, np.asarray(t1.dataobj, dtype=np.float32)
    ac = load_fiducials().ras_mm[0]
    ac_voxel = (np.linalg.inv(affine) @ np.append(ac, 1.0))[:3]  # where nibabel's affine puts AC
    n, start = 16, np.round(ac_voxel).astype(int) - 8  # a 1 mm grid on template voxels around AC
    spacing = float(affine[0, 0])
    centre = (affine @ np.append(start + (n - 1) / 2, 1.0))[:3]
    identity = Deformation.identity((n,) * 3, spacing, centre)
    np.testing.assert_allclose(identity.push_forward(ac[None])[0], ac_voxel - start, atol=1e-6)
    crop = data[start[0] : start[0] + n, start[1] : start[1] + n, start[2] : start[2] + n]
    np.testing.assert_allclose(warp(data, affine, identity), crop, atol=1e-3)  # the image sampled through it too


def test_the_sagittal_template_is_the_volume_plane_at_x_zero():
    volume, plane = load_template(3, 1.0), load_template(2, 1.0)
    points = load_fiducials(midline_only=True).ras_mm
    v3, v2 = volume.to_voxels(points), plane.to_voxels(points[:, 1:])
    np.testing.assert_allclose(v2, v3[:, 1:], atol=1e-9)
    x0 = volume.to_voxels(np.zeros((1, 3)))[0, 0]
    assert abs(x0 - round(x0)) < 1e-6  # the 1 mm template has a voxel plane at x = 0
    np.testing.assert_allclose(plane.tissue, volume.tissue[:, int(round(x0))], atol=1e-4)


def test_midline_set_in_2d_and_every_fiducial_in_3d(afids2d, afids3d):
    with open(AFIDS_CSV, newline="") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    assert len(rows) == 32 and len({r["acronym"] for r in rows}) == 32
    midline = [r["acronym"] for r in rows if abs(float(r["x_sym"])) <= 0.25]
    assert tuple(midline) == MIDLINE and len(MIDLINE) == 10
    assert afids2d.landmark_names == list(MIDLINE) and afids2d.num_landmarks == 10
    assert afids3d.landmark_names == [r["acronym"] for r in rows] and afids3d.num_landmarks == 32


# ------------------------------------------------------------------------------ the DataModule
@pytest.mark.parametrize("dims", [2, 3])
def test_batch_contract(afids2d, afids3d, dims):
    dm = {2: afids2d, 3: afids3d}[dims]
    k, n = (10, 48) if dims == 2 else (32, 48)
    batch = next(iter(dm.train_dataloader()))
    b = len(batch["id"])
    assert batch["image"].shape == (b, 1) + (n,) * dims and batch["image"].dtype == torch.float32
    assert batch["landmarks"].shape == (b, k, dims) and batch["landmarks"].dtype == torch.float32
    assert batch["spacing"].shape == (b, dims) and torch.all(batch["spacing"] == dm.spacing_mm)
    assert dm.spacing_mm == {2: 2.5, 3: 3.6}[dims] and dm.input_bounds == (0.0, 1.0) and dm.in_channels == 1
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1 and batch["image"].std() > 0.05
    assert batch["landmarks"].min() >= 0 and batch["landmarks"].max() <= n - 1
    assert dm.intensity.unit == "a.u." and dm.spatial_dims == dims and dm.image_shape == (n,) * dims


@pytest.mark.parametrize("dims", [2, 3])
def test_splits_by_subject_without_overlap(afids2d, afids3d, dims):
    dm = {2: afids2d, 3: afids3d}[dims]
    subjects = [set(ds.subject_ids) for ds in (dm.data_train, dm.data_val, dm.data_test)]
    assert all(subjects) and not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    assert sum(len(s) for s in subjects) == TINY[dims]["num_subjects"]
    ids = np.array(["a", "a", "b", "c", "c", "d", "e", "f"])  # 6 subjects, two with 2 samples
    assign = split_by_subject(ids, (0.5, 0.25, 0.25), seed=0)
    split_of = {s: set(assign[ids == s].tolist()) for s in set(ids)}
    assert all(len(v) == 1 for v in split_of.values())  # a subject's samples share a split
    assert np.bincount([min(v) for v in split_of.values()], minlength=3).tolist() == [4, 1, 1]


def test_cache_is_read_not_regenerated_and_subjects_do_not_depend_on_the_cohort(afids2d, root):
    path = afids2d.cache_path()
    before = path.stat().st_mtime_ns
    again = ready(LandmarkDataModule(root=str(root), **TINY[2]))
    assert again.cache_path() == path and path.stat().st_mtime_ns == before
    assert again.data_train.ids == afids2d.data_train.ids
    larger = ready(LandmarkDataModule(root=str(root), **{**TINY[2], "num_subjects": 12}))
    assert larger.cache_path() != path and len(list(root.glob("landmarks_phantom_*.npz"))) >= 2
    a, b = (dm.data_train + dm.data_val + dm.data_test for dm in (afids2d, larger))
    first = {x["id"]: x for x in a}
    common = [x for x in b if x["id"] in first]
    assert len(common) == 10
    for x in common:  # a subject is the same whichever cohort it is drawn in
        assert all(torch.equal(x[key], first[x["id"]][key]) for key in ("image", "landmarks"))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(spatial_dims=4), "data.spatial_dims"), (dict(source="isbi2015", spatial_dims=3), "data.spatial_dims"),
     (dict(image_size=4), "data.image_size"), (dict(image_size=[48, 40]), "data.image_size"),
     (dict(spacing_mm=0), "data.spacing_mm"), (dict(elastic_mm=4), "data.elastic_mm"),
     (dict(source="xray"), "data.source"), (dict(source="fcsv"), "data.csv"),
     (dict(num_subjects=3, split=(0.4, 0.3, 0.3)), "data.num_subjects")],
)  # fmt: skip
def test_bad_arguments_name_the_key(kwargs, message, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace(".", r"\.")):
        ready(LandmarkDataModule(root=str(tmp_path), **kwargs))


@pytest.mark.parametrize("name", ["afids", "landmarks", "isbi2015"])
def test_configs_match_the_constructor(name, tmp_path):
    args = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml"))
    assert args.pop("_target_") == "medrobust.datamodules.landmarks.LandmarkDataModule"
    if name == "isbi2015":
        (tmp_path / "RawImage").mkdir()
    dm = LandmarkDataModule(**{**args, "root": str(tmp_path)})
    assert dm.num_landmarks == {"afids": 10, "landmarks": 10, "isbi2015": 19}[name] and dm.data_train is None
