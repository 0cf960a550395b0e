"""Label tables of two public classification datasets, as :class:`~medrobust.data.classify_tables.LabelTable` s.

* ISIC 2018 task 3 / ISIC 2019 (dermoscopy, RGB JPEG): a ground-truth CSV with an ``image`` column and one-hot
  diagnosis columns (2018: MEL, NV, BCC, AKIEC, BKL, DF, VASC; 2019: MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK), the
  images ``<image>.jpg`` in one folder, and optionally a metadata CSV (HAM10000_metadata.csv: ``image_id``,
  ``lesion_id``; ISIC_2019_Training_Metadata.csv: ``image``, ``lesion_id``; or a ``patient_id`` column) whose lesion /
  patient ids group the images for the split (images of one lesion never in two splits).
* CBIS-DDSM (mammography, DICOM): the case-description CSVs ``{mass,calc}_case_description_{train,test}_set.csv``
  (``patient_id``, ``pathology``, ``cropped image file path``) and the DICOM tree. The published train / test files
  give the test split; val is carved from train by patient. The CSVs' paths (``<case folder>/<UID>/<UID>/000000.dcm``)
  rarely match a downloaded tree (``<case folder>/<date>-.../<series>/1-1.dcm``): an image is found by the deepest
  folder of its path that exists under the root, and among several DICOMs there by SeriesDescription "cropped images"
  (else as the one that is no binary ROI mask).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np

from medrobust.data.classify_tables import LabelTable, Row, cell, check_once, check_patient_splits, read_rows

ISIC_DIAGNOSES = ("MEL", "NV", "BCC", "AKIEC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
DDSM_FILES = {"mass": "mass_case_description_{}_set.csv", "calc": "calc_case_description_{}_set.csv"}
DDSM_ABNORMALITIES = {"both": ("mass", "calc"), "mass": ("mass",), "calc": ("calc",)}
DDSM_LABEL_RULES = {  # pathology -> class, and the classes in label order
    "binary": ({"BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign", "MALIGNANT": "malignant"},
               ["benign", "malignant"]),
    "three_way": ({"BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign_without_callback",
                   "MALIGNANT": "malignant"}, ["benign", "benign_without_callback", "malignant"]),
}  # fmt: skip
DDSM_IMAGE_COLUMN = "cropped image file path"


# ------------------------------------------------------------------------------------------ ISIC
def _one_hot(where: str, raw: dict, columns: dict, diagnoses: list[str]) -> str:
    """The one diagnosis whose cell is 1; a cell other than 0 / 1, or not exactly one 1, raises naming the row."""
    hot = []
    for name in diagnoses:
        text = cell(raw, columns, name)
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if value not in (0.0, 1.0):
            raise ValueError(f"{where}: column {name} holds {text!r}; expected 0 or 1 (one-hot diagnosis)")
        if value == 1.0:
            hot.append(name)
    if len(hot) != 1:
        raise ValueError(f"{where}: {len(hot)} diagnoses marked 1 ({hot}); expected exactly one 1 among {diagnoses}")
    return hot[0]


def _isic_groups(metadata: str | os.PathLike | None) -> tuple[dict[str, str], str]:
    """``(image -> patient or lesion id, the column used)`` from the metadata CSV; ``({}, "")`` without one."""
    if metadata is None:
        return {}, ""
    lines, columns = read_rows(metadata, (), "the ISIC metadata (data.metadata)")
    image_col = next((c for c in ("image", "image_id") if c in columns), None)
    group_col = next((c for c in ("patient_id", "lesion_id") if c in columns), None)
    if image_col is None or group_col is None:
        raise ValueError(f"{metadata}: expected an image column ('image' or 'image_id') and a 'patient_id' or "
                         f"'lesion_id' column in the ISIC metadata, found {list(columns.values())}")  # fmt: skip
    groups = {cell(raw, columns, image_col): cell(raw, columns, group_col) for _, raw in lines}
    return {image: group for image, group in groups.items() if group}, group_col


def isic_table(csv_path: str | os.PathLike, image_dir: str | os.PathLike,
               metadata: str | os.PathLike | None = None) -> LabelTable:  # fmt: skip
    """The ISIC ground truth (module docstring); classes in the file's column order, a diagnosis column without any
    1 (ISIC 2019's UNK in the training set) left out with a note."""
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"data.root: {str(image_dir)!r} does not exist or is not a folder; expected the ISIC "
                                "JPEG folder (<image>.jpg)")  # fmt: skip
    lines, columns = read_rows(csv_path, ("image",), "the ISIC ground truth (data.csv)")
    diagnoses = [h for h in columns.values() if h.strip().upper() in ISIC_DIAGNOSES]
    if not diagnoses:
        raise ValueError(f"{csv_path}: no one-hot diagnosis columns; expected some of {list(ISIC_DIAGNOSES)}, found "
                         f"{list(columns.values())}")  # fmt: skip
    groups, group_col = _isic_groups(metadata)
    rows, ungrouped = [], 0
    for line, raw in lines:
        image = cell(raw, columns, "image")
        where = f"{csv_path} row {line} (image {image!r})"
        if not image:
            raise ValueError(f"{csv_path} row {line}: empty image cell; expected an ISIC image id")
        label = _one_hot(where, raw, columns, diagnoses).strip().upper()
        path = image_dir / f"{image}.jpg"
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {path} missing; expected <data.root>/<image>.jpg")
        ungrouped += bool(groups) and image not in groups
        rows.append(Row(path, label, groups.get(image, image), "", image, where))
    check_once(rows)
    used = {row.label for row in rows}
    order = [d.strip().upper() for d in diagnoses]
    notes = [f"{csv_path}: diagnosis column {d} has no image marked 1: not a class" for d in order if d not in used]
    if ungrouped:
        notes.append(f"{metadata}: {ungrouped} image(s) without a {group_col}: each split as its own group")
    return LabelTable(rows, str(csv_path), class_order=[d for d in order if d in used], notes=notes)


# ------------------------------------------------------------------------------------------ CBIS-DDSM
def _dicoms_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".dicom"))


def _cropped_only(candidates: list[Path]) -> list[Path]:
    """The candidates that are the cropped image, not its ROI mask: by SeriesDescription ("cropped images"), else (some
    downloads keep both in one series) by content, a mask holding two values at most."""
    import pydicom

    def read(path: Path, header_only: bool):
        try:
            return pydicom.dcmread(path, stop_before_pixels=header_only)
        except Exception:  # an unreadable candidate is no match; the chosen file is read (and checked) later
            return None

    named = [p for p in candidates if "cropped" in str(getattr(read(p, True), "SeriesDescription", "")).lower()]
    if named:
        return named
    datasets = [(p, read(p, False)) for p in candidates]
    return [p for p, ds in datasets if ds is not None and "PixelData" in ds and len(np.unique(ds.pixel_array)) > 2]


def find_ddsm_image(root: Path, text: str, where: str) -> Path:
    """The DICOM that a CSV path ``text`` means under ``root``: the path itself when it exists, else the one cropped
    image under the deepest existing folder of the path (the module docstring); otherwise an error saying what was
    looked for."""
    parts = PurePosixPath(text.strip().replace("\\", "/")).parts
    exact = root.joinpath(*parts)
    if exact.is_file():
        return exact
    base = next((root.joinpath(*parts[:k]) for k in range(len(parts) - 1, 0, -1)
                 if root.joinpath(*parts[:k]).is_dir()), None)  # fmt: skip
    if base is None:
        raise FileNotFoundError(f"{where}: image {text!r} not found: neither {exact} nor its case folder "
                                f"{root / parts[0]} exists; expected the CBIS-DDSM DICOM tree under data.root "
                                f"({root}), holding a folder {parts[0]!r}")  # fmt: skip
    candidates = _dicoms_under(base)
    if len(candidates) > 1:
        candidates = _cropped_only(candidates)
    if len(candidates) != 1:
        found = [str(p.relative_to(base)) for p in _dicoms_under(base)]
        raise FileNotFoundError(f"{where}: image {text!r} not at {exact}; under its folder {base} found "
                                f"{len(found)} DICOM file(s) {found[:6]} of which {len(candidates)} cropped image(s) "
                                "(SeriesDescription 'cropped images', else more than two grey values); expected "
                                "exactly one there")  # fmt: skip
    return candidates[0]


def ddsm_table(root: str | os.PathLike, csv_dir: str | os.PathLike | None = None, abnormality: str = "both",
               label_rule: str = "binary") -> LabelTable:  # fmt: skip
    """The CBIS-DDSM case descriptions of ``abnormality`` (mass, calc or both), labelled by ``label_rule``:
    ``binary`` (malignant vs benign and benign without callback, seed 000's rule) or ``three_way``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {str(root)!r} does not exist or is not a folder; expected the CBIS-DDSM "
                                "DICOM tree")  # fmt: skip
    csv_dir = Path(csv_dir) if csv_dir is not None else root
    to_class, classes = DDSM_LABEL_RULES[label_rule]
    rows = []
    for kind in DDSM_ABNORMALITIES[abnormality]:
        for split in ("train", "test"):
            csv_path = csv_dir / DDSM_FILES[kind].format(split)
            what = f"the CBIS-DDSM {kind} {split} case descriptions (in data.csv, else data.root)"
            lines, columns = read_rows(csv_path, ("patient_id", "pathology", DDSM_IMAGE_COLUMN), what)
            for line, raw in lines:
                where = f"{csv_path} row {line}"
                pathology, text = cell(raw, columns, "pathology").upper(), cell(raw, columns, DDSM_IMAGE_COLUMN)
                if pathology not in to_class:
                    raise ValueError(f"{where}: pathology {cell(raw, columns, 'pathology')!r}; expected one of "
                                     f"{sorted(to_class)}")  # fmt: skip
                patient = cell(raw, columns, "patient_id")
                if not patient or not text:
                    raise ValueError(f"{where}: empty {'patient_id' if not patient else DDSM_IMAGE_COLUMN!r} cell; "
                                     "expected a value in every row")  # fmt: skip
                path = find_ddsm_image(root, text, where)
                sample_id = PurePosixPath(text.strip().replace("\\", "/")).parts[0]
                fixed = "test" if split == "test" else ""  # val is carved from the train files later
                rows.append(Row(path, to_class[pathology], patient, fixed, sample_id, where))
    check_once(rows)
    crossing = check_patient_splits([replace(r, split=r.split or "train") for r in rows], stop=False)
    warnings = [f"CBIS-DDSM: {len(crossing)} patient(s) in both the published train and test files (e.g. "
                f"{crossing[0]}); their images stay where the files put them"] if crossing else []  # fmt: skip
    return LabelTable(rows, str(csv_dir), class_order=classes, warnings=warnings)
