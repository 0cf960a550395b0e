"""Bad input to the three later real-data readers stops the run before training, naming the file (or table row /
``dataset.json`` entry) and what was expected: the ISBI 2015 layout (``task=isbi2015``), NIfTI volumes with 3D
Slicer markups listed in a subjects table (``task=landmarks data.source=fcsv``) and Decathlon folders
(``task=msd``). ``tests/test_bad_inputs.py`` walks the LIDC DICOM and brain-age NIfTI readers the same way.

Each case copies a small valid folder that the example writers made once for this module, breaks one thing and
builds the datamodule from the composed config as ``train.py`` does (``instantiate`` + ``prepare_data`` +
``setup``, no training).
"""

from __future__ import annotations

import encodings.utf_8_sig  # noqa: F401 -- loaded here: the unprivileged child cannot import from /root
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

import medrobust.data.lidc_dicom  # noqa: F401 (read errors word as it does; imported before a child drops root)
from conftest import DEBUG, compose_config
from medrobust.data.landmark_examples import AFFINE, ISBI_SHAPE, NAMES, SHAPE, subject_voxels, write_fcsv
from medrobust.data.landmark_examples import write_fcsv_scans, write_isbi
from medrobust.data.msd import DatasetError
from medrobust.data.msd_example import write_example_dataset

RAW, MD = "RawImage", "AnnotationsByMD"
READERS = {  # reader -> (the overrides a user types for a data folder, the data key naming the folder)
    "isbi2015": (lambda root: ["task=isbi2015", f"data.root={root}"], "root"),
    "fcsv": (lambda root: ["task=landmarks", "data.source=fcsv", f"data.csv={root / 'subjects.csv'}",
                           "data.landmark_names=[AC,PC,GENU]"], "csv"),  # fmt: skip
    "msd": (lambda root: ["task=msd", f"data.root={root}"], "root"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """One small valid folder per reader, written once: every case breaks a copy."""
    base = tmp_path_factory.mktemp("good")
    write_isbi(base / "isbi")
    write_fcsv_scans(base / "fcsv")
    write_example_dataset(base / "msd", "msd", n_cases=3, shape=(8, 8, 8))
    return {"isbi2015": base / "isbi", "fcsv": base / "fcsv", "msd": base / "msd"}


@pytest.fixture(scope="module")
def configs(good, tmp_path_factory) -> dict:
    """Each reader's config composed once, as ``python train.py <overrides> debug=tiny`` composes it."""
    run = tmp_path_factory.mktemp("run")
    return {reader: compose_config("train", [*overrides(good[reader]), DEBUG], run)
            for reader, (overrides, _) in READERS.items()}  # fmt: skip


def build(cfg, reader: str, root: Path, cache: Path):
    """What ``train.py`` does with the data before the first epoch, on the folder ``root``; an error in the
    constructor is the reader's own (Hydra wraps it)."""
    key = READERS[reader][1]
    try:
        dm = instantiate(cfg.data, _convert_="all", cache_dir=str(cache),
                         **{key: str(root / "subjects.csv" if key == "csv" else root)})  # fmt: skip
    except InstantiationException as exc:
        raise exc.__cause__ from None
    dm.prepare_data()
    dm.setup("fit")
    return dm


def stops(configs, good, reader, tmp_path, breakage, error, expected) -> None:
    root = Path(shutil.copytree(good[reader], tmp_path / good[reader].name))
    named = breakage(root)
    with pytest.raises(error) as info:
        build(configs[reader], reader, root, tmp_path / "cache")
    message = str(info.value)
    assert str(named) in message and re.search(expected, message), message


# ------------------------------------------------------------------------------ breakages any reader uses
def cut(path: Path) -> Path:
    """A truncated download: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def html(path: Path) -> Path:
    """An error page saved under the file's name."""
    path.write_bytes(b"<html><body>404 Not Found</body></html>\n" * 20)
    return path


def remove(path: Path) -> Path:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return path


def edit_lines(path: Path, change) -> Path:
    lines = path.read_text().splitlines()
    change(lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def set_line(i: int, text: str):
    return lambda lines: lines.__setitem__(i, text)


def rewrite_voxels(path: Path, change, affine=None) -> Path:
    old = nib.load(path)
    nib.save(nib.Nifti1Image(change(np.asarray(old.dataobj)), old.affine if affine is None else affine), path)
    return path


def nan_where_bright(data: np.ndarray, value=np.nan) -> np.ndarray:
    return np.where(data > np.median(data), value, data).astype(np.float32)


# ------------------------------------------------------------------------------ ISBI 2015
def bmp(root: Path, folder: str, stem: str) -> Path:
    return root / RAW / folder / f"{stem}.bmp"


def txt(root: Path, stem: str, doctor: str = "400_senior") -> Path:
    return root / MD / doctor / f"{stem}.txt"


def blank_bmp(path: Path) -> Path:
    Image.fromarray(np.full(ISBI_SHAPE, 40, np.uint8)).save(path)
    return path


def orphan_annotation(root: Path) -> Path:
    remove(bmp(root, "Test2Data", "006"))
    return txt(root, "006")


def empty_folder(root: Path) -> Path:
    for path in (root / RAW / "Test2Data").glob("*.bmp"):
        path.unlink()
    return root / RAW / "Test2Data"


# (id, breakage of the folder -> the path the message must name, error type, what the message must say)
ISBI_CASES = [
    ("truncated-bmp", lambda r: cut(bmp(r, "TrainingData", "002")), ValueError,
     r"unreadable \(OSError: image file is truncated.*\); expected a complete bitmap radiograph"),
    ("not-a-bitmap", lambda r: html(bmp(r, "Test1Data", "003")), ValueError,
     r"unreadable \(UnidentifiedImageError: .*\); expected a complete bitmap radiograph"),
    ("blank-image", lambda r: blank_bmp(bmp(r, "Test1Data", "004")), ValueError,
     r"blank image \(\[60, 48\] pixels, every pixel 40\); expected a radiograph"),
    ("image-without-annotation", lambda r: remove(txt(r, "003", "400_junior")), FileNotFoundError,
     r"annotation file missing; expected one per image, here for .*Test1Data/003\.bmp"),
    ("annotation-without-image", orphan_annotation, FileNotFoundError,
     r"no radiograph RawImage/<folder>/006\.bmp for this annotation; expected one image per annotation file"),
    ("image-in-two-folders", lambda r: Path(shutil.copy(bmp(r, "TrainingData", "001"), bmp(r, "Test1Data", "001"))),
     ValueError, r"image 001 is also .*001\.bmp; expected each radiograph once"),
    ("missing-image-folder", lambda r: remove(r / RAW / "Test1Data"), FileNotFoundError,
     r"ISBI 2015 image folder missing \(expected RawImage/Test1Data in data\.root\)"),
    ("empty-image-folder", empty_folder, FileNotFoundError, r"no \.bmp images; expected the radiographs NNN\.bmp"),
    ("missing-doctor-folder", lambda r: remove(r / MD / "400_junior"), FileNotFoundError,
     r"annotation folder missing; expected AnnotationsByMD/400_junior/NNN\.txt for every image"),
    ("18-landmarks", lambda r: edit_lines(txt(r, "002"), lambda lines: lines.__delitem__(slice(18, None))),
     ValueError, r"18 landmarks, expected 19 lines 'x,y' \(pixels\), one per landmark"),
    ("one-number-line", lambda r: edit_lines(txt(r, "001"), set_line(2, "12")), ValueError,
     r"line 3 is '12', expected 'x,y' \(19 landmarks expected, found 2\)"),
    ("non-numeric-line", lambda r: edit_lines(txt(r, "005"), set_line(4, "12,abc")), ValueError,
     r"line 5: non-numeric or non-finite coordinate in '12,abc'; expected 'x,y' pixel numbers"),
    ("nan-coordinate", lambda r: edit_lines(txt(r, "001", "400_junior"), set_line(1, "nan,7")), ValueError,
     r"line 2: non-numeric or non-finite coordinate in 'nan,7'"),
    ("outside-image", lambda r: edit_lines(txt(r, "003", "400_junior"), set_line(2, "500,10")), ValueError,
     r"landmark 'orbitale' at voxel \[10\.0, 500\.0\] lies outside the image of shape \[60, 48\]; expected every "
     r"landmark on its image"),
]  # fmt: skip


@pytest.mark.parametrize("breakage, error, expected", [c[1:] for c in ISBI_CASES], ids=[c[0] for c in ISBI_CASES])
def test_bad_isbi2015_input_stops_naming_the_file(configs, good, tmp_path, breakage, error, expected):
    stops(configs, good, "isbi2015", tmp_path, breakage, error, expected)


# ------------------------------------------------------------------------------ NIfTI + 3D Slicer markups
def table(folder: Path) -> Path:
    return folder / "subjects.csv"


def edit_table(change):
    """A breakage that edits the table's rows (lists of cells; row 0 the header) and names the table."""

    def breakage(folder: Path) -> Path:
        rows = [line.split(",") for line in table(folder).read_text().splitlines()]
        change(rows)
        table(folder).write_text("\n".join(",".join(row) for row in rows) + "\n")
        return table(folder)

    return breakage


def set_cell(row: int, column: int, value: str):
    return edit_table(lambda rows: rows[row].__setitem__(column, value))


def scan(folder: Path, s: int = 0) -> Path:
    return folder / f"sub{s}.nii.gz"


def write_scan(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def rewrite_markups(folder: Path, s: int, names=NAMES, keep=slice(None), move=(0.0, 0.0, 0.0), system="RAS") -> Path:
    """Subject ``s``'s markups written again: ``keep`` of them, named ``names``, moved by ``move`` mm."""
    ras = subject_voxels(s) @ AFFINE[:3, :3].T + AFFINE[:3, 3] + np.asarray(move)
    write_fcsv(folder / f"sub{s}.fcsv", list(names)[keep], ras[keep], system)
    return folder / f"sub{s}.fcsv"


def folder_instead(path: Path) -> Path:
    path.unlink()
    path.mkdir()
    return path


def latin1_table(folder: Path) -> Path:
    table(folder).write_bytes(table(folder).read_text().replace("train", "träin", 1).encode("latin-1"))
    return table(folder)


FCSV_CASES = [
    ("no-markups-column", set_cell(0, 1, "landmarks"), ValueError,
     r"subjects\.csv: needs columns 'image' and 'markups' .*got \['image', 'landmarks', 'split'\]"),
    ("header-only", edit_table(lambda rows: rows.__delitem__(slice(1, None))), ValueError,
     r"subjects\.csv: no subjects, only the header; expected one row per scan"),
    ("image-file-missing", lambda f: remove(scan(f, 2)), FileNotFoundError,
     r"subjects\.csv row 4: image 'sub2\.nii\.gz' not found \(.*sub2\.nii\.gz missing\); expected a NIfTI volume"),
    ("markups-file-missing", lambda f: remove(f / "sub1.fcsv"), FileNotFoundError,
     r"subjects\.csv row 3: markups 'sub1\.fcsv' not found .*; expected a 3D Slicer \.fcsv markups file"),
    ("markups-a-folder", lambda f: folder_instead(f / "sub1.fcsv"), FileNotFoundError,
     r"row 3: markups 'sub1\.fcsv' not found \(.*sub1\.fcsv is a folder\)"),
    ("empty-image-cell", set_cell(2, 0, ""), ValueError,
     r"subjects\.csv row 3: empty image cell; expected the path of a NIfTI volume"),
    ("scan-listed-twice", lambda f: set_cell(4, 0, "sub0.nii.gz")(f).with_name("sub0.nii.gz"), ValueError,
     r"subjects\.csv row 5: image .*sub0\.nii\.gz is already listed on row 2; expected each scan once"),
    ("subject-in-two-splits", edit_table(lambda rows: [r.append(v) for r, v in zip(rows, ("subject", "p0", "p1", "p2",
                                                                                            "p0"))]), ValueError,
     r"subjects\.csv row 5 \(subject 'p0'\): split 'test', but row 2 puts the subject in 'train'; expected all of a "
     r"subject's scans in one split"),
    ("unknown-split", set_cell(2, 2, "training"), ValueError,
     r"subjects\.csv row 3: split 'training'; expected train, val or test"),
    ("empty-split-cell", set_cell(3, 2, ""), ValueError,
     r"subjects\.csv row 4: empty split cell; expected train, val or test in every row"),
    ("stray-separator", edit_table(lambda rows: rows[2].append("x")), ValueError,
     r"subjects\.csv row 3: 4 fields, but the header has 3; expected one value per column"),
    ("table-not-utf8", latin1_table, ValueError,
     r"subjects\.csv: cannot read the table \(UnicodeDecodeError: .*\); expected UTF-8 text, comma-separated"),
    ("truncated-gz", lambda f: cut(scan(f)), ValueError,
     r"sub0\.nii\.gz: unreadable \(EOFError: .*\); expected a complete \.nii or \.nii\.gz volume"),
    ("not-nifti", lambda f: html(scan(f)), ValueError,
     r"sub0\.nii\.gz: unreadable \(ImageFileError: .*\); expected a complete \.nii or \.nii\.gz volume"),
    ("2-d-volume", lambda f: write_scan(scan(f), np.ones((20, 24), np.float32)), ValueError,
     r"sub0\.nii\.gz: expected one 3-D .*volume, got shape \[20, 24\]"),
    ("4-d-volume", lambda f: write_scan(scan(f), np.ones((*SHAPE, 2), np.float32)), ValueError,
     r"sub0\.nii\.gz: expected one 3-D .*volume, got shape \[20, 24, 16, 2\] \(2 volumes: pick one\)"),
    ("nan-voxels", lambda f: rewrite_voxels(scan(f), nan_where_bright), ValueError,
     r"sub0\.nii\.gz: the volume holds NaN or infinite values; expected finite grey values"),
    ("inf-voxels", lambda f: rewrite_voxels(scan(f), lambda d: nan_where_bright(d, np.inf)), ValueError,
     r"sub0\.nii\.gz: the volume holds NaN or infinite values"),
    ("constant-volume", lambda f: write_scan(scan(f), np.full(SHAPE, 50, np.float32)), ValueError,
     r"sub0\.nii\.gz: constant image \(nothing between the \[0\.5, 99\.5\] percentiles\); expected a volume with "
     r"contrast"),
    ("complex-voxels", lambda f: rewrite_voxels(scan(f), lambda d: d.astype(np.complex64)), ValueError,
     r"sub0\.nii\.gz: voxel type complex64; expected real grey values"),
    ("landmark-missing", lambda f: rewrite_markups(f, 2, keep=slice(0, 2)), ValueError,
     r"sub2\.fcsv: 2 landmarks \['AC', 'PC'\] \(lacks \['GENU'\]\); expected 3 landmarks \['AC', 'PC', 'GENU'\], "
     r"each once \(data\.landmark_names"),
    ("landmark-twice", lambda f: rewrite_markups(f, 1, names=["AC", "AC", "GENU"]), ValueError,
     r"sub1\.fcsv: 3 landmarks \['AC', 'AC', 'GENU'\] \(lacks \['PC'\]; repeats \['AC'\]\); expected 3 landmarks"),
    ("non-numeric-coordinate", lambda f: edit_lines(f / "sub0.fcsv", lambda lines: lines.__setitem__(
        3, lines[3].replace(",", ",abc", 1))), ValueError,
     r"sub0\.fcsv: markup 1: non-numeric, non-finite or missing coordinate in .*; expected x, y and z in mm"),
    ("inf-coordinate", lambda f: rewrite_markups(f, 0, move=(np.inf, 0, 0)), ValueError,
     r"sub0\.fcsv: markup 1: non-numeric, non-finite or missing coordinate in 'vtkMRMLMarkupsFiducialNode_0,inf,"),
    ("landmark-outside", lambda f: rewrite_markups(f, 0, move=(0.0, 500.0, 0.0)), ValueError,
     r"sub0\.fcsv: landmark 'AC' at voxel .* lies outside the image of shape \[16, 20, 24\]; expected every "
     r"landmark on its image"),
    ("unknown-coordinate-system", lambda f: rewrite_markups(f, 3, system="IJK"), ValueError,
     r"sub3\.fcsv: coordinate system 'IJK' not supported \(RAS / 0 or LPS / 1\)"),
    ("no-markups", lambda f: rewrite_markups(f, 0, keep=slice(0, 0)), ValueError,
     r"sub0\.fcsv: no markups in the file; expected one line per landmark"),
]  # fmt: skip


@pytest.mark.parametrize("breakage, error, expected", [c[1:] for c in FCSV_CASES], ids=[c[0] for c in FCSV_CASES])
def test_bad_fcsv_input_stops_naming_the_file(configs, good, tmp_path, breakage, error, expected):
    stops(configs, good, "fcsv", tmp_path, breakage, error, expected)


# ------------------------------------------------------------------------------ Decathlon
def dataset_json(root: Path) -> Path:
    return root / "dataset.json"


def edit_json(change):
    def breakage(root: Path) -> Path:
        meta = json.loads(dataset_json(root).read_text())
        change(meta)
        dataset_json(root).write_text(json.dumps(meta))
        return dataset_json(root)

    return breakage


def image(root: Path, i: int = 0) -> Path:
    return root / "imagesTr" / f"case_{i:03d}.nii.gz"


def label(root: Path, i: int = 0) -> Path:
    return root / "labelsTr" / f"case_{i:03d}.nii.gz"


def set_voxel(value):
    def change(data: np.ndarray) -> np.ndarray:
        data = data.copy()
        data[0, 0, 0] = value
        return data

    return change


def empty_axis(root: Path) -> Path:
    rewrite_voxels(image(root), lambda d: np.zeros((8, 0, 8), np.float32))
    return rewrite_voxels(label(root), lambda d: np.zeros((8, 0, 8), np.uint8))


MSD_CASES = [
    ("no-dataset-json", lambda r: remove(dataset_json(r)).parent, FileNotFoundError,
     r"no dataset\.json \(expected a Decathlon or nnU-Net v2 dataset folder\)"),
    ("bad-json", lambda r: dataset_json(r).write_text('{"training": ') and dataset_json(r), DatasetError,
     r"dataset\.json: not valid JSON \(Expecting value"),
    ("json-array", lambda r: dataset_json(r).write_text("[]") and dataset_json(r), DatasetError,
     r"dataset\.json: holds a JSON list; expected an object with the keys \['training', 'labels', 'modality'\]"),
    ("no-labels-key", edit_json(lambda m: m.pop("labels")), DatasetError,
     r"dataset\.json: missing key\(s\) \['labels'\]; a Decathlon dataset\.json needs \['training', 'labels', "
     r"'modality'\]"),
    ("no-training-key", edit_json(lambda m: m.pop("training")), DatasetError, r"missing key\(s\) \['training'\]"),
    ("labels-a-list", edit_json(lambda m: m.update(labels=["background", "outer", "inner"])), DatasetError,
     r"dataset\.json: labels is a JSON list; expected an object mapping label values to class names"),
    ("labels-not-consecutive", edit_json(lambda m: m.update(labels={"0": "background", "1": "outer", "3": "inner"})),
     DatasetError, r"dataset\.json: labels must be the consecutive values 0\.\.K-1 .*got \[0, 1, 3\]"),
    ("entry-without-label", edit_json(lambda m: m["training"][1].pop("label")), DatasetError,
     r"dataset\.json: training entry 1 .* has no \['label'\]; expected \{'image': \.\.\., 'label': \.\.\.\}"),
    ("no-cases", edit_json(lambda m: m.update(training=[])), DatasetError,
     r"dataset\.json: no labelled cases; expected at least one training image with its label"),
    ("case-listed-twice", edit_json(lambda m: m["training"].append(dict(m["training"][0]))), DatasetError,
     r"dataset\.json: training entries 0 and 3 are both case 'case_000' .*; expected each case once"),
    ("image-missing", lambda r: remove(image(r, 1)), FileNotFoundError,
     r"case_001\.nii\.gz: missing \(case 'case_001' of .*dataset\.json\); expected the file it lists"),
    ("label-missing", lambda r: remove(label(r)), FileNotFoundError, r"missing \(case 'case_000' of "),
    ("shapes-differ", lambda r: rewrite_voxels(label(r), lambda d: d[:, :, :6]), DatasetError,
     r"labelsTr/case_000\.nii\.gz: label shape \(8, 8, 6\) differs from its image .*imagesTr/case_000\.nii\.gz "
     r"\(8, 8, 8\)"),
    ("label-out-of-range", lambda r: rewrite_voxels(label(r), set_voxel(7)), DatasetError,
     r"label values \[.*7\] are not all declared in .*dataset\.json \(0\.\.2: \['background', 'outer', 'inner'\]\)"),
    ("fractional-label", lambda r: rewrite_voxels(label(r), lambda d: d.astype(np.float32) / 2), DatasetError,
     r"label values \[0\.0, 0\.5.*\] are not all declared"),
    ("nan-voxels", lambda r: rewrite_voxels(image(r), nan_where_bright), DatasetError,
     r"imagesTr/case_000\.nii\.gz: the image holds NaN or infinite values; expected finite intensities"),
    ("inf-voxels", lambda r: rewrite_voxels(image(r), lambda d: nan_where_bright(d, -np.inf)), DatasetError,
     r"the image holds NaN or infinite values"),
    ("constant-image", lambda r: rewrite_voxels(image(r), lambda d: np.zeros_like(d)), DatasetError,
     r"imagesTr/case_000\.nii\.gz: the image is constant \(0 everywhere\), an empty image; expected a scan"),
    ("empty-axis", empty_axis, DatasetError,
     r"label must be a 3-D volume with at least one voxel per axis, got shape \(8, 0, 8\)"),
    ("truncated-image", lambda r: cut(image(r)), DatasetError,
     r"imagesTr/case_000\.nii\.gz: unreadable \(EOFError: .*\); expected a complete \.nii or \.nii\.gz file"),
    ("truncated-label", lambda r: cut(label(r)), DatasetError,
     r"labelsTr/case_000\.nii\.gz: unreadable \(\w+: .*\); expected a "),
    ("not-nifti", lambda r: html(image(r)), DatasetError,
     r"unreadable \(ImageFileError: .*\); expected a \.nii or \.nii\.gz volume that .*dataset\.json lists"),
    ("complex-voxels", lambda r: rewrite_voxels(image(r), lambda d: d.astype(np.complex64)), DatasetError,
     r"imagesTr/case_000\.nii\.gz: voxel type complex64; expected real values"),
    ("2-d-image", lambda r: rewrite_voxels(image(r), lambda d: d[:, :, 0]), DatasetError,
     r"imagesTr/case_000\.nii\.gz: image must be 3-D \(1 channel\) as .*dataset\.json declares, got shape \(8, 8\)"),
    ("more-channels-than-modalities", lambda r: rewrite_voxels(image(r), lambda d: np.stack([d] * 3, -1)),
     DatasetError, r"image must be 3-D \(1 channel\) as .*dataset\.json declares, got shape \(8, 8, 8, 3\)"),
    ("fewer-channels-than-modalities", lambda r: edit_json(lambda m: m.update(modality={"0": "T1", "1": "T2"}))(r)
     and image(r), DatasetError,
     r"image must be 4-D with 2 channels last as .*dataset\.json declares, got shape \(8, 8, 8\)"),
]  # fmt: skip


@pytest.mark.parametrize("breakage, error, expected", [c[1:] for c in MSD_CASES], ids=[c[0] for c in MSD_CASES])
def test_bad_msd_input_stops_naming_the_file(configs, good, tmp_path, breakage, error, expected):
    stops(configs, good, "msd", tmp_path, breakage, error, expected)


# ------------------------------------------------------------------------------ files this process may not read
def lock(path: Path, mode: int = 0o000) -> Path:
    path.chmod(mode)
    return path


def _outcome_unprivileged(call, queue) -> None:
    """In a forked child: drop root's right to read everything (tests may run as root), then ``call()``."""
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    try:
        call()
        queue.put("no error")
    except Exception as exc:  # the message is what the test checks
        queue.put(f"{type(exc).__name__}: {exc}")


def run_unprivileged(call) -> str:
    """``call()`` in a forked child that cannot read what ``chmod`` locked: ``'Type: message'`` or ``'no error'``."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_outcome_unprivileged, args=(call, queue))
    child.start()
    try:
        return queue.get(timeout=120)
    finally:
        child.join(10)


def open_to_all(folder: Path) -> None:
    """Folders 755 and files 644, so that user nobody reads everything but what a case locks."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


# (reader, id, breakage -> the path the message must name, error type name, what the message must say)
UNREADABLE_CASES = [
    ("isbi2015", "bmp", lambda r: lock(bmp(r, "TrainingData", "001")), "PermissionError",
     r"cannot read it \(Permission denied\); expected a complete bitmap radiograph"),
    ("isbi2015", "annotation", lambda r: lock(txt(r, "002")), "PermissionError",
     r"cannot read it \(Permission denied\); expected a text file of 19 lines 'x,y'"),
    ("isbi2015", "image-folder", lambda r: lock(r / RAW / "Test1Data"), "PermissionError",
     r"cannot read it \(Permission denied\); expected ISBI 2015 radiographs RawImage/<folder>/NNN\.bmp"),
    ("isbi2015", "annotation-folder", lambda r: lock(r / MD / "400_junior"), "PermissionError",
     r"cannot read it \(Permission denied\); expected the annotation files AnnotationsByMD/400_junior/NNN\.txt"),
    ("fcsv", "table", lambda f: lock(table(f)), "PermissionError",
     r"cannot read it \(Permission denied\); expected the subjects table \(data\.csv\)"),
    ("fcsv", "markups", lambda f: lock(f / "sub1.fcsv"), "PermissionError",
     r"cannot read it \(Permission denied\); expected a 3D Slicer \.fcsv markups file"),
    ("fcsv", "volume", lambda f: lock(scan(f)), "PermissionError",
     r"cannot read it \(Permission denied\); expected a complete \.nii or \.nii\.gz volume"),
    ("msd", "dataset-json", lambda r: lock(dataset_json(r)), "PermissionError",
     r"cannot read it \(Permission denied\); expected the dataset's dataset\.json"),
    ("msd", "image", lambda r: lock(image(r)), "PermissionError",
     r"cannot read it \(Permission denied\); expected a \.nii or \.nii\.gz volume that .*dataset\.json lists"),
    *[(reader, "cache-folder", lambda r: lock(r.parent / "cache", 0o555), "PermissionError",
       r"cache: cannot write the data cache there \(Permission denied\); expected a writable folder")
      for reader in READERS],
]  # fmt: skip


@pytest.mark.parametrize("reader, breakage, error, expected", [(c[0], *c[2:]) for c in UNREADABLE_CASES],
                         ids=[f"{c[0]}-{c[1]}" for c in UNREADABLE_CASES])  # fmt: skip
def test_unreadable_input_stops_naming_it(configs, good, reader, breakage, error, expected):
    """A file or folder without read permission (and a cache folder without write permission). As root chmod blocks
    nothing, so the reader runs in a forked child that has dropped to user nobody, in a folder under /tmp that the
    child can reach (pytest's own tmp folders are the owner's only)."""
    base = Path(tempfile.mkdtemp(prefix="medrobust-unreadable-", dir="/tmp"))
    try:
        root = Path(shutil.copytree(good[reader], base / good[reader].name))
        (base / "cache").mkdir()
        open_to_all(base)
        (base / "cache").chmod(0o777)
        named = breakage(root)
        result = run_unprivileged(lambda: build(configs[reader], reader, root, base / "cache"))
    finally:
        open_to_all(base)
        shutil.rmtree(base)
    assert result.startswith(f"{error}: ") and str(named) in result and re.search(expected, result), result
