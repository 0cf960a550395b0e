"""Bad input to the classification readers stops the run before training, naming the file or table row and what was
expected: a label CSV (``task=classify``), class folders (``data.source=folder``), the ISIC layout (``task=isic``)
and CBIS-DDSM (``task=ddsm``).

Each case copies a small valid dataset that medrobust.data.classify_examples wrote once for this module, breaks one
thing and builds the datamodule from the composed config as ``train.py`` does (``instantiate`` + ``prepare_data`` +
``setup``, no training).
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import DEBUG, compose_config
from test_bad_inputs_readers import cut, html, remove
from medrobust.data.classify_examples import signal_image, write_csv_dataset, write_ddsm, write_folder_dataset
from medrobust.data.classify_examples import write_isic, write_nifti, write_png

ISIC_CSV, ISIC_IMAGES, ISIC_META = ("ISIC2018_Task3_Training_GroundTruth.csv", "ISIC2018_Task3_Training_Input",
                                    "HAM10000_metadata.csv")  # fmt: skip
LAYOUTS = {  # layout -> (overrides a user types, the data keys pointing into the dataset folder)
    "csv": (["task=classify"], {"csv": "labels.csv"}),
    "dicom": (["task=classify"], {"csv": "labels.csv"}),
    "folder": (["task=classify", "data.source=folder"], {"root": "."}),
    "isic": (["task=isic"], {"csv": ISIC_CSV, "root": ISIC_IMAGES, "metadata": ISIC_META}),
    "ddsm": (["task=ddsm"], {"root": "."}),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """One small valid dataset per layout, written once: every case breaks a copy."""
    base = tmp_path_factory.mktemp("good")
    write_csv_dataset(base / "csv", "png", n_patients=6, images_per_patient=2, size=16)
    write_csv_dataset(base / "dicom", "dicom", n_patients=6, images_per_patient=2, size=16)
    write_folder_dataset(base / "folder", "png", per_class=4, size=16)
    write_isic(base / "isic", per_class=4, size=16)
    write_ddsm(base / "ddsm", n_patients=10, size=16)
    return {layout: base / layout for layout in LAYOUTS}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict:
    """Each layout's config composed once, as ``python train.py <overrides> debug=tiny`` composes it."""
    run = tmp_path_factory.mktemp("run")
    return {layout: compose_config("train", [*overrides, DEBUG], run) for layout, (overrides, _) in LAYOUTS.items()}


def build(cfg, layout: str, root: Path, cache: Path, **overrides):
    """What ``train.py`` does with the data before the first epoch; an error in the constructor is the reader's own
    (Hydra wraps it)."""
    paths = {key: str(root / name) for key, name in LAYOUTS[layout][1].items()}
    try:
        dm = instantiate(cfg.data, _convert_="all", cache_dir=str(cache), **{**paths, **overrides})
    except InstantiationException as exc:
        raise exc.__cause__ from None
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------ breakages (cut, html, remove: shared)
def edit_table(name: str, change):
    """A breakage that edits the rows (lists of cells; row 0 the header) of the CSV ``name`` and names it."""

    def breakage(root: Path) -> Path:
        with open(root / name, newline="") as fh:
            rows = list(csv.reader(fh))
        change(rows)
        with open(root / name, "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
        return root / name

    return breakage


def set_cell(name: str, row: int, column: int, value: str):
    return edit_table(name, lambda rows: rows[row].__setitem__(column, value))


def png(root: Path, patient: int = 0, k: int = 0) -> Path:
    return root / "images" / f"P{patient:03d}_{k}.png"


def rgb_png(root: Path) -> Path:
    return write_png(png(root, 2), signal_image(np.random.default_rng(0), 1, (16, 16), 3))


def constant_png(root: Path) -> Path:
    return write_png(png(root, 1, 1), np.full((1, 16, 16), 7 / 255))


def volume_listed(root: Path) -> Path:
    """Row 2 points at a 3-D NIfTI volume."""
    write_nifti(root / "images" / "volume.nii.gz", np.random.default_rng(0).random((4, 5, 6)).astype(np.float32))
    set_cell("labels.csv", 1, 0, "images/volume.nii.gz")(root)
    return root / "images" / "volume.nii.gz"


def positives_only_in_test(root: Path) -> Path:
    """A split column that puts every positive image in test (and gives each image its own patient)."""

    def change(rows):
        rows[0] += ["split"]
        for i, row in enumerate(rows[1:]):
            row[2] = f"Q{i}"
            row.append("test" if row[1] == "positive" else ("train", "val")[i % 2])

    return edit_table("labels.csv", change)(root)


def without_window(root: Path) -> Path:
    path = root / "images" / "P000_0.dcm"
    ds = pydicom.dcmread(path)
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(path, enforce_file_format=True)
    return path


def without_pixels(root: Path) -> Path:
    path = root / "images" / "P000_1.dcm"
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


def ddsm_case(root: Path, kind: str = "Mass", patient: int = 1) -> Path:
    return root / f"{kind}-Training_P_{patient:05d}_LEFT_CC_1"


def second_cropped_series(root: Path) -> Path:
    series = next(ddsm_case(root).rglob("*cropped images*"))
    shutil.copytree(series, series.with_name(series.name + "-copy"))
    return ddsm_case(root)


CSV, MASS_TRAIN = "labels.csv", "mass_case_description_train_set.csv"
CALC_TEST = "calc_case_description_test_set.csv"

# (id, layout, breakage of the folder -> what the message must name, error type, what the message must say,
#  data overrides)
CASES = [
    # ---- a label CSV of PNGs
    ("missing-file", "csv", lambda r: remove(png(r, 1, 0)), FileNotFoundError,
     r"labels\.csv row 4: image 'images/P001_0\.png' not found \(.*P001_0\.png missing\); expected an image file", {}),
    ("truncated-png", "csv", lambda r: cut(png(r, 0, 1)), ValueError,
     r"P000_1\.png: unreadable \(\w+: .*\); expected a complete PNG / JPEG image", {}),
    ("not-an-image", "csv", lambda r: html(png(r, 2, 1)), ValueError,
     r"P002_1\.png: unreadable \(UnidentifiedImageError: .*\); expected a complete PNG / JPEG image", {}),
    ("label-not-in-classes", "csv", set_cell(CSV, 3, 1, "maybe"), ValueError,
     r"labels\.csv row 4: label 'maybe' is not in data\.classes \['negative', 'positive'\]; expected one of them",
     {"classes": ["negative", "positive"]}),
    ("no-label-column", "csv", set_cell(CSV, 0, 1, "class"), ValueError,
     r"labels\.csv: no column 'label' in the label table \(data\.csv\); expected columns \['path', 'label'\] \(any "
     r"case\), found \['path', 'class', 'patient_id'\]", {}),
    ("empty-label-cell", "csv", set_cell(CSV, 2, 1, ""), ValueError,
     r"labels\.csv row 3: empty label cell; expected an image path and its class label in every row", {}),
    ("header-only", "csv", edit_table(CSV, lambda rows: rows.__delitem__(slice(1, None))), ValueError,
     r"labels\.csv: the label table \(data\.csv\) has a header but no rows", {}),
    ("stray-separator", "csv", edit_table(CSV, lambda rows: rows[2].append("x")), ValueError,
     r"labels\.csv row 3: 4 fields, but the header has 3; expected one value per column", {}),
    ("image-listed-twice", "csv", set_cell(CSV, 5, 0, "images/P000_0.png"), ValueError,
     r"labels\.csv row 6: file .*P000_0\.png is already listed \(.*labels\.csv row 2\); expected each image once", {}),
    ("single-class", "csv", edit_table(CSV, lambda rows: [r.__setitem__(1, "negative") for r in rows[1:]]),
     ValueError, r"labels\.csv: only one class \['negative'\]; expected at least two classes", {}),
    ("channels-disagree", "csv", rgb_png, ValueError,
     r"P002_0\.png \(.*labels\.csv row 6\) has 3 channel\(s\), but .*P000_0\.png has 1; expected every image with the "
     r"same channels", {}),
    ("no-training-images-of-a-class", "csv", positives_only_in_test, ValueError,
     r"labels\.csv: class\(es\) \['positive'\] have no training images .*; expected every class in the training split",
     {}),
    ("unknown-split", "csv", edit_table(CSV, lambda rows: [r.append("training" if i else "split")
                                                           for i, r in enumerate(rows)]), ValueError,
     r"labels\.csv row 2: split 'training'; expected train, val or test in every row", {}),
    ("patient-in-two-splits", "csv", edit_table(CSV, lambda rows: [r.append(("split", "train", "test")[min(i, 2)])
                                                                   for i, r in enumerate(rows)]), ValueError,
     r"labels\.csv row 3 \(patient 'P000'\): split 'test', but .*labels\.csv row 2 puts the patient in 'train'; "
     r"expected all of a patient's images in one split", {}),
    ("empty-patient-cell", "csv", set_cell(CSV, 4, 2, ""), ValueError,
     r"labels\.csv row 5: empty patient_id cell; expected an id in every row", {}),
    ("constant-image-minmax", "csv", constant_png, ValueError,
     r"P001_1\.png: constant image \(every pixel 7\); expected contrast for data\.scale=minmax", {"scale": "minmax"}),
    ("volume-among-images", "csv", volume_listed, ValueError,
     r"volume\.nii\.gz: a 3-D image of shape \[4, 5, 6\]; expected 2-D images \(data\.spatial_dims=2\)", {}),
    # ---- DICOM files
    ("dicom-without-window", "dicom", without_window, ValueError,
     r"P000_0\.dcm: no window for data\.scale=window: the file has no WindowCenter / WindowWidth or VOI LUT; expected "
     r"data\.window=\[low, high\]", {}),
    ("dicom-without-pixels", "dicom", without_pixels, ValueError,
     r"P000_1\.dcm: DICOM without pixel data .*; expected an image with its PixelData", {}),
    ("truncated-dicom", "dicom", lambda r: cut(r / "images" / "P001_0.dcm"), ValueError,
     r"P001_0\.dcm: DICOM without pixel data \(a truncated download", {}),
    ("truncated-pixel-data", "dicom", lambda r: r.joinpath("images", "P001_1.dcm").write_bytes(
        r.joinpath("images", "P001_1.dcm").read_bytes()[:-100]) and r / "images" / "P001_1.dcm", ValueError,
     r"P001_1\.dcm: cannot decode the pixel data \(ValueError: The number of bytes of pixel data is less than "
     r"expected .*\); expected a complete image", {}),
    # ---- a folder per class
    ("empty-class-folder", "folder", lambda r: (r / "other").mkdir() or (r / "other" / "notes.txt").touch()
     or r / "other", ValueError, r"other: class folder 'other' holds no images; expected an image file", {}),
    ("no-class-folders", "folder", lambda r: [remove(r / c) for c in ("negative", "positive")] and r, ValueError,
     r"no sub-folders; expected one sub-folder per class", {}),
    ("folder-not-in-classes", "folder", lambda r: r / "positive", ValueError,
     r"positive/000\.png \(class folder 'positive'\): label 'positive' is not in data\.classes \['negative', 'other'\]",
     {"classes": ["negative", "other"]}),
    # ---- ISIC
    ("isic-two-diagnoses", "isic", set_cell(ISIC_CSV, 2, 2, "1.0"), ValueError,
     r"GroundTruth\.csv row 3 \(image 'ISIC_0000001'\): 2 diagnoses marked 1 \(\['MEL', 'NV'\]\); expected exactly "
     r"one 1 among \['MEL', 'NV', 'BCC', 'AKIEC', 'BKL', 'DF', 'VASC'\]", {}),
    ("isic-no-diagnosis", "isic", set_cell(ISIC_CSV, 3, 1, "0.0"), ValueError,
     r"GroundTruth\.csv row 4 \(image 'ISIC_0000002'\): 0 diagnoses marked 1 \(\[\]\); expected exactly one 1", {}),
    ("isic-not-one-hot", "isic", set_cell(ISIC_CSV, 1, 2, "0.5"), ValueError,
     r"GroundTruth\.csv row 2 \(image 'ISIC_0000000'\): column NV holds '0\.5'; expected 0 or 1", {}),
    ("isic-image-missing", "isic", lambda r: remove(r / ISIC_IMAGES / "ISIC_0000003.jpg"), FileNotFoundError,
     r"row 5 \(image 'ISIC_0000003'\): image file .*ISIC_0000003\.jpg missing; expected <data\.root>/<image>\.jpg",
     {}),
    ("isic-no-image-column", "isic", set_cell(ISIC_CSV, 0, 0, "name"), ValueError,
     r"GroundTruth\.csv: no column 'image' in the ISIC ground truth", {}),
    ("isic-metadata-without-lesions", "isic", set_cell(ISIC_META, 0, 0, "lesion"), ValueError,
     r"HAM10000_metadata\.csv: expected an image column \('image' or 'image_id'\) and a 'patient_id' or 'lesion_id' "
     r"column", {}),
    # ---- CBIS-DDSM
    ("ddsm-case-folder-missing", "ddsm", lambda r: remove(ddsm_case(r)), FileNotFoundError,
     r"mass_case_description_train_set\.csv row \d+: image 'Mass-Training_P_00001_LEFT_CC_1/.*/000000\.dcm' not "
     r"found: neither .*000000\.dcm nor its case folder .*Mass-Training_P_00001_LEFT_CC_1 exists; expected the "
     r"CBIS-DDSM DICOM tree", {}),
    ("ddsm-two-cropped-images", "ddsm", second_cropped_series, FileNotFoundError,
     r"under its folder .*Mass-Training_P_00001_LEFT_CC_1 found 3 DICOM file\(s\) .* of which 2 cropped image\(s\) "
     r"\(SeriesDescription 'cropped images', else more than two grey values\); expected exactly one there", {}),
    ("ddsm-unknown-pathology", "ddsm", set_cell(MASS_TRAIN, 2, 9, "UNSURE"), ValueError,
     r"mass_case_description_train_set\.csv row \d+: pathology 'UNSURE'; expected one of \['BENIGN', "
     r"'BENIGN_WITHOUT_CALLBACK', 'MALIGNANT'\]", {}),
    ("ddsm-csv-missing", "ddsm", lambda r: remove(r / CALC_TEST), FileNotFoundError,
     r"calc_case_description_test_set\.csv: the CBIS-DDSM calc test case descriptions .* missing; expected a CSV", {}),
    ("ddsm-no-pathology-column", "ddsm", set_cell(MASS_TRAIN, 0, 9, "diagnosis"), ValueError,
     r"mass_case_description_train_set\.csv: no column 'pathology' in the CBIS-DDSM mass train case descriptions", {}),
]  # fmt: skip


@pytest.mark.parametrize("layout, breakage, error, expected, overrides", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_stops_naming_the_file_or_row(configs, good, tmp_path, layout, breakage, error, expected, overrides):
    root = Path(shutil.copytree(good[layout], tmp_path / layout))
    named = breakage(root)
    with pytest.raises(error) as info:
        build(configs[layout], layout, root, tmp_path / "cache", **overrides)
    message = str(info.value)
    assert str(named) in message and re.search(expected, message), message


def test_the_good_datasets_build(configs, good, tmp_path):
    """Every case above breaks a dataset that builds: the error is the breakage's, not the copy's."""
    for layout in LAYOUTS:
        dm = build(configs[layout], layout, good[layout], tmp_path / "cache")
        assert len(dm.data_train) > 0 and dm.num_classes >= 2
