"""Shared helpers for nodule-centred patches: grids, resampling, seeds and on-disk caches.

Conventions used by every LIDC source:

* volumes are ``(D, H, W)`` = (slice, row, column); physical coordinates are ``(z, y, x)`` in mm,
  with ``y = row * pixel_spacing`` and ``x = column * pixel_spacing``;
* a patch of ``n`` voxels at spacing ``s`` around a centre puts the centre on voxel ``n // 2``: the
  voxel offsets are ``(i - n // 2) * s`` mm. Nodule masks use the same integer-offset grid, so a
  mask can be pasted into a patch without interpolation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CACHE_FORMAT = 1  # bump when the layout of any cache written with these helpers changes


# ----------------------------------------------------------------------------------------- grids
def patch_offsets(n: int, spacing: float) -> np.ndarray:
    """Voxel-centre offsets (mm) of an ``n``-voxel axis centred on voxel ``n // 2``: shape ``(n,)``."""
    return (np.arange(n) - n // 2) * float(spacing)


def patch_shape(spatial_dims: int, patch_size: int) -> tuple[int, ...]:
    """``(H, W)`` for 2-D, ``(D, H, W)`` for 3-D (the 2-D patch is the axial slice through the centre)."""
    return (patch_size,) * spatial_dims


def linear_weights(idx: np.ndarray, n: int, edge: str = "nearest") -> np.ndarray:
    """Linear-interpolation matrix ``(len(idx), n)`` sampling a length-``n`` axis at fractional ``idx``.

    ``edge="nearest"`` repeats the end samples beyond the axis (the body continues past a crop);
    ``edge="zero"`` treats everything beyond the axis as 0 (a mask's background).
    """
    idx = np.asarray(idx, dtype=np.float64)
    if edge == "nearest":
        idx = np.clip(idx, 0, n - 1)
    elif edge != "zero":
        raise ValueError(f"edge must be 'nearest' or 'zero', got {edge!r}")
    lo = np.floor(idx).astype(np.int64)
    frac = idx - lo
    w = np.zeros((idx.size, n))
    rows = np.arange(idx.size)
    for k, wk in ((lo, 1.0 - frac), (lo + 1, frac)):
        ok = (k >= 0) & (k < n)
        np.add.at(w, (rows[ok], k[ok]), wk[ok])
    return w


def separable_resample(volume: np.ndarray, weights: Sequence[np.ndarray]) -> np.ndarray:
    """Apply one ``(m_a, n_a)`` matrix per axis of ``volume (n_0, n_1, n_2)`` -> ``(m_0, m_1, m_2)``.

    Axis-aligned resampling is separable, so three small matrix products replace a per-voxel
    interpolation (much faster than ``map_coordinates`` on dense grids).
    """
    out = np.asarray(volume, dtype=np.float64)
    for axis, w in enumerate(weights):
        out = np.moveaxis(np.tensordot(w, out, axes=([1], [axis])), 0, axis)
    return out


def z_to_index(z_mm: np.ndarray, slice_z: np.ndarray) -> np.ndarray:
    """Physical z (mm) -> fractional slice index, for sorted (possibly unevenly spaced) slice positions.

    Outside the slice range the index is extrapolated with the end spacing, so the caller's edge
    rule decides what lies beyond the scan.
    """
    slice_z = np.asarray(slice_z, dtype=np.float64)
    z_mm = np.atleast_1d(np.asarray(z_mm, dtype=np.float64))
    if slice_z.size == 1:
        return np.zeros_like(z_mm)
    idx = np.interp(z_mm, slice_z, np.arange(slice_z.size, dtype=np.float64))
    lo, hi = z_mm < slice_z[0], z_mm > slice_z[-1]
    idx[lo] = (z_mm[lo] - slice_z[0]) / (slice_z[1] - slice_z[0])
    idx[hi] = slice_z.size - 1 + (z_mm[hi] - slice_z[-1]) / (slice_z[-1] - slice_z[-2])
    return idx


def _axis_indices(slice_z, pixel_spacing, centre_zyx, offsets_zyx) -> list[np.ndarray]:
    oz, oy, ox = (np.asarray(o, dtype=np.float64) for o in offsets_zyx)
    return [
        z_to_index(centre_zyx[0] + oz, slice_z),
        (centre_zyx[1] + oy) / pixel_spacing,
        (centre_zyx[2] + ox) / pixel_spacing,
    ]


def resample_around(
    volume: np.ndarray,
    slice_z: np.ndarray,
    pixel_spacing: float,
    centre_zyx: Sequence[float],
    offsets_zyx: Sequence[np.ndarray],
    edge: str = "nearest",
) -> np.ndarray:
    """Resample a native CT-like volume onto an isotropic grid around a physical centre (trilinear).

    ``volume`` is ``(D, H, W)`` with slices at sorted ``slice_z`` (mm) and square pixels of
    ``pixel_spacing`` mm; ``centre_zyx`` is in mm (``y = row * pixel_spacing``); ``offsets_zyx`` are the
    three 1-D axis offsets (mm) of the output grid. Returns ``(len(oz), len(oy), len(ox))`` float64.
    """
    idx = _axis_indices(slice_z, pixel_spacing, centre_zyx, offsets_zyx)
    return separable_resample(volume, [linear_weights(i, n, edge) for i, n in zip(idx, volume.shape)])


def occupancy_around(
    mask: np.ndarray,
    slice_z: np.ndarray,
    pixel_spacing: float,
    centre_zyx: Sequence[float],
    offsets_zyx: Sequence[np.ndarray],
    spacing: float,
    supersample: int = 4,
) -> np.ndarray:
    """Fraction of each isotropic voxel covered by a binary native mask (partial volume), in [0, 1].

    Each output voxel averages ``supersample`` linear samples per axis (separable, so cheap), which
    approximates the covered volume fraction; everything outside ``mask`` is background.
    """
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5  # sub-voxel offsets in voxel units
    fine = [(np.asarray(o)[:, None] + sub[None, :] * spacing).ravel() for o in offsets_zyx]
    idx = _axis_indices(slice_z, pixel_spacing, centre_zyx, fine)
    weights = [
        linear_weights(i, n, "zero").reshape(len(o), supersample, n).mean(axis=1)
        for i, n, o in zip(idx, mask.shape, offsets_zyx)
    ]
    return np.clip(separable_resample(mask.astype(np.float64), weights), 0.0, 1.0)


def overlap_slices(
    canvas_shape: Sequence[int], patch_shape_: Sequence[int], patch_centre: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Canvas and patch slices of the overlap when patch voxel ``patch_centre`` sits on the canvas
    centre voxel ``n // 2``; both tuples may select empty ranges when nothing overlaps."""
    canvas_sl, patch_sl = [], []
    for n, m, c in zip(canvas_shape, patch_shape_, patch_centre):
        start = n // 2 - int(c)  # canvas index of patch voxel 0
        lo, hi = max(start, 0), min(start + m, n)
        canvas_sl.append(slice(lo, max(hi, lo)))
        patch_sl.append(slice(lo - start, max(hi, lo) - start))
    return tuple(canvas_sl), tuple(patch_sl)


# ----------------------------------------------------------------------------------------- seeds
def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts, stable across runs, processes and orderings."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------------------- caches
def settings_key(settings: dict[str, Any]) -> str:
    """Short hash of a JSON-able settings dict; names a cache file so any change in settings misses."""
    blob = json.dumps({"cache_format": CACHE_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Cheap identity of a file for cache keys: resolved path, size and mtime."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def save_npz_atomic(path: str | os.PathLike, settings: dict[str, Any], **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` (.npz) and ``settings`` next to it (.json), atomically.

    Writes go to a temporary file in the same folder and are renamed into place, so a crashed or
    concurrent writer never leaves a half-written cache that a reader would trust.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    json_tmp = path.with_suffix(".json.tmp")
    json_tmp.write_text(json.dumps(settings, indent=1, sort_keys=True, default=str))
    os.replace(json_tmp, path.with_suffix(".json"))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """Load a cache written by :func:`save_npz_atomic`, or None when it is absent."""
    path = Path(path)
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
