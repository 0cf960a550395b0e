"""The real LIDC-IDRI CT scans (``source: dicom``): a DICOM tree as downloaded from TCIA.

The tree is walked recursively (folder and file names are not assumed); series are matched to the
annotation database by SeriesInstanceUID. For each nodule whose series is present, the slices around
its consensus centroid are read (HU = stored value * RescaleSlope + RescaleIntercept) and resampled
to the same isotropic, nodule-centred grid the phantom renders on (:mod:`medrobust.data.patches`).

Errors name what is wrong and where: an unreadable file or folder (permissions, a dangling link) by its path,
a slice without the tags a CT slice needs or with incomplete or blank pixel data by its path and tag, two
different images at one slice position by both paths, a series with missing slices or inconsistent geometry by
its SeriesInstanceUID and folders, a tree with no annotated series by the counts found. Nothing under the
root is skipped silently but the files that are not DICOM (no ``.dcm`` suffix, no DICM magic) and the
DICOM objects that are not CT (the radiographs and XML reads of an LIDC download).
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

_REQUIRED_TAGS = ("ImagePositionPatient", "PixelSpacing", "Rows", "Columns", "BitsAllocated", "PixelData")
# The CT Image module makes both Type 1 (PS3.3 C.8.2.1): a CT file without them is not conformant, and no
# default is provably right -- LIDC scanners store unsigned values with intercept -1024, others signed ones
# with intercept 0 -- so a missing one is an error, never slope 1 / intercept 0 (a silent +1024 HU shift).
_RESCALE_TAGS = ("RescaleSlope", "RescaleIntercept")
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
    slope: float = 1.0
    intercept: float = 0.0
    sop_uid: str = ""


def _unreadable(path: str, exc: OSError, expected: str) -> OSError:
    """``exc`` (same type) with a message naming ``path``, the reason and what was expected there."""
    reason = exc.strerror or str(exc)
    if os.path.islink(path) and not os.path.exists(path):
        reason = f"a broken symbolic link to {os.readlink(path)!r}"
    return type(exc)(f"{path}: cannot read it ({reason}); expected {expected} under data.root, readable by this "
                     "process")


def walk_files(root: str):
    """Every file under ``root`` (folder links followed, each real folder once), in sorted order.

    A folder that cannot be listed raises (naming it and why): ``os.walk`` would skip it, and with it a series.
    """

    def fail(exc: OSError) -> None:
        raise _unreadable(exc.filename or root, exc, "a folder of the DICOM tree") from exc

    seen: set[str] = set()
    for dirpath, dirnames, files in os.walk(root, onerror=fail, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree: do not loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        yield from (os.path.join(dirpath, name) for name in sorted(files))


def _is_dicom_candidate(path: str) -> bool:
    """``*.dcm`` always counts (and must then be valid); other files only when they carry the DICM magic.
    A file that cannot be opened raises: it may be a slice."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            magic = fh.read(4) == b"DICM"
    except OSError as exc:
        raise _unreadable(path, exc, "a file (a DICOM slice or any other)") from exc
    return magic or path.lower().endswith(".dcm")


def _read_header(path: str) -> pydicom.Dataset:
    """Every element but the pixel data, which is located (offset, length) and left on disk."""
    try:
        return pydicom.dcmread(path, defer_size=1024)
    except Exception as exc:  # pydicom raises many types for damaged files; all mean the same here
        raise DicomFileError(
            f"{path}: cannot read as DICOM ({type(exc).__name__}: {exc}); expected a DICOM file with a "
            "file meta header ('DICM' prefix), e.g. one CT slice of an LIDC-IDRI series"
        ) from exc


def fingerprint_tree(root: str) -> dict:
    """Cheap identity of a folder tree for cache keys: file count, total size and newest mtime."""
    count, size, newest = 0, 0, 0
    for path in walk_files(root):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise _unreadable(path, exc, "a file (a DICOM slice or any other)") from exc
        count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return {"root": str(Path(root).resolve()), "files": count, "bytes": size, "mtime_ns": newest}


def _check_pixel_data(path: str, ds: pydicom.Dataset, uid: str) -> None:
    """The slice holds one complete 2-D image. Checked on every slice of a used series without decoding it
    (decoding all ~240k LIDC slices would multiply the indexing time): a damaged slice outside every
    patch is found too. Patches decode their slices and check them again (:func:`read_hu`)."""
    element = ds.get_item("PixelData", keep_deferred=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames != 1 or samples != 1:
        raise DicomFileError(f"{path}: CT slice of series {uid} has NumberOfFrames {frames}, SamplesPerPixel "
                             f"{samples}; expected one grey-level 2-D slice (1 and 1)")  # fmt: skip
    if ds.file_meta.get("TransferSyntaxUID") is None or ds.file_meta.TransferSyntaxUID.is_compressed:
        return  # encapsulated: the frame's size is known only once decoded
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
    length = getattr(element, "length", None)
    if length is None:  # read, not deferred (small)
        length = len(ds.PixelData)
    if length < expected:
        raise DicomFileError(f"{path}: PixelData holds {length} bytes; expected Rows x Columns x BitsAllocated/8 "
                             f"= {ds.Rows} x {ds.Columns} x {ds.BitsAllocated}/8 = {expected}")  # fmt: skip
    end = getattr(element, "value_tell", None)
    if end is not None and end + length > os.path.getsize(path):
        raise DicomFileError(f"{path}: truncated, the file is {os.path.getsize(path)} bytes but its PixelData "
                             f"ends at byte {end + length}; expected a complete file (re-download it)")  # fmt: skip


def _rescale(path: str, ds: pydicom.Dataset, uid: str) -> tuple[float, float]:
    """``(RescaleSlope, RescaleIntercept)``: both required (see :data:`_RESCALE_TAGS`), finite, slope not 0."""
    missing = [t for t in _RESCALE_TAGS if t not in ds or ds[t].value in (None, "")]
    if missing:
        raise DicomFileError(
            f"{path}: CT slice of series {uid} lacks {' and '.join(missing)}; expected both RescaleSlope and "
            "RescaleIntercept (HU = stored value x slope + intercept; the CT Image module requires them)"
        )
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
        raise DicomFileError(f"{path}: RescaleSlope {slope:g} / RescaleIntercept {intercept:g}; expected finite "
                             "values and a slope other than 0")  # fmt: skip
    return slope, intercept


def _slice_header(path: str, ds: pydicom.Dataset, uid: str) -> SliceHeader:
    missing = [t for t in _REQUIRED_TAGS if t not in ds]
    if missing:
        raise DicomFileError(f"{path}: CT slice of series {uid} lacks {', '.join(missing)}")
    if int(ds.Rows) < 2 or int(ds.Columns) < 2:
        raise DicomFileError(f"{path}: Rows {ds.Rows}, Columns {ds.Columns}; expected a 2-D image of at least 2 x 2")
    _check_pixel_data(path, ds, uid)
    slope, intercept = _rescale(path, ds, uid)
    return SliceHeader(
        path=path,
        z=float(ds.ImagePositionPatient[2]),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
        orientation=tuple(float(v) for v in ds.get("ImageOrientationPatient", _AXIAL)),
        instance=int(ds.get("InstanceNumber", 0) or 0),
        slope=slope,
        intercept=intercept,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
    )


def index_tree(
    root: str, wanted: set[str] | None = None, progress: bool = True
) -> tuple[dict[str, list[SliceHeader]], int]:
    """Headers of every CT slice under ``root``, grouped by SeriesInstanceUID.

    Returns ``(series_uid -> slices of the series in ``wanted`` (all when None), number of series found)``.
    Non-CT objects (the radiographs and XML reads that LIDC downloads contain) are skipped. One image
    (SOPInstanceUID) stored in two files is an error naming both: which copy is read would be arbitrary.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root: DICOM root {root!r} does not exist or is not a folder")
    paths = [p for p in walk_files(root) if _is_dicom_candidate(p)]
    series: dict[str, list[SliceHeader]] = defaultdict(list)
    found: set[str] = set()
    first_copy: dict[str, str] = {}
    for path in tqdm(paths, desc="LIDC DICOM headers", disable=not progress, leave=False):
        ds = _read_header(path)
        if ds.get("Modality", "CT") != "CT" or "SeriesInstanceUID" not in ds:
            continue
        uid = str(ds.SeriesInstanceUID)
        found.add(uid)
        if wanted is not None and uid not in wanted:
            continue
        header = _slice_header(path, ds, uid)
        if header.sop_uid:
            other = first_copy.setdefault(header.sop_uid, path)
            if other != path:
                raise DicomFileError(f"{path}: the same image (SOPInstanceUID {header.sop_uid}) as {other}; "
                                     "expected each slice once under data.root (remove one copy)")  # fmt: skip
        series[uid].append(header)
    return dict(series), len(found)


def _drop_duplicates(uid: str, slices: list[SliceHeader]) -> list[SliceHeader]:
    """Two files at one z: the same image (equal HU) keeps the lower InstanceNumber, as pylidc does, with a
    warning naming both; different images are an error naming both. Which one the readers outlined cannot be
    told from the files, and a patch silently built from either would be a guess."""
    by_z: dict[float, list[SliceHeader]] = defaultdict(list)
    for s in sorted(slices, key=lambda s: (s.z, s.instance)):
        by_z[round(s.z, 3)].append(s)
    for z, group in by_z.items():
        kept = group[0]
        for other in group[1:]:
            if not np.array_equal(read_hu(kept), read_hu(other)):
                raise DicomSeriesError(
                    f"series {uid}: two different images at z = {z:.2f} mm, {kept.path} and {other.path}; "
                    "expected one image per slice position (remove the one that does not belong to the series)"
                )
            log.warning("series %s: %s and %s hold the same image at z = %.2f mm; kept the first (lower "
                        "InstanceNumber)", uid, kept.path, other.path, z)  # fmt: skip
    return [group[0] for group in by_z.values()]


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
    """One slice in HU: ``(rows, columns)`` float32. A blank slice (one stored value everywhere, e.g. an
    all-zero export) is an error: a CT image always holds noise, and it would train as a constant patch."""
    try:
        pixels = pydicom.dcmread(header.path).pixel_array.astype(np.float32)
    except Exception as exc:
        raise DicomFileError(f"{header.path}: cannot read the pixel data ({type(exc).__name__}: {exc})") from exc
    if pixels.shape != (header.rows, header.columns):
        raise DicomFileError(f"{header.path}: pixel data {pixels.shape}, expected {(header.rows, header.columns)}")
    if pixels.min() == pixels.max():
        raise DicomFileError(f"{header.path}: blank slice, every pixel stores {pixels.flat[0]:g}; expected a CT "
                             "image (a blank or failed export?)")  # fmt: skip
    return pixels * header.slope + header.intercept


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
