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

ISBI_SPACING_MM = 0.1  # the challenge's pixel size
ISBI_FOLDERS = ("TrainingData", "Test1Data", "Test2Data")
ISBI_NAMES = ("sella", "nasion", "orbitale", "porion", "subspinale", "supramentale", "pogonion", "menton",
              "gnathion", "gonion", "lower incisal incision", "upper incisal incision", "upper lip", "lower lip",
              "subnasale", "soft tissue pogonion", "posterior nasal spine", "anterior nasal spine",
              "articulare")  # fmt: skip
ISBI_DOCTORS = ("400_senior", "400_junior")


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
                         f"the image of shape {list(shape)}")  # fmt: skip


# ------------------------------------------------------------------------------------------ ISBI 2015
def read_isbi_annotation(path: str | os.PathLike, num_landmarks: int = len(ISBI_NAMES)) -> np.ndarray:
    """The first ``num_landmarks`` lines ``x,y`` (pixels) of one doctor's file, float64 ``(K, 2)``; the lines after
    them are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file missing")
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    points = []
    for i, line in enumerate(lines[:num_landmarks], start=1):
        fields = line.split(",")
        if len(fields) != 2:
            raise ValueError(f"{path}: line {i} is {line!r}, expected 'x,y' ({num_landmarks} landmarks expected, "
                             f"found {i - 1})")  # fmt: skip
        try:
            points.append([float(f) for f in fields])
        except ValueError:
            raise ValueError(f"{path}: line {i}: non-numeric coordinate in {line!r}") from None
    if len(points) != num_landmarks:
        raise ValueError(f"{path}: {len(points)} landmarks, expected {num_landmarks}")
    if not np.isfinite(points).all():
        raise ValueError(f"{path}: non-finite coordinate among the landmarks")
    return np.asarray(points)


def read_grey_image(path: str | os.PathLike) -> np.ndarray:
    """A bitmap as float32 grey levels ``(H, W)``; an unreadable file raises naming it."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image file missing")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable image ({err})") from None


def isbi_cases(root: str | os.PathLike, folders: Sequence[str]) -> list[tuple[str, str]]:
    """``(folder, stem)`` of every ``RawImage/<folder>/NNN.bmp``, folders in the given order, stems sorted."""
    cases = []
    for folder in folders:
        path = Path(root) / "RawImage" / folder
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: ISBI 2015 image folder missing (expected RawImage/{folder} in "
                                    f"data.root)")  # fmt: skip
        stems = sorted(p.stem for p in path.iterdir() if p.suffix.lower() == ".bmp")
        if not stems:
            raise FileNotFoundError(f"{path}: no .bmp images")
        cases += [(folder, s) for s in stems]
    return cases


def read_isbi(root: str | os.PathLike, folders: Sequence[str] = ISBI_FOLDERS, image_size: Sequence[int] = (128, 104),
              progress: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """Read the ISBI 2015 layout (module docstring of :mod:`medrobust.datamodules.landmarks`).

    Returns ``images`` float32 ``(N, H, W)`` grey levels 0-255 resized to ``image_size``; ``landmarks`` float64
    ``(N, 19, 2)`` (row, column) on the resized image, the mean of the two doctors; ``spacing`` ``(N, 2)`` mm;
    ``observer_mre_mm`` ``(N,)`` the doctors' mean radial disagreement per image (mm of the original);
    ``ids`` (the file stems, unique across folders) and ``folders`` ``(N,)``.
    """
    cases = isbi_cases(root, folders)
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
        raise FileNotFoundError(f"{path}: markups file missing")
    system, columns, rows = "RAS", ["id", "x", "y", "z"] + [""] * 7 + ["label"], []
    for line in path.read_text(errors="replace").splitlines():
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
        raise ValueError(f"{path}: the '# columns =' header lacks x, y or z: {columns}")
    ix, iy, iz = (columns.index(c) for c in "xyz")
    il = columns.index("label") if "label" in columns else None
    labels, points = [], []
    for n, row in enumerate(rows, start=1):
        try:
            points.append([float(row[ix]), float(row[iy]), float(row[iz])])
        except (ValueError, IndexError):
            raise ValueError(f"{path}: markup {n}: non-numeric or missing coordinate in {','.join(row)!r}") from None
        labels.append(row[il].strip() if il is not None and il < len(row) and row[il].strip() else f"L{n}")
    if not points:
        raise ValueError(f"{path}: no markups in the file")
    ras = np.asarray(points)
    if not np.isfinite(ras).all():
        raise ValueError(f"{path}: non-finite coordinate among the markups")
    return labels, ras * [-1.0, -1.0, 1.0] if system == "LPS" else ras


def read_nifti_ras(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D volume reoriented to RAS voxel order, float32, and its voxel -> RAS mm affine."""
    import nibabel as nib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image file missing")
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        volume = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types on corrupt files
        raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    if volume.ndim > 3 and volume.size == np.prod(volume.shape[:3]):  # a 4-D file holding one volume
        volume = volume.reshape(volume.shape[:3])
    if volume.ndim != 3 or min(volume.shape) < 2:
        raise ValueError(f"{path}: expected one 3-D volume, got shape {list(volume.shape)}")
    if not np.isfinite(volume).all():
        raise ValueError(f"{path}: the volume holds NaN or infinite values")
    return volume, img.affine


def nifti_landmarks(image_path: str | os.PathLike, markups_path: str | os.PathLike, names: Sequence[str] | None,
                    image_size: Sequence[int], percentiles: Sequence[float] = (0.5, 99.5)) -> tuple:  # fmt: skip
    """One subject: the volume (RAS order, percentiles scaled to [0, 1], resized to ``image_size``), its landmarks
    in voxels of the resized volume ordered as ``names`` (default: the file's order), the spacing ``(3,)`` mm and
    the labels. Landmarks map from RAS mm to voxels through the image's affine."""
    labels, ras = read_fcsv(markups_path)
    if names is not None:
        if sorted(labels) != sorted(names) or len(set(labels)) != len(labels):
            raise ValueError(f"{markups_path}: {len(labels)} landmarks {labels}, expected {len(names)}: {list(names)}")
        ras = ras[[labels.index(n) for n in names]]
        labels = list(names)
    volume, affine = read_nifti_ras(image_path)
    inverse = np.linalg.inv(affine)
    voxels = ras @ inverse[:3, :3].T + inverse[:3, 3]
    check_inside(voxels, volume.shape, labels, markups_path)
    low, high = np.percentile(volume, percentiles)
    if high <= low:
        raise ValueError(f"{image_path}: constant image (nothing between the {list(percentiles)} percentiles)")
    scaled = np.clip((volume - low) / (high - low), 0.0, 1.0)
    spacing = np.linalg.norm(affine[:3, :3], axis=0) * np.asarray(volume.shape) / np.asarray(image_size)
    return resize(scaled, image_size), rescale_points(voxels, volume.shape, image_size), spacing, labels


def read_markups_table(csv_path: str | os.PathLike, root: str | os.PathLike | None) -> list[dict[str, str]]:
    """Rows ``image``, ``markups``[, ``split``][, ``subject``] of the subjects table, paths resolved against
    ``root`` first, then the table's folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: subjects table missing (data.csv)")
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image", "markups"} <= set(rows[0]):
        raise ValueError(f"{csv_path}: needs columns 'image' and 'markups' (and optional 'split', 'subject'), "
                         f"got {list(rows[0]) if rows else 'no rows'}")  # fmt: skip
    bases = [Path(root)] if root is not None else []
    bases.append(csv_path.parent)
    out = []
    for n, row in enumerate(rows, start=2):
        entry = {k: (row.get(k) or "").strip() for k in ("image", "markups", "split", "subject")}
        for key in ("image", "markups"):
            found = [b / entry[key] for b in bases if entry[key] and (b / entry[key]).is_file()]
            entry[key] = str(found[0]) if found else str(bases[0] / entry[key])
        if entry["split"] and entry["split"] not in ("train", "val", "test"):
            raise ValueError(f"{csv_path}: line {n}: split must be train, val or test, got {entry['split']!r}")
        out.append(entry)
    return out
