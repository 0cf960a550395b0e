"""Readers of real landmark data: the ISBI 2015 cephalometric layout and 3D Slicer ``.fcsv`` markups on NIfTI.

Every reader returns images resized to one configured shape with their landmarks moved along: voxel coordinates
in the order of the image axes, pixel-centre convention (voxel ``i`` covers ``[i - 0.5, i + 0.5]``), so resizing
maps ``c -> (c + 0.5) * new / old - 0.5`` and the spacing grows by ``old / new``; an error in voxels times the
spacing stays millimetres of the original image. Bad input raises an error naming the file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from medrobust.data.brain_nifti import _resolve, _why_not_found, check_volume_shape

ISBI_SPACING_MM = 0.1  # the challenge's pixel size
ISBI_FOLDERS = ("TrainingData", "Test1Data", "Test2Data")
ISBI_NAMES = ("sella", "nasion", "orbitale", "porion", "subspinale", "supramentale", "pogonion", "menton",
              "gnathion", "gonion", "lower incisal incision", "upper incisal incision", "upper lip", "lower lip",
              "subnasale", "soft tissue pogonion", "posterior nasal spine", "anterior nasal spine",
              "articulare")  # fmt: skip
ISBI_DOCTORS = ("400_senior", "400_junior")
TABLE_COLUMNS = ("image", "markups", "split", "subject")
SPLIT_NAMES = ("train", "val", "test")


# ------------------------------------------------------------------------------------------ resizing
def resize(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear resampling to ``shape`` (pixel centres aligned as in the module docstring), Gaussian-smoothed first
    when shrinking (anti-aliasing), float32."""
    factors = np.asarray(image.shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    smoothed = ndimage.gaussian_filter(image.astype(np.float32), np.maximum(factors - 1, 0) / 2, truncate=3.0)
    axes = [(np.arange(n) + 0.5) * f - 0.5 for n, f in zip(shape, factors)]
    idx = np.meshgrid(*axes, indexing="ij", sparse=True)
    idx = np.broadcast_arrays(*idx)
    return ndimage.map_coordinates(smoothed, idx, order=1, mode="nearest").astype(np.float32)


def rescale_points(points: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Voxel coordinates ``(K, D)`` on ``old_shape`` -> the same points on ``new_shape`` (see :func:`resize`)."""
    scale = np.asarray(new_shape, dtype=np.float64) / np.asarray(old_shape, dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) + 0.5) * scale - 0.5


def check_inside(points: np.ndarray, shape: Sequence[int], names: Sequence[str], path: str | os.PathLike) -> None:
    """Every landmark lies on the image (within half a voxel of its edge voxels)."""
    outside = np.flatnonzero(((points < -0.5) | (points > np.asarray(shape) - 0.5)).any(axis=1))
    if len(outside):
        k = int(outside[0])
        raise ValueError(f"{path}: landmark {names[k]!r} at voxel {np.round(points[k], 2).tolist()} lies outside "
                         f"the image of shape {list(shape)}; expected every landmark on its image")  # fmt: skip


# ------------------------------------------------------------------------------------------ reading files
def read_failure(path: str | os.PathLike, err: Exception, expected: str, error: type = ValueError) -> Exception:
    """The error for a file that is there but cannot be read. A file-system refusal (permissions, a folder) keeps
    its type, worded as the LIDC reader words it; damage or a foreign format is an ``error`` (a ValueError) with
    the reader's reason."""
    if isinstance(err, OSError) and err.errno is not None:
        from medrobust.data.lidc_dicom import _unreadable  # imports pydicom: only once a read has failed

        return _unreadable(str(path), err, expected)
    return error(f"{path}: unreadable ({type(err).__name__}: {err}); expected {expected}")


def read_text(path: Path, expected: str) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as err:
        raise read_failure(path, err, expected) from None


def load_nifti(path: str | os.PathLike, expected: str, error: type = ValueError):
    """nibabel's image of ``path``, header read and voxels not yet; a file that cannot be opened or parsed raises
    naming it."""
    import nibabel as nib

    try:
        with open(path, "rb"):  # nibabel words a refused open as "Could not read file", without the reason
            pass
        return nib.load(str(path))
    except Exception as err:  # nibabel raises many types on damaged or foreign files
        raise read_failure(path, err, expected, error) from None


def list_folder(folder: Path, expected: str) -> list[Path]:
    """The folder's entries, sorted; one that cannot be listed raises naming it (``glob`` would skip it silently)."""
    try:
        return sorted(folder.iterdir())
    except OSError as err:
        raise read_failure(folder, err, expected) from None


# ------------------------------------------------------------------------------------------ ISBI 2015
def read_isbi_annotation(path: str | os.PathLike, num_landmarks: int = len(ISBI_NAMES)) -> np.ndarray:
    """The first ``num_landmarks`` lines ``x,y`` (pixels) of one doctor's file, float64 ``(K, 2)``; the lines after
    them are ignored."""
    path = Path(path)
    expected = f"{num_landmarks} lines 'x,y' (pixels), one per landmark"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file missing; expected {expected}")
    lines = [line.strip() for line in read_text(path, f"a text file of {num_landmarks} lines 'x,y'").splitlines()]
    points = []
    for i, line in enumerate(lines[:num_landmarks], start=1):
        fields = line.split(",")
        if len(fields) != 2:
            raise ValueError(f"{path}: line {i} is {line!r}, expected 'x,y' ({num_landmarks} landmarks expected, "
                             f"found {i - 1})")  # fmt: skip
        try:
            point = [float(f) for f in fields]
        except ValueError:
            point = [np.nan]
        if not np.isfinite(point).all():
            raise ValueError(f"{path}: line {i}: non-numeric or non-finite coordinate in {line!r}; expected 'x,y' "
                             "pixel numbers")  # fmt: skip
        points.append(point)
    if len(points) != num_landmarks:
        raise ValueError(f"{path}: {len(points)} landmarks, expected {expected}")
    return np.asarray(points)


def read_grey_image(path: str | os.PathLike) -> np.ndarray:
    """A bitmap as float32 grey levels ``(H, W)``; a missing, unreadable, damaged or blank file raises naming it."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image file missing; expected a radiograph")
    try:
        with Image.open(path) as img:
            image = np.asarray(img.convert("L"), dtype=np.float32)
    except (OSError, ValueError) as err:  # PIL: UnidentifiedImageError, "image file is truncated", ...
        raise read_failure(path, err, "a complete bitmap radiograph") from None
    if image.size == 0 or image.min() == image.max():
        level = f", every pixel {image.flat[0]:g}" if image.size else ""
        raise ValueError(f"{path}: blank image ({list(image.shape)} pixels{level}); expected a radiograph")
    return image


def isbi_images(root: str | os.PathLike) -> dict[str, Path]:
    """Every radiograph ``RawImage/<any folder>/NNN.bmp`` by stem. A stem in two folders is an error: both images
    would take the one annotation file, and could land in two splits."""
    images: dict[str, Path] = {}
    expected = "ISBI 2015 radiographs RawImage/<folder>/NNN.bmp"
    for folder in list_folder(Path(root) / "RawImage", expected):
        for path in list_folder(folder, expected) if folder.is_dir() else []:
            if path.suffix.lower() != ".bmp":
                continue
            if path.stem in images:
                raise ValueError(f"{path}: image {path.stem} is also {images[path.stem]}; expected each radiograph "
                                 f"once (both would take AnnotationsByMD/*/{path.stem}.txt)")  # fmt: skip
            images[path.stem] = path
    return images


def isbi_cases(root: str | os.PathLike, folders: Sequence[str], images: dict[str, Path]) -> list[tuple[str, str]]:
    """``(folder, stem)`` of every image of ``images`` in ``RawImage/<folder>``, folders in the given order, stems
    sorted; a missing or empty folder raises."""
    cases = []
    for folder in folders:
        path = Path(root) / "RawImage" / folder
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: ISBI 2015 image folder missing (expected RawImage/{folder} in "
                                    f"data.root)")  # fmt: skip
        stems = sorted(s for s, p in images.items() if p.parent == path)
        if not stems:
            raise FileNotFoundError(f"{path}: no .bmp images; expected the radiographs NNN.bmp")
        cases += [(folder, s) for s in stems]
    return cases


def check_isbi_annotations(root: str | os.PathLike, images: dict[str, Path], cases: Sequence[tuple[str, str]]) -> None:
    """Both doctors annotated every image used, and no annotation file lacks its image (in any RawImage folder):
    nothing on either side is dropped without a word."""
    for doctor in ISBI_DOCTORS:
        folder = Path(root) / "AnnotationsByMD" / doctor
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: annotation folder missing; expected AnnotationsByMD/{doctor}/NNN.txt "
                                    "for every image")  # fmt: skip
        listed = list_folder(folder, f"the annotation files AnnotationsByMD/{doctor}/NNN.txt")
        names = {p.name for p in listed}
        for image_folder, stem in cases:
            if f"{stem}.txt" not in names:
                image = Path(root) / "RawImage" / image_folder / f"{stem}.bmp"
                raise FileNotFoundError(f"{folder / f'{stem}.txt'}: annotation file missing; expected one per image, "
                                        f"here for {image}")  # fmt: skip
        for path in listed:
            if path.suffix == ".txt" and path.stem not in images:
                raise FileNotFoundError(f"{path}: no radiograph RawImage/<folder>/{path.stem}.bmp for this "
                                        "annotation; expected one image per annotation file")  # fmt: skip


def read_isbi(root: str | os.PathLike, folders: Sequence[str] = ISBI_FOLDERS, image_size: Sequence[int] = (128, 104),
              progress: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """Read the ISBI 2015 layout (module docstring of :mod:`medrobust.datamodules.landmarks`).

    Returns ``images`` float32 ``(N, H, W)`` grey levels 0-255 resized to ``image_size``; ``landmarks`` float64
    ``(N, 19, 2)`` (row, column) on the resized image, the mean of the two doctors; ``spacing`` ``(N, 2)`` mm;
    ``observer_mre_mm`` ``(N,)`` the doctors' mean radial disagreement per image (mm of the original);
    ``ids`` (the file stems, unique across folders) and ``folders`` ``(N,)``.
    """
    images = isbi_images(root)
    cases = isbi_cases(root, folders, images)
    check_isbi_annotations(root, images, cases)
    shape = tuple(int(s) for s in image_size)
    n, k = len(cases), len(ISBI_NAMES)
    out = {"images": np.zeros((n, *shape), np.float32), "landmarks": np.zeros((n, k, 2)), "spacing": np.zeros((n, 2)),
           "observer_mre_mm": np.zeros(n),
           "ids": np.asarray([s for _, s in cases]), "folders": np.asarray([f for f, _ in cases])}  # fmt: skip
    for i, (folder, stem) in enumerate(tqdm(cases, desc="ISBI 2015", unit="image", disable=not progress)):
        image_path = Path(root) / "RawImage" / folder / f"{stem}.bmp"
        doctors = [read_isbi_annotation(Path(root) / "AnnotationsByMD" / d / f"{stem}.txt") for d in ISBI_DOCTORS]
        image = read_grey_image(image_path)
        for d, xy in zip(ISBI_DOCTORS, doctors):
            check_inside(xy[:, ::-1], image.shape, ISBI_NAMES, Path(root) / "AnnotationsByMD" / d / f"{stem}.txt")
        mean_rc = (doctors[0] + doctors[1])[:, ::-1] / 2  # (x, y) -> (row, column)
        out["observer_mre_mm"][i] = np.linalg.norm(doctors[0] - doctors[1], axis=1).mean() * ISBI_SPACING_MM
        out["images"][i] = resize(image, shape)
        out["landmarks"][i] = rescale_points(mean_rc, image.shape, shape)
        out["spacing"][i] = ISBI_SPACING_MM * np.asarray(image.shape) / np.asarray(shape)
    return out


# ------------------------------------------------------------------------------------------ 3D Slicer markups
def read_fcsv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Labels and RAS mm ``(K, 3)`` of a Slicer markups file; LPS files (``# CoordinateSystem = LPS`` or ``= 1``)
    are converted to RAS (x and y negated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: markups file missing; expected a 3D Slicer .fcsv file")
    system, columns, rows = "RAS", ["id", "x", "y", "z"] + [""] * 7 + ["label"], []
    for line in read_text(path, "a 3D Slicer .fcsv markups file").splitlines():
        if line.startswith("#"):
            key, _, value = (s.strip() for s in line[1:].partition("="))
            if key.lower() == "coordinatesystem":
                system = {"0": "RAS", "1": "LPS"}.get(value, value.upper())
            elif key.lower() == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append(next(csv.reader([line])))
    if system not in ("RAS", "LPS"):
        raise ValueError(f"{path}: coordinate system {system!r} not supported (RAS / 0 or LPS / 1)")
    if not {"x", "y", "z"} <= set(columns):
        raise ValueError(f"{path}: the '# columns =' header lacks x, y or z: {columns}; expected all three")
    ix, iy, iz = (columns.index(c) for c in "xyz")
    il = columns.index("label") if "label" in columns else None
    labels, points = [], []
    for n, row in enumerate(rows, start=1):
        try:
            point = [float(row[ix]), float(row[iy]), float(row[iz])]
        except (ValueError, IndexError):
            point = [np.nan]
        if not np.isfinite(point).all():
            raise ValueError(f"{path}: markup {n}: non-numeric, non-finite or missing coordinate in {','.join(row)!r}; "
                             "expected x, y and z in mm")  # fmt: skip
        points.append(point)
        labels.append(row[il].strip() if il is not None and il < len(row) and row[il].strip() else f"L{n}")
    if not points:
        raise ValueError(f"{path}: no markups in the file; expected one line per landmark")
    ras = np.asarray(points)
    return labels, ras * [-1.0, -1.0, 1.0] if system == "LPS" else ras


def read_nifti_ras(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D volume reoriented to RAS voxel order, float32, and its voxel -> RAS mm affine."""
    import nibabel as nib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image file missing; expected a NIfTI volume")
    expected = "a complete .nii or .nii.gz volume"
    img = load_nifti(path, expected)
    check_volume_shape(path)  # real-valued voxels, one 3-D volume: the brain-age reader's checks
    try:
        img = nib.as_closest_canonical(img)
        volume = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # a truncated .nii.gz: EOFError, zlib.error, ...
        raise read_failure(path, err, expected) from None
    volume = volume.reshape(volume.shape[:3])  # a 4-D file holding one volume
    if not np.isfinite(volume).all():
        raise ValueError(f"{path}: the volume holds NaN or infinite values; expected finite grey values")
    return volume, img.affine


def check_names(labels: Sequence[str], names: Sequence[str], path: str | os.PathLike) -> None:
    """A markups file holds each landmark of ``names`` once, and nothing else."""
    missing = [n for n in names if n not in labels]
    extra = [x for x in labels if x not in names]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    found = [f"{what} {items}" for what, items in (("lacks", missing), ("also has", extra), ("repeats", repeated))
             if items]  # fmt: skip
    if found:
        raise ValueError(f"{path}: {len(labels)} landmarks {list(labels)} ({'; '.join(found)}); expected "
                         f"{len(names)} landmarks {list(names)}, each once (data.landmark_names, else the labels of "
                         "the first markups file)")  # fmt: skip


def nifti_landmarks(image_path: str | os.PathLike, markups_path: str | os.PathLike, names: Sequence[str] | None,
                    image_size: Sequence[int], percentiles: Sequence[float] = (0.5, 99.5)) -> tuple:  # fmt: skip
    """One subject: the volume (RAS order, percentiles scaled to [0, 1], resized to ``image_size``), its landmarks
    in voxels of the resized volume ordered as ``names`` (default: the file's order), the spacing ``(3,)`` mm and
    the labels. Landmarks map from RAS mm to voxels through the image's affine."""
    labels, ras = read_fcsv(markups_path)
    if names is not None:
        check_names(labels, names, markups_path)
        ras = ras[[labels.index(n) for n in names]]
        labels = list(names)
    volume, affine = read_nifti_ras(image_path)
    inverse = np.linalg.inv(affine)
    voxels = ras @ inverse[:3, :3].T + inverse[:3, 3]
    check_inside(voxels, volume.shape, labels, markups_path)
    low, high = np.percentile(volume, percentiles)
    if high <= low:
        raise ValueError(f"{image_path}: constant image (nothing between the {list(percentiles)} percentiles); "
                         "expected a volume with contrast")  # fmt: skip
    scaled = np.clip((volume - low) / (high - low), 0.0, 1.0)
    spacing = np.linalg.norm(affine[:3, :3], axis=0) * np.asarray(volume.shape) / np.asarray(image_size)
    return resize(scaled, image_size), rescale_points(voxels, volume.shape, image_size), spacing, labels


# ------------------------------------------------------------------------------------------ the subjects table
def read_markups_table(csv_path: str | os.PathLike, root: str | os.PathLike | None) -> list[dict[str, str]]:
    """Rows ``image``, ``markups``[, ``split``][, ``subject``] of the subjects table, paths resolved against
    the table's folder first, then ``root``. Every row is checked: its files exist, each scan is listed once, a
    split column is filled in every row with known splits, and a subject's scans share one split."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: subjects table missing (data.csv)")
    rows = table_rows(csv_path)
    # the table's own folder first: a stale file of the same name under data.root (by default the AFIDs phantom's
    # cache) must not stand in for the scan sitting next to the table
    bases = [csv_path.parent] + ([Path(root)] if root is not None else [])
    entries = [table_entry(f"{csv_path} row {line}", row, bases) for line, row in rows]
    check_scans(csv_path, [line for line, _ in rows], entries)
    return entries


def table_rows(csv_path: Path) -> list[tuple[int, dict]]:
    """``(line, row)`` of the table: a header with image and markups, at least one row, one value per column."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [(reader.line_num, row) for row in reader]
            header = list(reader.fieldnames or [])
    except OSError as err:
        raise read_failure(csv_path, err, "the subjects table (data.csv)") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{csv_path}: cannot read the table ({type(err).__name__}: {err}); expected UTF-8 text, "
                         "comma-separated") from None  # fmt: skip
    if not {"image", "markups"} <= set(header):
        raise ValueError(f"{csv_path}: needs columns 'image' and 'markups' (and optional 'split', 'subject'), "
                         f"got {header}")  # fmt: skip
    if not rows:
        raise ValueError(f"{csv_path}: no subjects, only the header; expected one row per scan")
    for line, row in rows:  # a stray separator shifts the later columns of its row: stop rather than misread
        n_fields = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
        if n_fields != len(header):
            raise ValueError(f"{csv_path} row {line}: {n_fields} fields, but the header has {len(header)}; expected "
                             "one value per column")  # fmt: skip
    return rows


def table_entry(where: str, row: dict, bases: Sequence[Path]) -> dict[str, str]:
    """One row's ``image``, ``markups`` (resolved existing files), ``split`` and ``subject``."""
    entry = {k: (row.get(k) or "").strip() for k in TABLE_COLUMNS}
    for key, what in (("image", "a NIfTI volume"), ("markups", "a 3D Slicer .fcsv markups file")):
        if not entry[key]:
            raise ValueError(f"{where}: empty {key} cell; expected the path of {what}")
        found = _resolve(entry[key], bases)
        if found is None:
            raise FileNotFoundError(f"{where}: {key} {entry[key]!r} not found ({not_found(entry[key], bases)}); "
                                    f"expected {what} (a relative path is looked up in data.root, then in the table's "
                                    "folder)")  # fmt: skip
        entry[key] = str(found)
    if entry["split"] and entry["split"] not in SPLIT_NAMES:
        raise ValueError(f"{where}: split {entry['split']!r}; expected train, val or test")
    return entry


def not_found(text: str, bases: Sequence[Path]) -> str:
    """Why a table path names no file: the paths tried, or what is there instead (a broken link, a folder)."""
    path = Path(text).expanduser()
    tried = [path] if path.is_absolute() else [b / path for b in bases]
    if any(os.path.lexists(p) for p in tried):
        return _why_not_found(text, bases)
    return " and ".join(map(str, tried)) + " missing"


def check_scans(csv_path: Path, lines: Sequence[int], entries: Sequence[dict[str, str]]) -> None:
    """Each scan listed once (a repeat would count twice, maybe in two splits); with a split column, every row
    fills it and all scans of a subject share one split (a subject in two splits leaks into the test)."""
    first_row: dict[str, int] = {}
    split_of: dict[str, tuple[str, int]] = {}
    with_split = any(e["split"] for e in entries)
    for line, entry in zip(lines, entries):
        where = f"{csv_path} row {line}"
        image = os.path.realpath(entry["image"])
        if image in first_row:
            raise ValueError(f"{where}: image {entry['image']} is already listed on row {first_row[image]}; expected "
                             "each scan once")  # fmt: skip
        first_row[image] = line
        if with_split and not entry["split"]:
            raise ValueError(f"{where}: empty split cell; expected train, val or test in every row once the column "
                             "is used (an empty column splits by data.split)")  # fmt: skip
        if with_split and entry["subject"]:
            split, seen = split_of.setdefault(entry["subject"], (entry["split"], line))
            if split != entry["split"]:
                raise ValueError(f"{where} (subject {entry['subject']!r}): split {entry['split']!r}, but row {seen} "
                                 f"puts the subject in {split!r}; expected all of a subject's scans in one "
                                 "split")  # fmt: skip
