"""Brain-age data: the MNI152-based phantom (tiny sizes) and the NIfTI source on files written here."""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from medrobust.config import CONF_DIR
from medrobust.data.brain_phantom import FEATURE_NAMES, TISSUE_LABELS
from medrobust.data.patches import load_npz, save_npz_atomic
from medrobust.datamodules.brainage import BrainAgeDataModule, flip_left_right, split_subjects

TINY = dict(image_size=16, num_subjects=30, batch_size=8)


def ready(dm: BrainAgeDataModule) -> BrainAgeDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def splits(dm: BrainAgeDataModule):
    return {"train": dm.data_train, "val": dm.data_val, "test": dm.data_test}


def everything(dm: BrainAgeDataModule, attr: str) -> np.ndarray:
    return np.concatenate([np.asarray(getattr(ds, attr)) for ds in splits(dm).values()])


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> BrainAgeDataModule:
    return ready(BrainAgeDataModule(root=str(tmp_path_factory.mktemp("brainage")), **TINY))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> BrainAgeDataModule:
    """Enough phantom subjects for the ageing checks (volumes do not depend on the image size)."""
    return ready(BrainAgeDataModule(root=str(tmp_path_factory.mktemp("cohort")), image_size=8, num_subjects=80))


# ------------------------------------------------------------------------------ phantom
def test_attributes_shapes_and_range(phantom):
    dm = phantom
    assert dm.input_bounds == (0.0, 1.0) and dm.in_channels == 1 and dm.spatial_dims == 3
    assert dm.feature_names == FEATURE_NAMES and dm.num_features == len(FEATURE_NAMES) == 10
    assert dm.intensity.unit == "a.u." and dm.intensity.bounds == (0.0, 1.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == torch.float32
    assert batch["features"].shape == (8, 10) and batch["features"].dtype == torch.float32
    assert len(batch["subject_id"]) == 8 and all(s.startswith("sub-") for s in batch["subject_id"])
    assert batch["id"] == batch["subject_id"]  # the per-sample key of the batch contract
    x = torch.cat([b["image"] for b in dm.val_dataloader()])
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
    # the brain sits in the middle of the field of view, background around it
    assert x[..., 5:11, 5:11, 5:11].mean() > 4 * x[..., :2, :, :].mean()
    train = dm.data_train
    assert dm.age_mean == pytest.approx(train.ages.mean()) and dm.age_std == pytest.approx(train.ages.std())
    assert 20 <= everything(dm, "ages").min() and everything(dm, "ages").max() <= 90
    # features are the training split's z-scores of the raw volumes (mL)
    assert np.allclose(train.features.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(train.features.std(axis=0), 1, atol=1e-3)
    assert np.allclose(dm.data_test.features, (dm.data_test.volumes_ml - dm.features_mean) / dm.features_std, atol=1e-4)
    assert train.label_maps.shape == (len(train), 16, 16, 16) and train.label_maps.max() == len(TISSUE_LABELS) - 1
    item = dm.data_val[0]
    assert item["label"].item() == pytest.approx(dm.data_val.ages[0])
    assert item["subject_id"] == dm.data_val.subject_ids[0]


def test_split_is_by_subject_counts_are_logged(phantom, tmp_path, caplog):
    ids = {name: set(ds.subject_ids) for name, ds in splits(phantom).items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert set().union(*ids.values()) == {f"sub-{i:05d}" for i in range(30)}
    assert all(abs(phantom.split_counts[name] - f * 30) <= 1 for name, f in zip(ids, (0.7, 0.15, 0.15)))
    assert phantom.split_counts == {name: len(ds) for name, ds in splits(phantom).items()}
    with caplog.at_level(logging.INFO, logger="medrobust"):
        ready(BrainAgeDataModule(root=phantom.root, **TINY))
    line = [r.getMessage() for r in caplog.records if "train" in r.getMessage()][-1]
    assert all(f"{name} {n}" in line for name, n in phantom.split_counts.items())
    # the splitter alone: exact shares, every split spans the age range
    ages = np.random.default_rng(0).uniform(20, 90, 200)
    assign = split_subjects(ages, (0.7, 0.15, 0.15), seed=1)
    assert np.bincount(assign).tolist() == [140, 30, 30]
    assert all(ages[assign == k].min() < 30 and ages[assign == k].max() > 80 for k in range(3))
    with pytest.raises(ValueError, match="too few"):
        ready(BrainAgeDataModule(root=str(tmp_path), image_size=8, num_subjects=4))


def test_phantom_is_deterministic_and_subjects_do_not_depend_on_the_cohort(phantom, tmp_path):
    again = ready(BrainAgeDataModule(root=str(tmp_path / "a"), **TINY))
    for attr in ("images", "ages", "volumes_ml", "label_maps"):
        assert np.array_equal(everything(phantom, attr), everything(again, attr))
    images = {s: im for ds in splits(phantom).values() for s, im in zip(ds.subject_ids, ds.images)}
    # another seed: other subjects under the same ids
    other = ready(BrainAgeDataModule(root=str(tmp_path / "b"), **{**TINY, "seed": 1, "max_subjects": 6}))
    other_images = {s: im for ds in splits(other).values() for s, im in zip(ds.subject_ids, ds.images)}
    assert len(other_images) == 6 and all(not np.array_equal(images[s], im) for s, im in other_images.items())
    # a subset of a larger cohort: the same subjects, pixel for pixel
    subset = ready(BrainAgeDataModule(root=str(tmp_path / "c"), **{**TINY, "num_subjects": 34, "max_subjects": 10}))
    chosen = {s: im for ds in splits(subset).values() for s, im in zip(ds.subject_ids, ds.images)}
    common = set(chosen) & set(images)
    assert len(chosen) == 10 and len(common) >= 5 and all(np.array_equal(chosen[s], images[s]) for s in common)


def test_cache_is_read_not_regenerated(phantom):
    path = phantom.cache_path()
    arrays = load_npz(path)
    # plant a marker in the cache: a run that regenerated would not see it
    save_npz_atomic(path, {"planted": True}, **{**arrays, "ages": arrays["ages"] + 1000.0})
    stamp = path.stat().st_mtime_ns
    try:
        dm = ready(BrainAgeDataModule(root=phantom.root, **TINY))
        assert path.stat().st_mtime_ns == stamp and everything(dm, "ages").min() > 1000
    finally:
        save_npz_atomic(path, {}, **arrays)
    assert BrainAgeDataModule(root=phantom.root, **{**TINY, "image_size": 12}).cache_path() != path


def test_anatomy_follows_age(cohort):
    ages, volumes = everything(cohort, "ages"), everything(cohort, "volumes_ml")
    rho = {name: spearmanr(ages, volumes[:, j])[0] for j, name in enumerate(FEATURE_NAMES)}
    assert rho["ventricles_ml"] > 0.4 and rho["csf_ml"] > 0.5, rho
    assert rho["gm_ml"] < -0.3 and rho["gm_frontal_ml"] < -0.4 and abs(rho["icv_ml"]) < 0.35, rho
    # the label maps the images were built from agree with the volumes
    labels = everything(cohort, "label_maps")
    ventricle_voxels = (labels == TISSUE_LABELS.index("ventricles")).sum(axis=(1, 2, 3))
    assert spearmanr(ventricle_voxels, volumes[:, FEATURE_NAMES.index("ventricles_ml")])[0] > 0.5
    # known answer: volumes predict age on held-out subjects far better than the mean age does
    fit = lambda ds: np.c_[ds.features, np.ones(len(ds))]  # noqa: E731
    w = np.linalg.lstsq(fit(cohort.data_train), cohort.data_train.ages, rcond=None)[0]
    held = [cohort.data_val, cohort.data_test]
    linear = np.mean(np.concatenate([np.abs(fit(ds) @ w - ds.ages) for ds in held]))
    mean_age = np.mean(np.concatenate([np.abs(cohort.age_mean - ds.ages) for ds in held]))
    assert linear < 0.7 * mean_age, (linear, mean_age)


def test_flip_is_left_right_and_deterministic():
    x = torch.rand(6, 1, 4, 5, 3)
    a = flip_left_right(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, flip_left_right(x, torch.Generator().manual_seed(0))) and not torch.equal(a, x)
    assert all(torch.equal(a[i], x[i]) or torch.equal(a[i], x[i].flip(1)) for i in range(6))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(source="dicom"), "data.source"),
        (dict(image_size=4), "data.image_size"),
        (dict(num_subjects=2), "data.num_subjects"),
        (dict(age_range=(90, 20)), "data.age_range"),
        (dict(split=(0.5, 0.5, 0.5)), "data.split"),
        (dict(batch_size=0), "data.batch_size"),
        (dict(max_subjects=1), "data.max_subjects"),
        (dict(augment="yes"), "data.augment"),
        (dict(feature_columns="gm"), "data.feature_columns"),
        (dict(intensity_percentiles=(99, 1)), "data.intensity_percentiles"),
        (dict(spacing_mm=0), "data.spacing_mm"),
        (dict(source="nifti"), "data.csv"),
        (dict(source="nifti", csv="/nonexistent/participants.csv"), "data.csv"),
        (dict(source="nifti", root="/nonexistent/ixi"), "data.root"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, key, tmp_path):
    kwargs = {"root": str(tmp_path), **kwargs} if kwargs.get("source") != "nifti" else kwargs
    with pytest.raises((ValueError, FileNotFoundError), match=key.replace(".", r"\.")):
        BrainAgeDataModule(**kwargs)


def test_config_matches_the_constructor(tmp_path):
    args = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / "brainage.yaml"))
    assert args.pop("_target_") == "medrobust.datamodules.brainage.BrainAgeDataModule"
    assert args["root"] == "${paths.data_dir}/brainage"
    dm = BrainAgeDataModule(**{**args, "root": str(tmp_path)})
    assert dm.image_size == 32 and dm.num_subjects == 400 and dm.split == (0.7, 0.15, 0.15) and dm.data_train is None


# ------------------------------------------------------------------------------ nifti
def write_volume(path, data, affine=None):
    """A float32 NIfTI; default 2 mm voxels, RAS axes."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), path)


def head(rng, left_blob=False):
    """A bright ellipsoid in noise, 14 x 16 x 12 voxels; ``left_blob``: a brighter spot at high voxel x."""
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n) for n in (14, 16, 12)], indexing="ij")
    data = 100.0 * ((i**2 + j**2 + k**2) < 0.7) + rng.normal(0, 5, i.shape)
    if left_blob:
        data[10:13, 6:10, 4:8] += 300.0
    return data


@pytest.fixture
def ixi(tmp_path):
    """Six subjects as an IXI-like table: id, age, sex (text), a regional volume, an image path."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    lines = ["IXI_ID,Age,Sex,GM_Volume,T1"]
    for n in range(6):
        write_volume(tmp_path / "images" / f"IXI{n:03d}-T1.nii.gz", head(rng, left_blob=n == 0),
                     affine=np.diag([-2.0, -2.0, 2.0, 1.0]) if n == 0 else None)  # fmt: skip
        lines.append(f"IXI{n:03d},{30 + 8 * n}.5,{'MF'[n % 2]},{700 - 20 * n},images/IXI{n:03d}-T1.nii.gz")
    (tmp_path / "participants.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def nifti(root, **kwargs) -> BrainAgeDataModule:
    args = dict(source="nifti", root=str(root), cache_dir=str(root / "cache"), image_size=12, batch_size=4,
                split=(0.5, 0.25, 0.25), augment=False)  # fmt: skip
    return BrainAgeDataModule(**{**args, **kwargs})


def test_nifti_source_reads_ages_features_and_images(ixi):
    dm = ready(nifti(ixi))
    assert dm.intensity is None and dm.feature_names == ["GM_Volume"] and dm.num_features == 1
    assert sum(dm.split_counts.values()) == 6 and min(dm.split_counts.values()) >= 1
    by_id = {s: (a, v[0]) for ds in splits(dm).values() for s, a, v in zip(ds.subject_ids, ds.ages, ds.volumes_ml)}
    assert by_id["IXI002"] == (46.5, 660.0) and by_id["IXI005"] == (70.5, 600.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 1, 12, 12, 12) and batch["features"].shape == (3, 1)
    assert batch["label"].dtype == torch.float32 and 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    # IXI000 is stored left-right mirrored (x axis flipped): after RAS reorientation its blob is on the left
    ds = next(ds for ds in splits(dm).values() if "IXI000" in ds.subject_ids)
    image = ds[ds.subject_ids.index("IXI000")]["image"][0]
    assert image[:4].max() > 0.9 and image[8:].max() < 0.6
    # cached by file fingerprints: the same files read back; a touched file is read again
    path = dm.cache_path()
    assert ready(nifti(ixi)).cache_path() == path
    os.utime(ixi / "images" / "IXI003-T1.nii.gz", ns=(1, 1))
    assert nifti(ixi).cache_path() != path
    empty = ready(nifti(ixi, feature_columns=[]))
    assert empty.num_features == 0 and next(iter(empty.val_dataloader()))["features"].shape[1] == 0


IMAGE_2 = "images/IXI002-T1.nii.gz"


def rewrite_row(root, n, **fields):
    """Replace fields of subject ``n``'s row (0-based) in participants.csv."""
    lines = (root / "participants.csv").read_text().splitlines()
    header = lines[0].split(",")
    row = lines[n + 1].split(",")
    for key, value in fields.items():
        row[header.index(key)] = value
    lines[n + 1] = ",".join(row)
    (root / "participants.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: write_volume(r / IMAGE_2, np.random.rand(14, 16, 12, 3)), r"IXI002-T1\.nii\.gz.*3-D.*3 volumes"),
        (lambda r: write_volume(r / IMAGE_2, np.random.rand(14, 16)), r"IXI002-T1\.nii\.gz.*3-D"),
        (lambda r: write_volume(r / IMAGE_2, np.zeros((14, 16, 12))), r"IXI002-T1\.nii\.gz.*constant"),
        (lambda r: write_volume(r / IMAGE_2, np.full((14, 16, 12), np.nan)), r"IXI002-T1\.nii\.gz.*NaN"),
        (lambda r: (r / IMAGE_2).unlink(), r"row 4 \(subject 'IXI002'\).*IXI002-T1\.nii\.gz.*not found"),
        (lambda r: rewrite_row(r, 2, Age="n/a"), r"row 4 \(subject 'IXI002'\).*age 'n/a'"),
        (lambda r: rewrite_row(r, 2, Age=""), r"row 4 \(subject 'IXI002'\).*age ''"),
        (lambda r: rewrite_row(r, 2, IXI_ID="IXI001"), r"row 4 \(subject 'IXI001'\).*duplicate.*row 3"),
        (lambda r: (r / "participants.csv").write_text("IXI_ID,T1\nIXI000,images/IXI000-T1.nii.gz\n"),
         r"participants\.csv.*no age column"),
    ],
    ids=["4d", "2d", "empty", "nan", "missing-file", "age-text", "age-missing", "duplicate-id", "no-age-column"],
)
def test_nifti_bad_input_names_the_file_or_row(ixi, breakage, message):
    breakage(ixi)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ready(nifti(ixi))


def test_nifti_feature_column_must_hold_numbers(ixi):
    rewrite_row(ixi, 1, GM_Volume="big")
    with pytest.raises(ValueError, match=r"row 3 \(subject 'IXI001'\).*'GM_Volume' holds 'big'.*feature_columns"):
        nifti(ixi)  # a column of numbers with one bad cell is an error, not a column silently dropped
    assert nifti(ixi, feature_columns=[]).num_features == 0
    with pytest.raises(ValueError, match=r"row 3 \(subject 'IXI001'\).*'GM_Volume' holds 'big'"):
        nifti(ixi, feature_columns=["gm_volume"])
    with pytest.raises(ValueError, match=r"no feature 'wm_volume' column"):
        nifti(ixi, feature_columns=["wm_volume"])


def test_nifti_tsv_found_in_root_with_other_header_names(ixi):
    """OpenBHB-like: participants.tsv, participant_id / age / image columns, an absolute path, no volumes."""
    (ixi / "participants.csv").unlink()
    paths = [str(ixi / "images" / "IXI000-T1.nii.gz")] + [f"images/IXI{n:03d}-T1.nii.gz" for n in (1, 2, 3)]
    rows = [f"sub-{n}\t{25 + 9 * n}\t{path}" for n, path in enumerate(paths)]
    (ixi / "participants.tsv").write_text("participant_id\tAGE\timage\n" + "\n".join(rows) + "\n")
    dm = ready(nifti(ixi, split=(0.5, 0.5, 0.0)))
    assert dm.num_features == 0 and dm.split_counts == {"train": 2, "val": 2, "test": 0}
    assert sorted(everything(dm, "ages").tolist()) == [25, 34, 43, 52]
