"""Label tables of image classification data: which file holds which class, of which patient, in which split.

Every layout (a user's CSV, a folder per class, ISIC, CBIS-DDSM: :mod:`medrobust.data.classify_public`) is read into
one :class:`LabelTable` of :class:`Row` s, so the datamodule splits, decodes and caches them all the same way. Reading a
table opens no image: it checks that every listed file exists and every cell holds what it should, and raises naming
the table row (or folder) and what was expected.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from medrobust.data.brain_nifti import _resolve
from medrobust.data.landmark_formats import list_folder, not_found, read_failure

SPLIT_NAMES = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")
EXPECTED_IMAGE = "an image file (PNG / JPEG, DICOM or NIfTI)"


@dataclass(frozen=True)
class Row:
    """One labelled image. ``patient_id`` groups rows for the split (the sample's own id when the layout has none);
    ``split`` is ``train`` / ``val`` / ``test`` when the layout fixes it, ``""`` when ``data.split`` decides;
    ``sample_id`` is the stable per-sample key of the batches; ``where`` names the row in errors."""

    path: Path
    label: str
    patient_id: str
    split: str
    sample_id: str
    where: str


@dataclass(frozen=True)
class LabelTable:
    """The rows of a layout, what was read (``source``, for messages), the layout's own class order (``class_order``;
    None: sorted labels), and lines for the log: ``notes`` (info) and ``warnings`` (e.g. a published split that puts
    one patient in two splits)."""

    rows: list[Row]
    source: str
    class_order: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ reading tables
def read_rows(csv_path: str | os.PathLike, required: Sequence[str], what: str) -> tuple[list[tuple[int, dict]], dict]:
    """``([(line, {column: cell})], {lower-case name: header})`` of a CSV (``.tsv``: tab-separated). Headers match
    ``required`` whatever their case and surrounding spaces; a missing column, an empty table or a row with more or
    fewer fields than the header (a stray separator shifts the later columns) raises naming the file (and row)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: {what} missing; expected a CSV file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if csv_path.suffix.lower() == ".tsv" else ",")
            rows = [(reader.line_num, row) for row in reader]
            header = list(reader.fieldnames or [])
    except OSError as err:
        raise read_failure(csv_path, err, what) from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{csv_path}: cannot read the table ({type(err).__name__}: {err}); expected UTF-8 text, "
                         "comma-separated (.csv) or tab-separated (.tsv)") from None  # fmt: skip
    columns = {h.strip().lower(): h for h in header}
    missing = [c for c in required if c.lower() not in columns]
    if missing:
        raise ValueError(f"{csv_path}: no column {', '.join(map(repr, missing))} in {what}; expected columns "
                         f"{list(required)} (any case), found {header}")  # fmt: skip
    if not rows:
        raise ValueError(f"{csv_path}: {what} has a header but no rows")
    for line, row in rows:
        n_fields = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
        if n_fields != len(header):
            raise ValueError(f"{csv_path} row {line}: {n_fields} fields, but the header has {len(header)}; expected "
                             "one value per column (quote values that contain the separator)")  # fmt: skip
    return rows, columns


def cell(row: dict, columns: dict, name: str) -> str:
    """The stripped cell of column ``name`` (matched as :func:`read_rows` matches), ``""`` when there is none."""
    header = columns.get(name.lower())
    return (row.get(header) or "").strip() if header is not None else ""


def check_once(rows: Sequence[Row]) -> None:
    """Each file and each sample id listed once: a repeat would count twice, maybe in two splits."""
    first: dict[str, Row] = {}
    for row in rows:
        for key in (f"file {os.path.realpath(row.path)}", f"sample id {row.sample_id!r}"):
            if key in first:
                raise ValueError(f"{row.where}: {key} is already listed ({first[key].where}); expected each image "
                                 "once")  # fmt: skip
            first[key] = row


# ------------------------------------------------------------------------------------------ source=csv
def csv_table(csv_path: str | os.PathLike) -> LabelTable:
    """``data.source=csv``: columns ``path``, ``label``, optional ``patient_id`` and ``split``; a relative path is
    relative to the table's folder. A split column is used as is: filled in every row, one split per patient."""
    csv_path = Path(csv_path)
    lines, columns = read_rows(csv_path, ("path", "label"), "the label table (data.csv)")
    has_patient, has_split = "patient_id" in columns, "split" in columns
    rows = []
    for line, raw in lines:
        where = f"{csv_path} row {line}"
        text, label = cell(raw, columns, "path"), cell(raw, columns, "label")
        if not text or not label:
            raise ValueError(f"{where}: empty {'path' if not text else 'label'} cell; expected an image path and its "
                             "class label in every row")  # fmt: skip
        path = _resolve(text, [csv_path.parent])
        if path is None:
            raise FileNotFoundError(f"{where}: image {text!r} not found ({not_found(text, [csv_path.parent])}); "
                                    f"expected {EXPECTED_IMAGE}, a relative path being relative to the table's "
                                    "folder")  # fmt: skip
        sample_id = PurePosixPath(*Path(text).parts).as_posix()
        patient = cell(raw, columns, "patient_id") if has_patient else sample_id
        if not patient:
            raise ValueError(f"{where}: empty patient_id cell; expected an id in every row (or no patient_id column)")
        split = cell(raw, columns, "split").lower() if has_split else ""
        if has_split and split not in SPLIT_NAMES:
            raise ValueError(f"{where}: split {cell(raw, columns, 'split')!r}; expected train, val or test in every "
                             "row once the table has a split column")  # fmt: skip
        rows.append(Row(path, label, patient, split, sample_id, where))
    check_once(rows)
    if has_split:
        check_patient_splits(rows, stop=True)
    return LabelTable(rows, str(csv_path))


def check_patient_splits(rows: Sequence[Row], stop: bool) -> list[str]:
    """Patients whose fixed splits differ; ``stop``: the first one raises naming both rows (a patient in two splits
    leaks into the test), else their ids are returned (an official split, warned about)."""
    seen: dict[str, Row] = {}
    crossing = []
    for row in rows:
        if not row.split:
            continue
        first = seen.setdefault(row.patient_id, row)
        if first.split != row.split:
            if stop:
                raise ValueError(f"{row.where} (patient {row.patient_id!r}): split {row.split!r}, but {first.where} "
                                 f"puts the patient in {first.split!r}; expected all of a patient's images in one "
                                 "split")  # fmt: skip
            crossing.append(row.patient_id)
    return sorted(set(crossing))


# ------------------------------------------------------------------------------------------ source=folder
def is_image_file(path: Path) -> bool:
    """A file the readers take: an image suffix, or a DICOM without one (the 'DICM' magic at byte 128)."""
    name = path.name.lower()
    if name.startswith("."):
        return False
    if name.endswith(IMAGE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError as err:
        raise read_failure(path, err, EXPECTED_IMAGE) from None


def image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """``(image files, other files)`` under ``folder``, recursively, sorted; a folder that cannot be listed raises."""
    images, others = [], []
    for entry in list_folder(folder, f"the images of class {folder.name!r}"):
        if entry.is_dir():
            found, skipped = image_files(entry)
            images, others = images + found, others + skipped
        elif entry.is_file():
            (images if is_image_file(entry) else others).append(entry)
    return images, others


def folder_table(root: str | os.PathLike) -> LabelTable:
    """``data.source=folder``: one sub-folder of ``root`` per class (its name the class), images inside at any depth.
    A class folder without images raises; files that are no images are skipped with a note."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {str(root)!r} does not exist or is not a folder; expected one sub-folder "
                                "per class")  # fmt: skip
    folders = [p for p in list_folder(root, "one sub-folder per class") if p.is_dir() and not p.name.startswith(".")]
    if not folders:
        raise ValueError(f"data.root {str(root)!r}: no sub-folders; expected one sub-folder per class, holding its "
                         "images")  # fmt: skip
    rows, notes = [], []
    for folder in folders:
        images, others = image_files(folder)
        if not images:
            raise ValueError(f"{folder}: class folder {folder.name!r} holds no images; expected {EXPECTED_IMAGE} "
                             "(or remove the folder)")  # fmt: skip
        if others:
            notes.append(f"{folder}: {len(others)} file(s) that are no images skipped, e.g. {others[0].name!r}")
        for path in images:
            sample_id = path.relative_to(root).as_posix()
            rows.append(Row(path, folder.name, sample_id, "", sample_id, f"{path} (class folder {folder.name!r})"))
    return LabelTable(rows, str(root), notes=notes)


# ------------------------------------------------------------------------------------------ classes
def _class_sort_key(name: str):
    """Numeric labels in numeric order (2 before 10), others alphabetically."""
    try:
        return (0, float(name), "")
    except ValueError:
        return (1, 0.0, name)


def resolve_classes(table: LabelTable, classes: Sequence[str] | None = None) -> list[str]:
    """The class names in label order: ``classes`` (``data.classes``) when given, else the layout's own order, else
    the sorted labels. A label outside ``classes``, a listed class without samples or a single class raises."""
    found = {row.label for row in table.rows}
    if classes is not None:
        names = [str(c) for c in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"data.classes lists a class twice: {names}")
        unknown = next((row for row in table.rows if row.label not in names), None)
        if unknown is not None:
            raise ValueError(f"{unknown.where}: label {unknown.label!r} is not in data.classes {names}; expected one "
                             "of them (add it to data.classes, or set data.classes=null to take every label)")
        empty = [c for c in names if c not in found]
        if empty:
            raise ValueError(f"{table.source}: class(es) {empty} of data.classes have no images; expected at least one "
                             "image per class")  # fmt: skip
    elif table.class_order is not None:
        names = [c for c in table.class_order if c in found]
    else:
        names = sorted(found, key=_class_sort_key)
    if len(names) < 2:
        raise ValueError(f"{table.source}: only one class {names}; expected at least two classes to tell apart")
    return names
