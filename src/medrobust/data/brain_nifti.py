"""T1 NIfTI volumes listed in a participants table (the ``nifti`` source of the brain-age DataModule).

The table is a CSV (or ``.tsv``) in the style of IXI / OpenBHB, one row per subject; headers are
matched case-insensitively:

* subject id: one of :data:`ID_COLUMNS`; age in years: one of :data:`AGE_COLUMNS`;
* image path: one of :data:`PATH_COLUMNS`, relative to ``root`` or to the table's folder (or absolute);
* optional regional volumes (FreeSurfer / SLANT style): the ``feature_columns`` named by the user, or by
  default every other column that holds numbers (:func:`_looks_numeric`); a blank or non-numeric cell in a
  feature column is an error naming the row and column, never a reason to drop the column.

Volumes are read with MONAI (nibabel reader), reoriented to RAS, resampled to isotropic voxels
(``spacing_mm``, or by default the spacing that fits the whole field of view into the cube, aspect kept),
scaled to [0, 1] between two intensity percentiles and zero-padded / cropped to ``image_size^3``.
Anything that does not fit is an error naming the file or table row (and column) and what was expected;
nothing is skipped silently.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

ID_COLUMNS = ("subject_id", "subject", "participant_id", "ixi_id", "id")
AGE_COLUMNS = ("age", "age_years")
PATH_COLUMNS = ("path", "image", "file", "filename", "t1", "t1_path")
MAX_AGE = 150.0
MISSING_MARKERS = ("", "na", "n/a", "nan", "null", "none", "-")  # how tables spell an empty cell


@dataclass(frozen=True)
class ParticipantTable:
    """The rows of a participants table: ``ages`` ``(N,)`` years, ``volumes`` ``(N, F)`` (the feature
    columns, in ``feature_names`` order; ``F`` may be 0), ``paths`` resolved image files."""

    csv_path: Path
    subject_ids: list[str]
    ages: np.ndarray
    paths: list[Path]
    volumes: np.ndarray
    feature_names: list[str]


def _find_column(headers: dict[str, str], candidates: Sequence[str], what: str, csv_path: Path) -> str:
    for name in candidates:
        if name in headers:
            return headers[name]
    raise ValueError(f"{csv_path}: no {what} column; expected one of {list(candidates)} (any case), "
                     f"found {list(headers.values())}")  # fmt: skip


def _as_number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _looks_numeric(values: Sequence[str | None]) -> bool:
    """A default feature column: some cells are numbers and the rest are empty-cell markers, or most cells are
    numbers. Such a column is kept even with a bad cell (which is then an error): dropping it would change the
    model's inputs without a word. Text columns (sex, site, dates) are not features."""
    numbers = sum(_as_number(v) is not None for v in values)
    missing = sum((v or "").strip().lower() in MISSING_MARKERS for v in values)
    return numbers > 0 and (numbers + missing == len(values) or numbers > len(values) / 2)


def _resolve(path_text: str, bases: Sequence[Path]) -> Path | None:
    path = Path(path_text).expanduser()
    if path.is_absolute():
        return path if path.is_file() else None
    return next((b / path for b in bases if (b / path).is_file()), None)


def _why_not_found(path_text: str, bases: Sequence[Path]) -> str:
    """Why no candidate of an image path is a readable file: a dangling link or a folder says more than 'missing'."""
    path = Path(path_text).expanduser()
    for candidate in [path] if path.is_absolute() else [b / path for b in bases]:
        if candidate.is_symlink() and not candidate.exists():
            return f"{candidate} is a broken symbolic link to {os.readlink(candidate)!r}"
        if candidate.is_dir():
            return f"{candidate} is a folder"
    return f"looked in {[str(b) for b in bases]}"


def read_participants(
    csv_path: str | os.PathLike, root: str | os.PathLike | None = None, feature_columns: Sequence[str] | None = None
) -> ParticipantTable:
    """Parse and check a participants table; every row must name an existing file and a numeric age."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if csv_path.suffix.lower() == ".tsv" else ",")
            headers = {h.strip().lower(): h for h in (reader.fieldnames or []) if h is not None}
            rows = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{csv_path}: cannot read the table ({type(exc).__name__}: {exc}); expected UTF-8 text, "
                         "comma-separated (.csv) or tab-separated (.tsv)") from exc  # fmt: skip
    for line, row in rows:  # a stray separator shifts every later column of its row: stop rather than misread
        n_fields = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
        if None in row or n_fields < len(row):
            raise ValueError(f"{csv_path} row {line}: {n_fields} fields, but the header has {len(reader.fieldnames)}; "
                             "expected one value per column (quote values that contain the separator)")  # fmt: skip
    id_col = _find_column(headers, ID_COLUMNS, "subject id", csv_path)
    age_col = _find_column(headers, AGE_COLUMNS, "age", csv_path)
    path_col = _find_column(headers, PATH_COLUMNS, "image path", csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: the table has a header but no subjects")
    if feature_columns is None:
        others = [h for h in headers.values() if h not in (id_col, age_col, path_col)]
        features = [h for h in others if _looks_numeric([row.get(h) for _, row in rows])]
        why = "it holds numbers elsewhere, so it is read as a regional-volume feature"
    else:
        features = [_find_column(headers, [c.strip().lower()], f"feature {c!r}", csv_path) for c in feature_columns]
        why = "it is listed in data.feature_columns"

    bases = [Path(root)] if root is not None else []
    bases.append(csv_path.parent)
    ids, ages, paths, volumes, first_row = [], [], [], [], {}
    for line, row in rows:
        sid = (row.get(id_col) or "").strip()
        where = f"{csv_path} row {line} (subject {sid!r})"
        if not sid:
            raise ValueError(f"{csv_path} row {line}: empty subject id in column {id_col!r}")
        if sid in first_row:
            raise ValueError(f"{where}: duplicate subject id, first seen on row {first_row[sid]}")
        first_row[sid] = line
        age = _as_number(row.get(age_col))
        if age is None or not 0 <= age <= MAX_AGE:
            raise ValueError(f"{where}: age {row.get(age_col)!r} in column {age_col!r} is not a number "
                             f"in [0, {MAX_AGE:g}]")  # fmt: skip
        path_text = (row.get(path_col) or "").strip()
        path = _resolve(path_text, bases) if path_text else None
        if path is None:
            raise FileNotFoundError(f"{where}: image {path_text!r} in column {path_col!r} not found "
                                    f"({_why_not_found(path_text, bases)}); expected a NIfTI file")  # fmt: skip
        values = [_as_number(row.get(c)) for c in features]
        bad = [c for c, v in zip(features, values) if v is None]
        if bad:
            raise ValueError(
                f"{where}: feature column {bad[0]!r} holds {row.get(bad[0])!r}, not a number ({why}); expected a "
                "finite number in every row: fill the cell, or choose the feature columns with data.feature_columns "
                "([] for none)"
            )
        ids.append(sid)
        ages.append(age)
        paths.append(path)
        volumes.append(values)
    volumes_array = np.asarray(volumes, dtype=np.float64).reshape(len(ids), len(features))
    return ParticipantTable(csv_path, ids, np.asarray(ages), paths, volumes_array, features)


def participants_table_path(csv: str | None, root: str | None) -> Path:
    """The participants table: ``data.csv``, or ``participants.csv`` / ``.tsv`` in ``data.root``.

    A relative ``data.csv`` is looked up in ``data.root`` only (in the working directory when there is no root):
    a file of that name in the working directory is not used, so one command line never reads two different
    tables depending on where it is started from; the error then names both places.
    """
    if csv is not None:
        path = Path(csv).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        if not path.is_file():
            in_cwd = Path(csv).is_file() and path != Path(csv)
            hint = (f"; a file {str(csv)!r} exists in the working directory {os.getcwd()}, but a relative data.csv "
                    "is looked up in data.root: pass its absolute path" if in_cwd else "")  # fmt: skip
            raise FileNotFoundError(f"data.csv: no participants table at {str(path)!r}{hint}")
        return path
    if root is None:
        raise ValueError("data.csv (or data.root holding participants.csv) is required for source=nifti, got None")
    for name in ("participants.csv", "participants.tsv"):
        if os.path.isfile(os.path.join(root, name)):
            return Path(root) / name
    raise FileNotFoundError(f"data.csv: not given and no participants.csv / .tsv in data.root {str(root)!r}")


def check_volume_shape(path: str | os.PathLike) -> None:
    """A readable header, real-valued voxels and a 3-D volume (a 4-D file with a single volume is fine), at least
    2 voxels per axis."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a damaged or foreign file; all mean the same here
        raise ValueError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc}); expected a .nii or .nii.gz "
                         "T1 volume") from exc  # fmt: skip
    dtype = image.get_data_dtype()
    if dtype.fields is not None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"{path}: voxel type {dtype}; expected real grey values (an integer or float type), "
                         "not complex or RGB")  # fmt: skip
    shape = tuple(image.shape)
    spatial = shape[:3] if len(shape) >= 3 and all(s == 1 for s in shape[3:]) else shape
    if len(spatial) != 3 or min(spatial) < 2:
        hint = f" ({int(np.prod(shape[3:]))} volumes: pick one)" if len(shape) > 3 else ""
        raise ValueError(f"{path}: expected one 3-D T1 volume, got shape {list(shape)}{hint}")


def preprocess_volume(
    path: str | os.PathLike, image_size: int, spacing_mm: float | None, percentiles: Sequence[float]
) -> np.ndarray:
    """Read one T1 volume and bring it to float32 ``(image_size,) * 3`` in [0, 1], RAS voxel order."""
    from monai.transforms import LoadImage, Orientation, ResizeWithPadOrCrop, ScaleIntensityRangePercentiles, Spacing

    check_volume_shape(path)
    try:
        image = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)(
            str(path)
        )
    except Exception as exc:  # a truncated .nii.gz raises a bare EOFError, other damage other types
        raise ValueError(f"{path}: cannot read the voxel data ({type(exc).__name__}: {exc}); expected a complete "
                         "NIfTI file (truncated download?)") from exc  # fmt: skip
    values = image.detach().cpu().numpy()
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: the volume holds NaN or infinite values")
    if values.min() == values.max():
        raise ValueError(f"{path}: the volume is constant ({float(values.min()):g} everywhere), an empty image")
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    if spacing_mm is None:  # fit the whole field of view into the cube
        extent = np.asarray(image.shape[1:]) * np.asarray(image.pixdim, dtype=np.float64)
        spacing_mm = float(extent.max()) / image_size
    image = Spacing(pixdim=(spacing_mm,) * 3, mode="bilinear")(image)
    image = ScaleIntensityRangePercentiles(*percentiles, b_min=0.0, b_max=1.0, clip=True)(image)
    image = ResizeWithPadOrCrop(spatial_size=(image_size,) * 3)(image)  # pads with 0, the low end
    out = np.asarray(image.detach().cpu().numpy()[0], dtype=np.float32)
    if out.max() <= out.min():
        raise ValueError(f"{path}: nothing left after scaling to the {list(percentiles)} intensity percentiles")
    return out


def read_volumes(
    paths: Sequence[Path],
    image_size: int,
    spacing_mm: float | None,
    percentiles: Sequence[float],
    progress: bool = True,
) -> np.ndarray:
    """Preprocess every file: float32 ``(N, n, n, n)`` in [0, 1]."""
    out = np.zeros((len(paths),) + (image_size,) * 3, np.float32)
    for i, path in enumerate(tqdm(paths, desc="brain-age NIfTI", unit="volume", disable=not progress)):
        out[i] = preprocess_volume(path, image_size, spacing_mm, percentiles)
    return out
