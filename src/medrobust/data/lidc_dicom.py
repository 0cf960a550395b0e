"""The real LIDC-IDRI CT scans (``source: dicom``): a DICOM tree as downloaded from TCIA.

The tree is walked recursively (folder and file names are not assumed); series are matched to the
annotation database by SeriesInstanceUID. For each nodule whose series is present, the slices around
its consensus centroid are read (HU = stored value * RescaleSlope + RescaleIntercept) and resampled
to the same isotropic, nodule-centred grid the phantom renders on (:mod:`medrobust.data.patches`).

Errors name what is wrong and where: an unreadable file by its path, a series with missing slices or
inconsistent geometry by its SeriesInstanceUID, a tree with no annotated series by the counts found.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from tqdm.auto import tqdm

from medrobust.data.lidc_annotations import Nodule
from medrobust.data.patches import patch_offsets, resample_around

log = logging.getLogger("medrobust")

_HEADER_TAGS = [
    "SOPClassUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "InstanceNumber",
]  # fmt: skip
_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


class DicomFileError(ValueError):
    """A file that should be a DICOM CT slice could not be read or lacks what a slice needs."""


class DicomSeriesError(ValueError):
    """A series whose slices do not form one regular axial volume."""


@dataclass(frozen=True)
class SliceHeader:
    path: str
    z: float
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    orientation: tuple[float, ...]
    instance: int = 0


def _is_dicom_candidate(path: str) -> bool:
    """``*.dcm`` always counts (and must then be valid); other files only when they carry the DICM magic."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _read_header(path: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception as exc:  # pydicom raises many types for damaged files; all mean the same here
        raise DicomFileError(
            f"{path}: cannot read as DICOM ({type(exc).__name__}: {exc}); expected a DICOM file with a "
            "file meta header ('DICM' prefix), e.g. one CT slice of an LIDC-IDRI series"
        ) from exc


def fingerprint_tree(root: str) -> dict:
    """Cheap identity of a folder tree for cache keys: file count, total size and newest mtime."""
    count, size, newest = 0, 0, 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return {"root": str(Path(root).resolve()), "files": count, "bytes": size, "mtime_ns": newest}


def index_tree(
    root: str, wanted: set[str] | None = None, progress: bool = True
) -> tuple[dict[str, list[SliceHeader]], int]:
    """Headers of every CT slice under ``root``, grouped by SeriesInstanceUID.

    Returns ``(series_uid -> slices of the series in ``wanted`` (all when None), number of series found)``.
    Non-CT objects (the radiographs and XML reads that LIDC downloads contain) are skipped.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root: DICOM root {root!r} does not exist or is not a folder")
    paths = sorted(
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files if _is_dicom_candidate(os.path.join(d, f))
    )
    series: dict[str, list[SliceHeader]] = defaultdict(list)
    found: set[str] = set()
    for path in tqdm(paths, desc="LIDC DICOM headers", disable=not progress, leave=False):
        ds = _read_header(path)
        if ds.get("Modality", "CT") != "CT" or "SeriesInstanceUID" not in ds:
            continue
        uid = str(ds.SeriesInstanceUID)
        found.add(uid)
        if wanted is not None and uid not in wanted:
            continue
        missing = [t for t in ("ImagePositionPatient", "PixelSpacing", "Rows", "Columns") if t not in ds]
        if missing:
            raise DicomFileError(f"{path}: CT slice of series {uid} lacks {', '.join(missing)}")
        series[uid].append(
            SliceHeader(
                path=path,
                z=float(ds.ImagePositionPatient[2]),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
                orientation=tuple(float(v) for v in ds.get("ImageOrientationPatient", _AXIAL)),
                instance=int(ds.get("InstanceNumber", 0) or 0),
            )
        )
    return dict(series), len(found)


def _drop_duplicates(uid: str, slices: list[SliceHeader]) -> list[SliceHeader]:
    """Some LIDC series hold two slices at one z; keep the lower InstanceNumber, as pylidc does."""
    kept: dict[float, SliceHeader] = {}
    for s in sorted(slices, key=lambda s: (s.z, s.instance)):
        kept.setdefault(round(s.z, 3), s)
    if len(kept) < len(slices):
        n_dup = len(slices) - len(kept)
        log.warning("series %s: %d duplicate slice positions, kept the lower InstanceNumber", uid, n_dup)
    return list(kept.values())


def check_series(
    uid: str, slices: list[SliceHeader], nodules: list[Nodule], expected_z: np.ndarray
) -> list[SliceHeader]:
    """Sort a series by z and check it is one axial volume covering its nodules' outlines.

    ``expected_z`` are the series' slice positions in the annotation DB; those between the series'
    first and last slice must all be present (a partial series is fine, a hole is not). Raises
    :class:`DicomSeriesError` naming the series for missing slices, mixed or non-axial geometry,
    a pixel spacing other than the annotation DB's, or outlines on absent slices.
    """
    slices = sorted(_drop_duplicates(uid, slices), key=lambda s: s.z)
    z = np.array([s.z for s in slices])
    shapes = {(s.rows, s.columns) for s in slices}
    spacings = {s.pixel_spacing for s in slices}
    if len(shapes) > 1 or len(spacings) > 1:
        raise DicomSeriesError(f"series {uid}: inconsistent geometry, slice sizes {shapes}, pixel spacings {spacings}")
    if any(np.abs(np.array(s.orientation) - _AXIAL).max() > 1e-3 for s in slices):
        raise DicomSeriesError(f"series {uid}: inconsistent geometry, expected axial slices (orientation 1,0,0,0,1,0)")
    ps = next(iter(spacings))
    db_ps = nodules[0].pixel_spacing
    if abs(ps[0] - ps[1]) > 1e-4 or abs(ps[0] - db_ps) > 1e-3:
        raise DicomSeriesError(
            f"series {uid}: inconsistent geometry, pixel spacing {ps} but the annotation DB has {db_ps}"
        )
    tol = 0.25 * (np.median(np.diff(expected_z)) if len(expected_z) > 1 else 1.0)
    inside = expected_z[(expected_z > z[0] + tol) & (expected_z < z[-1] - tol)]
    holes = [e for e in inside if np.abs(z - e).min() > tol]
    if holes:
        raise DicomSeriesError(
            f"series {uid}: missing slices, {len(holes)} slice(s) of the scan absent at z = "
            f"{', '.join(f'{h:.2f}' for h in holes[:5])}{' ...' if len(holes) > 5 else ''} mm"
        )
    for nod in nodules:
        absent = [c for c in nod.contour_z if np.abs(z - c).min() > tol]
        if absent:
            raise DicomSeriesError(
                f"series {uid}: missing slices, nodule {nod.nodule_id} is outlined at z = "
                f"{', '.join(f'{c:.2f}' for c in absent)} mm but the series has no slice there"
            )
    return slices


def read_hu(header: SliceHeader) -> np.ndarray:
    """One slice in HU: ``(rows, columns)`` float32."""
    try:
        ds = pydicom.dcmread(header.path)
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise DicomFileError(f"{header.path}: cannot read the pixel data ({type(exc).__name__}: {exc})") from exc
    if pixels.shape != (header.rows, header.columns):
        raise DicomFileError(f"{header.path}: pixel data {pixels.shape}, expected {(header.rows, header.columns)}")
    return pixels * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))


def nodule_patch(
    nodule: Nodule, slices: list[SliceHeader], spatial_dims: int, patch_size: int, spacing: float, cache: dict
) -> np.ndarray:
    """HU patch around the nodule's consensus centroid: ``(H, W)`` or ``(D, H, W)`` int16.

    Only the slices the grid touches are read (``cache`` keeps them per path); beyond the scan the
    nearest slice / edge pixel repeats.
    """
    oz = patch_offsets(patch_size, spacing) if spatial_dims == 3 else np.zeros(1)
    oyx = patch_offsets(patch_size, spacing)
    z = np.array([s.z for s in slices])
    lo = np.searchsorted(z, nodule.centroid_zyx[0] + oz.min(), side="right") - 1
    hi = np.searchsorted(z, nodule.centroid_zyx[0] + oz.max(), side="left")
    lo, hi = max(lo, 0), min(hi, len(z) - 1)
    needed = slices[lo : hi + 1]
    for s in needed:
        if s.path not in cache:
            cache[s.path] = read_hu(s)
    volume = np.stack([cache[s.path] for s in needed])
    hu = resample_around(volume, z[lo : hi + 1], nodule.pixel_spacing, nodule.centroid_zyx, (oz, oyx, oyx))
    hu = np.clip(np.round(hu), -32768, 32767).astype(np.int16)
    return hu[0] if spatial_dims == 2 else hu


def read_patches(
    root: str,
    nodules: list[Nodule],
    slice_z: dict[int, np.ndarray],
    spatial_dims: int,
    patch_size: int,
    spacing: float,
    progress: bool = True,
) -> tuple[list[Nodule], np.ndarray]:
    """Patches of every nodule whose series is under ``root``: ``(present nodules, (N, *patch) int16 HU)``.

    ``slice_z`` maps scan id -> the scan's slice positions in the annotation DB (to find holes).
    """
    by_series: dict[str, list[Nodule]] = defaultdict(list)
    for nod in nodules:
        by_series[nod.series_uid].append(nod)
    series, n_found = index_tree(root, wanted=set(by_series), progress=progress)
    log.info(
        "LIDC DICOM: %d CT series under %s, %d of them in the annotation DB, %d of %d nodules covered",
        n_found, root, len(series), sum(len(by_series[u]) for u in series), len(nodules),
    )  # fmt: skip
    if not series:
        raise FileNotFoundError(
            f"data.root: found {n_found} DICOM CT series under {root!r} but none matched a scan of the LIDC "
            f"annotation DB ({len(by_series)} annotated series wanted, matched by SeriesInstanceUID)"
        )
    present, patches = [], []
    for uid in tqdm(sorted(series), desc="LIDC DICOM patches", disable=not progress, leave=False):
        try:
            slices = check_series(uid, series[uid], by_series[uid], slice_z[by_series[uid][0].scan_id])
        except DicomSeriesError as exc:  # a UID alone does not say which folder of a large download to fix
            folders = sorted({os.path.dirname(s.path) for s in series[uid]})
            raise DicomSeriesError(f"{exc} (the series' files are in {', '.join(folders)})") from exc
        cache: dict = {}
        for nod in by_series[uid]:
            present.append(nod)
            patches.append(nodule_patch(nod, slices, spatial_dims, patch_size, spacing, cache))
    order = np.argsort([n.nodule_id for n in present], kind="stable")
    return [present[i] for i in order], np.stack([patches[i] for i in order])
