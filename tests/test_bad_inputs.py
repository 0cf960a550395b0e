"""Bad input to the two real-data readers stops the run before training, naming the file (and row / column / tag)
and what was expected: the LIDC-IDRI DICOM tree (``task=lidc data.source=dicom``) and the brain-age NIfTI volumes
and participants table (``task=brainage data.source=nifti``).

Each case writes a small real input (DICOM slices with pydicom, NIfTI with nibabel, a CSV), breaks one thing and
builds the datamodule (``prepare_data`` + ``setup``, no training).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hydra.utils import instantiate
from pydicom.uid import generate_uid

from conftest import compose_config, run_script
from medrobust.data.lidc_dicom import DicomFileError, DicomSeriesError, fingerprint_tree, index_tree
from medrobust.datamodules.brainage import BrainAgeDataModule
from medrobust.datamodules.lidc import LIDCDataModule
from test_brainage_data import IMAGE_2, head, ixi, nifti, rewrite_row, write_volume  # noqa: F401 (ixi: a fixture)
from test_lidc_dicom import lidc_dicom_tree  # noqa: F401 (a fixture)


# ------------------------------------------------------------------------------ LIDC DICOM
def by_z(root: Path) -> list[Path]:
    """The tree's slice files, lowest z first."""
    files = sorted(root.rglob("*.dcm"))
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def edit_slice(path: Path, change, new_path: Path | None = None) -> Path:
    """Apply ``change(dataset)`` to a slice and save it (at ``new_path``, a new image, when given)."""
    ds = pydicom.dcmread(path)
    change(ds)
    if new_path is not None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(new_path or path, enforce_file_format=True)
    return new_path or path


def drop(*tags):
    return lambda ds: [delattr(ds, t) for t in tags]


def set_pixels(value=None, offset=None):
    def change(ds):
        pixels = ds.pixel_array
        ds.PixelData = (np.full_like(pixels, value) if value is not None else pixels + offset).tobytes()

    return change


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-5000])
    return path


def blank_series(root: Path) -> Path:
    for path in by_z(root):
        edit_slice(path, set_pixels(value=0))
    return by_z(root)[0].parent  # the first slice a patch reads is named


def broken_link(root: Path) -> Path:
    link = by_z(root)[0].parent / "1-999.dcm"
    link.symlink_to(root / "gone" / "1-999.dcm")
    return link


def different_duplicate(root: Path) -> Path:
    low = by_z(root)[0]
    edit_slice(low, set_pixels(offset=30), new_path=low.with_name("1-dup.dcm"))
    return low  # the error names both files: this one is checked, the copy by its name below


def same_image_twice(root: Path) -> Path:
    low = by_z(root)[0]
    shutil.copy(low, low.parent.parent / "copy.dcm")
    return low


# (id, breakage of the tree -> the file the message must name, error type, what the message must say)
DICOM_CASES = [
    ("no-rescale", lambda r: edit_slice(by_z(r)[0], drop("RescaleSlope", "RescaleIntercept")), DicomFileError,
     r"lacks RescaleSlope and RescaleIntercept; expected both"),
    ("no-intercept", lambda r: edit_slice(by_z(r)[-1], drop("RescaleIntercept")), DicomFileError,
     r"lacks RescaleIntercept; expected both"),
    ("slope-zero", lambda r: edit_slice(by_z(r)[0], lambda ds: setattr(ds, "RescaleSlope", 0)), DicomFileError,
     r"RescaleSlope 0 .*expected finite values and a slope other than 0"),
    ("blank-series", blank_series, DicomFileError, r"blank slice, every pixel stores 0; expected a CT image"),
    ("truncated-outside-patch", lambda r: truncate(by_z(r)[0]), DicomFileError,
     r"truncated, .*expected a complete file"),
    ("short-pixel-data", lambda r: edit_slice(by_z(r)[0], lambda ds: setattr(ds, "Rows", 600)), DicomFileError,
     r"PixelData holds 524288 bytes; expected Rows x Columns"),
    ("multi-frame", lambda r: edit_slice(by_z(r)[0], lambda ds: setattr(ds, "NumberOfFrames", 2)), DicomFileError,
     r"NumberOfFrames 2, .*expected one grey-level 2-D slice"),
    ("rgb", lambda r: edit_slice(by_z(r)[0], lambda ds: setattr(ds, "SamplesPerPixel", 3)), DicomFileError,
     r"SamplesPerPixel 3; expected one grey-level 2-D slice"),
    ("no-position", lambda r: edit_slice(by_z(r)[0], drop("ImagePositionPatient")), DicomFileError,
     r"lacks ImagePositionPatient"),
    ("broken-symlink", broken_link, FileNotFoundError, r"cannot read it \(a broken symbolic link to .*\); expected"),
    ("two-images-one-z", different_duplicate, DicomSeriesError,
     r"two different images at z = .*1-dup\.dcm.*expected one image per slice position"),
    ("same-image-twice", same_image_twice, DicomFileError, r"same image \(SOPInstanceUID .*expected each slice once"),
]  # fmt: skip


def copy_tree(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "LIDC-IDRI", symlinks=True))


def dicom_dm(root: Path, db: str, tmp_path: Path, **kwargs) -> LIDCDataModule:
    return LIDCDataModule(source="dicom", root=str(root), cache_dir=str(tmp_path / "cache"), annotation_db=db,
                          patch_size=16, **kwargs)  # fmt: skip


@pytest.mark.parametrize("breakage, error, expected", [c[1:] for c in DICOM_CASES], ids=[c[0] for c in DICOM_CASES])
def test_bad_dicom_tree_stops_naming_the_file(lidc_dicom_tree, lidc_mini_db, tmp_path, breakage, error, expected):
    root = copy_tree(lidc_dicom_tree[0], tmp_path)
    named = breakage(root)
    dm = dicom_dm(root, lidc_mini_db, tmp_path, split=(1.0, 0.0, 0.0))  # the tree holds one nodule
    with pytest.raises(error) as info:
        dm.prepare_data()
        dm.setup("fit")
    message = str(info.value)
    assert str(named) in message and re.search(expected, message), message


def test_one_nodule_tree_stops_saying_what_the_split_needs(lidc_dicom_tree, lidc_mini_db, tmp_path):
    dm = dicom_dm(lidc_dicom_tree[0], lidc_mini_db, tmp_path)  # split 0.7 / 0.15 / 0.15
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"data\.split \[0\.7, 0\.15, 0\.15\]: 1 nodule\(s\) of 1 patient\(s\) under "
                                         r"data\.root .*leave val and test empty.*needs at least 3 patients"):
        dm.setup("fit")
    assert dm.data_train is None


def test_identical_duplicate_slice_is_dropped_naming_both_files(lidc_dicom_tree, lidc_mini_db, tmp_path, caplog):
    root = copy_tree(lidc_dicom_tree[0], tmp_path)
    low = by_z(root)[0]
    copy = edit_slice(low, lambda ds: setattr(ds, "InstanceNumber", 999), new_path=low.with_name("1-dup.dcm"))
    with caplog.at_level(logging.WARNING, logger="medrobust"):
        dicom_dm(root, lidc_mini_db, tmp_path, split=(1.0, 0.0, 0.0)).setup("fit")
    warning = next(r.getMessage() for r in caplog.records if "same image" in r.getMessage())
    assert str(low) in warning and str(copy) in warning and "kept the first" in warning


def _walk_unprivileged(root: str, queue) -> None:
    """In a forked child: drop root's right to read everything (tests run as root here), then walk the tree."""
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    out = []
    for walk in (fingerprint_tree, index_tree):
        try:
            walk(root)
            out.append("no error")
        except Exception as exc:  # the message is what the test checks
            out.append(f"{type(exc).__name__}: {exc}")
    queue.put(out)


def test_unreadable_series_folder_stops_naming_it():
    """A series folder without read permission: ``os.walk`` alone skips it. As root chmod blocks nothing, so the
    walk runs in a forked child that has dropped to user nobody, where the permission really denies the listing."""
    root = Path(tempfile.mkdtemp(prefix="lidc-perm-", dir="/tmp"))
    try:
        root.chmod(0o755)
        (root / "LIDC-IDRI-0001" / "series-a").mkdir(parents=True)
        locked = root / "LIDC-IDRI-0001" / "series-b"
        locked.mkdir()
        (locked / "1-001.dcm").write_bytes(b"\0" * 200)
        for folder in (root / "LIDC-IDRI-0001", root / "LIDC-IDRI-0001" / "series-a"):
            folder.chmod(0o755)
        locked.chmod(0o000)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_walk_unprivileged, args=(str(root), queue))
        child.start()
        results = queue.get(timeout=60)
        child.join(10)
    finally:
        locked.chmod(0o755)
        shutil.rmtree(root)
    for result in results:  # the cache fingerprint and the header index both stop
        assert result.startswith("PermissionError") and f"{locked}: cannot read it (Permission denied)" in result
        assert "expected a folder of the DICOM tree under data.root, readable by this process" in result


# ------------------------------------------------------------------------------ brain age NIfTI + CSV
def write_gz(path: Path, data: bytes) -> Path:
    path.unlink()
    path.write_bytes(data)
    return path


def break_link(root: Path) -> None:
    (root / IMAGE_2).unlink()
    (root / IMAGE_2).symlink_to(root / "gone.nii.gz")


def folder_instead(root: Path) -> None:
    (root / IMAGE_2).unlink()
    (root / IMAGE_2).mkdir()


def no_path_column(root: Path) -> None:
    lines = (root / "participants.csv").read_text().replace(",T1", ",scan").splitlines()
    (root / "participants.csv").write_text("\n".join(lines) + "\n")


# (id, breakage, error type, the message: file (and row / column) and what was expected)
NIFTI_CASES = [
    ("blank-feature-cell", lambda r: rewrite_row(r, 2, GM_Volume=""), ValueError,
     r"participants\.csv row 4 \(subject 'IXI002'\): feature column 'GM_Volume' holds '', not a number .*expected "
     r"a finite number in every row"),
    ("na-feature-cell", lambda r: rewrite_row(r, 3, GM_Volume="n/a"), ValueError,
     r"participants\.csv row 5 \(subject 'IXI003'\): feature column 'GM_Volume' holds 'n/a'"),
    ("inf-feature-cell", lambda r: rewrite_row(r, 0, GM_Volume="inf"), ValueError,
     r"participants\.csv row 2 \(subject 'IXI000'\): feature column 'GM_Volume' holds 'inf'"),
    ("age-out-of-range", lambda r: rewrite_row(r, 2, Age="200"), ValueError,
     r"participants\.csv row 4 \(subject 'IXI002'\): age '200' in column 'Age' is not a number in \[0, 150\]"),
    ("empty-id", lambda r: rewrite_row(r, 2, IXI_ID=""), ValueError,
     r"participants\.csv row 4: empty subject id in column 'IXI_ID'"),
    ("stray-comma", lambda r: rewrite_row(r, 2, Sex="M,F"), ValueError,
     r"participants\.csv row 4: 6 fields, but the header has 5; expected one value per column"),
    ("not-utf8", lambda r: (r / "participants.csv").write_bytes("IXI_ID,Age,Sex,GM_Volume,T1\nIXI000,30,Zoë,1,x\n"
                                                                .encode("latin-1")), ValueError,
     r"participants\.csv: cannot read the table \(UnicodeDecodeError: .*expected UTF-8 text"),
    ("no-path-column", no_path_column, ValueError, r"participants\.csv: no image path column; expected one of"),
    ("truncated-gz", lambda r: write_gz(r / IMAGE_2, (r / IMAGE_2).read_bytes()[:3000]), ValueError,
     r"IXI002-T1\.nii\.gz: cannot read the voxel data \(EOFError: .*expected a complete NIfTI file"),
    ("not-nifti", lambda r: write_gz(r / IMAGE_2, b"<html>not found</html>" * 30), ValueError,
     r"IXI002-T1\.nii\.gz: cannot read as NIfTI \(ImageFileError: .*expected a \.nii or \.nii\.gz"),
    ("broken-symlink", break_link, FileNotFoundError,
     r"participants\.csv row 4 \(subject 'IXI002'\): image 'images/IXI002-T1\.nii\.gz' in column 'T1' not found "
     r"\(.*IXI002-T1\.nii\.gz is a broken symbolic link to .*gone\.nii\.gz'\); expected a NIfTI file"),
    ("folder-not-file", folder_instead, FileNotFoundError,
     r"row 4 \(subject 'IXI002'\): image .*not found \(.*IXI002-T1\.nii\.gz is a folder\)"),
    ("complex-voxels", lambda r: nib.save(nib.Nifti1Image(head(np.random.default_rng(0)).astype(np.complex64),
                                                          np.eye(4)), r / IMAGE_2), ValueError,
     r"IXI002-T1\.nii\.gz: voxel type complex64; expected real grey values"),
    ("inf-voxels", lambda r: write_volume(r / IMAGE_2, np.where(head(np.random.default_rng(0)) > 50, np.inf, 1.0)),
     ValueError, r"IXI002-T1\.nii\.gz: the volume holds NaN or infinite values"),
    ("zero-size-axis", lambda r: write_volume(r / IMAGE_2, np.zeros((14, 0, 12))), ValueError,
     r"IXI002-T1\.nii\.gz: expected one 3-D T1 volume, got shape \[14, 0, 12\]"),
]  # fmt: skip


@pytest.mark.parametrize("breakage, error, expected", [c[1:] for c in NIFTI_CASES], ids=[c[0] for c in NIFTI_CASES])
def test_bad_nifti_input_stops_naming_the_file(ixi, breakage, error, expected):
    breakage(ixi)
    with pytest.raises(error, match=expected):
        dm = nifti(ixi)
        dm.prepare_data()
        dm.setup("fit")


def test_image_gone_after_the_table_was_read_names_the_subject(ixi):
    dm = nifti(ixi)
    (ixi / IMAGE_2).unlink()
    with pytest.raises(FileNotFoundError, match=r"participants\.csv \(subject 'IXI002'\): image .*IXI002-T1\.nii\.gz"
                                                r"' cannot be read \(No such file or directory\)"):
        dm.prepare_data()


def test_relative_csv_is_looked_up_in_the_root(ixi, tmp_path_factory, monkeypatch):
    elsewhere = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(elsewhere)
    assert nifti(ixi, csv="participants.csv").table.csv_path == ixi / "participants.csv"
    assert nifti(ixi, csv=str(ixi / "participants.csv")).num_features == 1  # absolute: as given
    shutil.move(ixi / "participants.csv", elsewhere / "table.csv")  # only in the working directory: not used
    with pytest.raises(FileNotFoundError, match=r"data\.csv: no participants table at .*table\.csv'; a file "
                                                r"'table\.csv' exists in the working directory .*pass its absolute"):
        nifti(ixi, csv="table.csv")


# ------------------------------------------------------------------------------ caches and the command line
def test_real_data_caches_follow_the_data_dir_and_the_root(lidc_dicom_tree, lidc_mini_db, ixi, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """``MEDROBUST_DATA_DIR`` moves the real-data caches, and two data roots never share one."""
    monkeypatch.setenv("MEDROBUST_DATA_DIR", str(tmp_path / "data"))
    other = copy_tree(lidc_dicom_tree[0], tmp_path)  # the same files under another root

    def lidc(root):
        cfg = compose_config("train", ["task=lidc", "data.source=dicom", f"data.root={root}",
                                       f"data.annotation_db={lidc_mini_db}"], tmp_path / "run")  # fmt: skip
        return instantiate(cfg.data)

    paths = [lidc(root).cache_path() for root in (lidc_dicom_tree[0], other)]
    assert all(p.parent == tmp_path / "data" / "lidc" for p in paths) and paths[0] != paths[1]
    cfg = compose_config("train", ["task=brainage", "data.source=nifti", f"data.root={ixi}",
                                   "data.csv=participants.csv"], tmp_path / "run")  # fmt: skip
    brain = instantiate(cfg.data)
    assert isinstance(brain, BrainAgeDataModule) and brain.cache_path().parent == tmp_path / "data" / "brainage"


@pytest.mark.slow
def test_train_stops_before_training_naming_the_csv_row_and_column(ixi, tiny_for, tmp_path):
    """The README's command (relative ``data.csv``) on a table with one blank volume cell: exit 1, the message
    names the table, row and column, and no epoch ran."""
    rewrite_row(ixi, 2, GM_Volume="")
    proc = run_script("train.py", [*tiny_for("brainage"), "data.source=nifti", f"data.root={ixi}",
                                   "data.csv=participants.csv", "model=brain_hybrid", "data.image_size=12",
                                   f"paths.log_dir={tmp_path / 'logs'}"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0
    assert f"{ixi / 'participants.csv'} row 4 (subject 'IXI002'): feature column 'GM_Volume' holds ''" in proc.stderr
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def test_few_patients_still_fill_every_split_asked_for():
    """Three patients, one with most nodules: each split gets a patient (the nodule shares alone would leave test
    empty); two patients for three splits cannot, and the datamodule then stops (above)."""
    from medrobust.datamodules.lidc import split_patients

    pids = ["A"] * 8 + ["B", "C"]
    for seed in range(5):
        assign = split_patients(pids, np.array([1] * 8 + [0, 0]), (0.7, 0.15, 0.15), seed)
        assert sorted(set(assign.tolist())) == [0, 1, 2] and len(set(assign[:8].tolist())) == 1
    assert len(set(split_patients(pids[:9], np.zeros(9), (0.7, 0.15, 0.15), 0).tolist())) == 2
