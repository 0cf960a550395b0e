"""Which slices a LUNA16-style detection dataset samples, and how its samples are packed into the cached arrays.

Both sources of :class:`medrobust.datamodules.luna.LunaDataModule` -- the chest phantom rendered from the LIDC
annotation DB and the real LUNA16 release (:mod:`medrobust.data.luna16`) -- choose their samples by the same
rules, so a model sees the same kind of data from either:

* positives: the slice of each target (the phantom: its largest consensus slice; LUNA16: the slice through the
  annotated centre); two targets sharing a slice give one sample, named by the first;
* negatives: slices more than a margin from every finding of their scan, drawn by :func:`draw_negatives` (one per
  scan in a seeded scan order, round after round);
* a quick run's subset of scans: :func:`pick_scans` (scans with a target first, in a seed-independent hash order);
* 3-D windows (``field_mm``): one cube per target, its centre moved from the target's by a seeded jitter of up to a
  quarter of the cube along each axis (:func:`jittered_centre`: a detector must not learn "the nodule is in the
  middle"), and negatives centred on a seeded lung point of their finding-free slice (:func:`pick_point`).

The source-independent parts live here (:func:`finding_free_slices`, :func:`draw_negatives`, :func:`pick_scans`,
:func:`pack_samples`); the phantom's wrappers around its :class:`~medrobust.data.luna_targets.LunaScan` records
follow them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from medrobust.data.chest_phantom import finding_masks, lung_points, slices_with_lung
from medrobust.data.lidc_annotations import slice_spacing
from medrobust.data.luna_targets import LunaScan
from medrobust.data.patches import stable_seed


# --------------------------------------------------------------------------------- source-independent rules
def pick_scans(scans: Sequence, max_scans: int | None, key: Callable, has_target: Callable) -> list:
    """A deterministic subset (seed-independent) of at most ``max_scans`` scans, in ``key`` order: scans with a
    target first (a small run needs positives), each group in a hash order of ``key``."""
    if max_scans is None or max_scans >= len(scans):
        return list(scans)
    order = sorted(scans, key=lambda s: (not has_target(s), stable_seed("luna-subset", key(s))))
    return sorted(order[:max_scans], key=key)


def finding_free_slices(n_slices: int, extents: Iterable[tuple[int, int]], margin_slices: int) -> np.ndarray:
    """Indices of the ``n_slices`` slices more than ``margin_slices`` slices from every finding, each finding given
    by the first and last slice (inclusive) it reaches."""
    free = np.ones(n_slices, dtype=bool)
    for lo, hi in extents:
        free[max(lo - margin_slices, 0) : max(hi + margin_slices + 1, 0)] = False
    return np.flatnonzero(free)


def draw_negatives(free: dict[Hashable, np.ndarray], count: int, seed: int) -> list[tuple[Hashable, int]]:
    """``count`` ``(scan key, slice)`` pairs from the finding-free slices ``free`` of each scan: one per scan in a
    seeded scan order, round after round, each a seeded draw among the scan's free slices not yet taken (fewer when
    the scans run out). Spreading negatives over scans keeps one scan's anatomy from dominating them."""
    rng = np.random.default_rng(stable_seed("luna-negatives", seed))
    pools = {key: rng.permutation(slices).tolist() for key, slices in free.items()}
    keys = list(free)
    order = [keys[i] for i in rng.permutation(len(keys))]
    picked: list[tuple[Hashable, int]] = []
    while len(picked) < count and any(pools.values()):
        for key in order:
            if len(picked) < count and pools[key]:
                picked.append((key, int(pools[key].pop())))
    return picked


def jittered_centre(centre: Sequence[float], spacing_mm: Sequence[float], extent_mm: Sequence[float], key: str,
                    seed: int) -> np.ndarray:
    """``centre`` (native cells, (slice, row, col)) moved by a seeded uniform draw of up to a quarter of the window's
    ``extent_mm`` along each axis: the target stays in the window's middle half, never at a fixed place."""
    rng = np.random.default_rng(stable_seed("luna-window-jitter", seed, key))
    shift_mm = rng.uniform(-0.25, 0.25, size=3) * np.asarray(extent_mm, dtype=np.float64)
    return np.asarray(centre, dtype=np.float64) + shift_mm / np.asarray(spacing_mm, dtype=np.float64)


def window_spec(scan, target_id: str, centre: Sequence[float], spacing_mm: Sequence[float], n_slices: int,
                extent_mm: Sequence[float], seed: int) -> "SampleSpec":
    """The 3-D window of one target (either source): its centre ``centre`` (native cells) jittered
    (:func:`jittered_centre`), the native slice it lands on clipped to the scan's ``n_slices``."""
    z, row, col = jittered_centre(centre, spacing_mm, extent_mm, target_id, seed)
    k = min(max(math.floor(z), 0), n_slices - 1)
    return SampleSpec(scan, k, f"{target_id}/z{k}", True, (row, col))


def pick_point(points: np.ndarray, key: str, seed: int) -> tuple[float, float] | None:
    """A seeded choice among ``points`` ``(n, 2)`` (a negative window's in-plane centre); None when there are none."""
    if len(points) == 0:
        return None
    rng = np.random.default_rng(stable_seed("luna-negative-point", seed, key))
    row, col = points[rng.integers(len(points))]
    return float(row), float(col)


@dataclass(frozen=True)
class Sample:
    """One sample as the cache stores it: ``image`` HU of shape ``S`` (any dtype; stored as int16), ``spacing`` mm
    per axis of ``S``, ``boxes`` ``(k, 2d)`` StandardMode pixels, per box ``is_target`` and ``finding_ids``, and
    the sample's ``id``, ``patient_id``, ``scan_id`` (int), ``slice_index`` (the native slice it is centred on) and
    whether it is ``positive`` (centred on a target)."""

    image: np.ndarray
    spacing: tuple[float, ...]
    boxes: np.ndarray
    is_target: np.ndarray
    finding_ids: Sequence[str]
    id: str
    patient_id: str
    scan_id: int
    slice_index: int
    positive: bool


def hu_int16(image: np.ndarray) -> np.ndarray:
    """HU rounded and clipped to int16 (the cache's image dtype: exact for CT, half the size of float32)."""
    if image.dtype == np.int16:
        return image
    return np.clip(np.rint(image), -32768, 32767).astype(np.int16)


def pack_samples(samples: Sequence[Sample], spatial_dims: int) -> dict[str, np.ndarray]:
    """The cached arrays of ``samples``: HU images as int16, the boxes of all samples concatenated (sample ``i``
    owns rows ``box_offsets[i]:box_offsets[i + 1]``), and the per-sample records."""
    counts = [len(s.boxes) for s in samples]
    width = 2 * spatial_dims
    return {
        "images": np.stack([hu_int16(s.image) for s in samples]),
        "spacing": np.array([s.spacing for s in samples], dtype=np.float32).reshape(len(samples), -1),
        "box_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "boxes": np.concatenate([np.reshape(s.boxes, (-1, width)) for s in samples]).astype(np.float32),
        "box_target": np.concatenate([np.asarray(s.is_target, dtype=bool) for s in samples]).astype(bool),
        "box_finding_ids": np.array([f for s in samples for f in s.finding_ids], dtype=str),
        "ids": np.array([s.id for s in samples]),
        "patient_ids": np.array([s.patient_id for s in samples]),
        "scan_ids": np.array([s.scan_id for s in samples], dtype=np.int64),
        "slice_index": np.array([s.slice_index for s in samples], dtype=np.int64),
        "positive": np.array([s.positive for s in samples], dtype=bool),
    }


# --------------------------------------------------------------------------------- the phantom's scans
@dataclass(frozen=True)
class SampleSpec:
    """One sample to make: the native slice of ``scan`` it is centred on and its stable id; a 3-D window's in-plane
    centre ``centre_rc`` (native (row, col); None: the whole field of view). ``scan`` is the phantom's
    :class:`~medrobust.data.luna_targets.LunaScan` or LUNA16's :class:`~medrobust.data.luna16.Series`."""

    scan: LunaScan | object
    slice_index: int
    id: str
    positive: bool
    centre_rc: tuple[float, float] | None = None


def _has_target(scan: LunaScan) -> bool:
    return any(f.is_target for f in scan.findings)


def select_scans(scans: Sequence[LunaScan], max_scans: int | None) -> list[LunaScan]:
    """At most ``max_scans`` phantom scans by :func:`pick_scans`, in scan-id order."""
    return pick_scans(scans, max_scans, key=lambda s: s.scan_id, has_target=_has_target)


def target_slices(scan: LunaScan, db_path: str) -> list[SampleSpec]:
    """One sample per distinct largest slice of the scan's targets (the first target in cluster order names it)."""
    specs: dict[int, SampleSpec] = {}
    for fm in finding_masks(scan, db_path):
        if fm.finding.is_target and fm.largest_slice not in specs:
            k = fm.largest_slice
            specs[k] = SampleSpec(scan, k, f"{fm.finding.nodule_id}/z{k}", positive=True)
    return list(specs.values())


def free_slices(scan: LunaScan, margin_mm: float, in_lung: bool = False, seed: int = 0) -> np.ndarray:
    """The scan's slices more than ``margin_mm`` from every finding's outlines (all its readers', in z); with
    ``in_lung`` only those the phantom's lungs reach (:func:`~medrobust.data.chest_phantom.slices_with_lung`)."""
    margin = math.floor(margin_mm / slice_spacing(scan.slice_z))  # whole slices within the margin
    free = finding_free_slices(scan.slice_z.size, ((f.box_min[2], f.box_max[2]) for f in scan.findings), margin)
    return free[slices_with_lung(scan, seed)[free]] if in_lung else free


def negative_slices(scans: Sequence[LunaScan], count: int, margin_mm: float, seed: int,
                    in_lung: bool = False) -> list[SampleSpec]:
    """``count`` finding-free phantom slices drawn by :func:`draw_negatives` (``in_lung``: slices showing lung)."""
    by_id = {s.scan_id: s for s in scans}
    picked = draw_negatives({s.scan_id: free_slices(s, margin_mm, in_lung, seed) for s in scans}, count, seed)
    return [SampleSpec(by_id[i], k, f"{by_id[i].patient_id}:s{i}/z{k}", positive=False) for i, k in picked]


def _centroid(fm) -> np.ndarray:
    """A finding mask's consensus centroid in native cells (slice, row, col), cell centres at +0.5."""
    return np.asarray(fm.origin, dtype=np.float64) + np.argwhere(fm.mask).mean(axis=0) + 0.5


def window_extent_mm(field_mm: float, depth_mm: float | None) -> tuple[float, float, float]:
    """A 3-D window's extent (slice, row, col) in mm: ``depth_mm`` deep (default ``field_mm``), ``field_mm`` wide."""
    return (field_mm if depth_mm is None else depth_mm, field_mm, field_mm)


def target_windows(scan: LunaScan, db_path: str, extent_mm: Sequence[float], seed: int) -> list[SampleSpec]:
    """One 3-D window per target of ``scan`` around its jittered consensus centroid (:func:`jittered_centre`)."""
    spacing = (slice_spacing(scan.slice_z), scan.pixel_spacing_mm, scan.pixel_spacing_mm)
    return [window_spec(scan, fm.finding.nodule_id, _centroid(fm), spacing, scan.slice_z.size, extent_mm, seed)
            for fm in finding_masks(scan, db_path) if fm.finding.is_target]  # fmt: skip


def negative_windows(specs: Sequence[SampleSpec], seed: int) -> list[SampleSpec]:
    """The phantom's negative slices as 3-D windows centred on a seeded lung point of the slice (None, the FOV's
    centre, where the slice shows no lung)."""
    return [SampleSpec(spec.scan, spec.slice_index, spec.id, False,
                       pick_point(lung_points(spec.scan, spec.slice_index, seed), spec.id, seed))
            for spec in specs]  # fmt: skip
