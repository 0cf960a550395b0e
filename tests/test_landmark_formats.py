"""Real landmark formats on small folders the tests write (medrobust.data.landmark_examples): the ISBI 2015
cephalometric layout (bmp + two doctors' txt files) and NIfTI volumes with 3D Slicer .fcsv markups (RAS and LPS),
through the landmark DataModule."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medrobust.data.landmark_examples import ISBI_STEMS, JUNIOR_OFFSET, NAMES, SHAPE, subject_voxels, write_fcsv
from medrobust.data.landmark_examples import write_fcsv_scans, write_isbi
from medrobust.datamodules.landmarks import LandmarkDataModule


def ready(dm: LandmarkDataModule) -> LandmarkDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------ ISBI 2015
@pytest.fixture
def isbi(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "ISBI2015"
    return root, write_isbi(root)


def isbi_module(root: Path, **kwargs) -> LandmarkDataModule:
    return LandmarkDataModule(source="isbi2015", root=str(root), cache_dir=str(root.parent / "cache"),
                              **{"image_size": [30, 32], "batch_size": 2, **kwargs})  # fmt: skip


def test_isbi_mean_of_doctors_resized_with_spacing_and_their_disagreement(isbi):
    root, senior = isbi
    dm = ready(isbi_module(root))
    assert dm.num_landmarks == 19 and dm.landmark_names[0] == "sella" and dm.spatial_dims == 2
    for split, folder in (("train", "TrainingData"), ("val", "Test1Data"), ("test", "Test2Data")):
        ds = getattr(dm, f"data_{split}")
        assert ds.ids == ISBI_STEMS[folder]
        for i, stem in enumerate(ds.ids):
            mean_xy = senior[stem] + JUNIOR_OFFSET / 2
            rows, cols = (mean_xy[:, 1] + 0.5) * 30 / 60 - 0.5, (mean_xy[:, 0] + 0.5) * 32 / 48 - 0.5
            np.testing.assert_allclose(ds[i]["landmarks"].numpy(), np.stack([rows, cols], 1), atol=1e-5)
            np.testing.assert_allclose(ds[i]["spacing"].numpy(), [0.2, 0.15], atol=1e-6)  # 0.1 mm x (60/30, 48/32)
        assert dm.observer_mre_mm[split] == pytest.approx(0.1 * np.hypot(2, 2))
    assert "0.28 mm" in dm.summary_notes("test")[0]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 30, 32) and 0 <= batch["image"].min() and batch["image"].max() <= 1


def test_isbi_landmark_stays_on_its_image_feature_after_resizing(isbi):
    root, _ = isbi
    dm = ready(isbi_module(root, image_size=[24, 20]))
    for item in dm.data_train:
        image = item["image"][0].numpy() - 40 / 255
        target = item["landmarks"][0].numpy()
        r, c = np.meshgrid(np.arange(24.0), np.arange(20.0), indexing="ij")
        near = (np.abs(r - target[0]) < 4) & (np.abs(c - target[1]) < 4)
        w = np.where(near, np.clip(image, 0, None), 0)
        centroid = np.array([(w * r).sum(), (w * c).sum()]) / w.sum()
        assert np.linalg.norm(centroid - target) < 0.25


def truncate_landmarks(path: Path) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:18] + lines[19:]) + "\n")  # 18 landmarks, then the trailing lines


def replace_line(path: Path, index: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[index] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "target, breakage, message",
    [("AnnotationsByMD/400_junior/004.txt", lambda p: p.unlink(), "missing"),
     ("AnnotationsByMD/400_senior/002.txt", truncate_landmarks, "19 landmarks expected"),
     ("AnnotationsByMD/400_senior/005.txt", lambda p: replace_line(p, 4, "12,abc"), "non-numeric"),
     ("AnnotationsByMD/400_junior/003.txt", lambda p: replace_line(p, 2, "500,10"), "outside"),
     ("RawImage/Test2Data/006.bmp", lambda p: p.write_bytes(b"not a bitmap"), "unreadable")],
)  # fmt: skip
def test_isbi_bad_input_stops_naming_the_file(isbi, target, breakage, message):
    root, _ = isbi
    breakage(root / target)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(str(root / target)) + f".*{message}"):
        ready(isbi_module(root))


def test_isbi_root_and_folders_are_checked(isbi, tmp_path):
    root, _ = isbi
    with pytest.raises(FileNotFoundError, match="data.root"):
        isbi_module(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data.folders"):
        isbi_module(root, folders={"train": "TrainingData", "val": "TrainingData", "test": "Test2Data"})
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "RawImage" / "Extra"))):
        ready(isbi_module(root, folders={"train": ["TrainingData", "Extra"], "val": "Test1Data", "test": "Test2Data"}))


# ------------------------------------------------------------------------------ NIfTI + 3D Slicer markups
@pytest.fixture
def scans(tmp_path) -> Path:
    """Four subjects, markups in RAS (``0``, ``RAS``) and LPS (``LPS``, ``1``), one listed in reversed order; a
    bright blob at each landmark; subjects.csv with a split column."""
    write_fcsv_scans(tmp_path)
    return tmp_path


def fcsv_module(folder: Path, **kwargs) -> LandmarkDataModule:
    return LandmarkDataModule(source="fcsv", csv=str(folder / "subjects.csv"), cache_dir=str(folder / "cache"),
                              **{"image_size": [16, 20, 24], "batch_size": 2, **kwargs})  # fmt: skip


def canonical(voxels: np.ndarray) -> np.ndarray:
    """Stored (i, j, k) -> the RAS-ordered volume's (x, y, z) voxel: (15 - k, i, j)."""
    return np.stack([SHAPE[2] - 1 - voxels[:, 2], voxels[:, 0], voxels[:, 1]], 1)


def test_fcsv_ras_and_lps_markups_map_through_the_affine(scans):
    dm = ready(fcsv_module(scans))
    assert dm.landmark_names == NAMES and dm.spatial_dims == 3 and dm.intensity is None
    items = {x["id"]: x for ds in (dm.data_train, dm.data_val, dm.data_test) for x in ds}
    assert [x["id"] for x in dm.data_train] == ["sub0", "sub1"] and [x["id"] for x in dm.data_test] == ["sub3"]
    for s in range(4):
        item = items[f"sub{s}"]
        np.testing.assert_allclose(item["landmarks"].numpy(), canonical(subject_voxels(s)), atol=1e-4)
        np.testing.assert_allclose(item["spacing"].numpy(), [2.0, 1.5, 2.5])
        image = item["image"][0].numpy()
        for v in np.rint(item["landmarks"].numpy()).astype(int):  # the blob is where the landmark says
            assert image[tuple(v)] > 0.8
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, 16, 20, 24)


def test_fcsv_resized_landmarks_scale_and_keep_mm(scans):
    dm = ready(fcsv_module(scans, image_size=8, split=(0.5, 0.25, 0.25)))
    item = dm.data_train[0]
    s = int(item["id"][-1])
    np.testing.assert_allclose(item["landmarks"].numpy(), (canonical(subject_voxels(s)) + 0.5) * [0.5, 0.4, 1 / 3]
                               - 0.5, atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(item["spacing"].numpy(), [4.0, 3.75, 7.5])  # mm per voxel of 16/8, 20/8, 24/8


def test_fcsv_subject_column_keeps_a_subjects_scans_together(scans):
    lines = (scans / "subjects.csv").read_text().splitlines()
    rows = ["image,markups,subject"] + [",".join(line.split(",")[:2] + [p]) for line, p in
                                        zip(lines[1:], ["p0", "p0", "p1", "p2"])]  # fmt: skip
    (scans / "subjects.csv").write_text("\n".join(rows) + "\n")
    dm = ready(fcsv_module(scans, split=(0.6, 0.4, 0.0)))
    assert dm.split_counts == {"train": 2, "val": 1, "test": 0} and len(dm.data_test) == 0
    splits = [ds.subject_ids for ds in (dm.data_train, dm.data_val)]
    assert sum(s.count("p0") for s in splits) == 2 and any(s.count("p0") == 2 for s in splits)  # together


def break_nifti(path: Path) -> None:
    path.write_bytes(b"\x1f\x8b not really gzip")


@pytest.mark.parametrize(
    "target, breakage, message",
    [("sub2.fcsv", lambda p: p.unlink(), "missing"),
     ("sub1.fcsv", lambda p: p.write_text("\n".join(p.read_text().splitlines()[:-1]) + "\n"), "expected 3"),
     ("sub3.fcsv", lambda p: p.write_text(p.read_text().replace(",0,0,0,1,1,1,0,AC", "x,0,0,0,1,1,1,0,AC")),
      "non-numeric"),
     ("sub2.fcsv", lambda p: write_fcsv(p, NAMES, np.array([[0.0, 0, 0], [0, 0, 0], [500, 0, 0]]), "RAS"),
      "'GENU'.*outside"),
     ("sub3.nii.gz", break_nifti, "unreadable"),
     ("sub2.nii.gz", lambda p: p.unlink(), "missing")],
)  # fmt: skip
def test_fcsv_bad_input_stops_naming_the_file(scans, target, breakage, message):
    breakage(scans / target)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(str(scans / target)) + f".*{message}"):
        ready(fcsv_module(scans))


def test_resize_smooths_before_shrinking():
    """Stripes finer than the new pixels average out instead of aliasing into a coarse pattern."""
    from medrobust.data.landmark_formats import resize

    stripes = np.tile((np.arange(96) % 3 == 0).astype(np.float32), (8, 1))  # period 3 px along columns
    small = resize(stripes, (8, 24))  # 4x smaller: every new pixel covers more than a period
    assert abs(small.mean() - 1 / 3) < 0.02 and small.std() < 0.05
