"""Warp an image (and its mask) so a nodule's outline moves from ``source`` to ``target``: a thin-plate spline.

Outlines are ``(k, 2)`` ``(row, col)`` points with pixel centres at integers
(:func:`medrobust.data.shape_outline.outline_points`). The warp is a backward mapping: a TPS fitted from
target-space to source-space points says, for every output pixel, where in the input to sample, so the output has
no holes. Fixed anchors on the image border (mapped to themselves) make the warp fade to identity at the edges.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates

LAMBDA = 1e-6  # on the kernel's diagonal (coordinates scaled to ~unit size): repeated points stay solvable
ANCHORS_PER_SIDE = 8
_CHUNK = 1 << 16  # output pixels per kernel evaluation: bounds memory at ~(chunk x control points) floats


def border_anchors(shape: tuple[int, int], per_side: int = ANCHORS_PER_SIDE) -> np.ndarray:
    """``(4 * per_side - 4, 2)`` points evenly spaced on the border pixel centres of an ``(H, W)`` image."""
    h, w = shape
    if per_side < 2:
        raise ValueError(f"border anchors need at least the 2 corners per side, got per_side={per_side}")
    cols, rows = np.linspace(0, w - 1, per_side), np.linspace(0, h - 1, per_side)[1:-1]  # corners once
    top_bottom = [np.stack([np.full_like(cols, r), cols], axis=1) for r in (0, h - 1)]
    left_right = [np.stack([rows, np.full_like(rows, c)], axis=1) for c in (0, w - 1)]
    return np.concatenate(top_bottom + left_right)


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """TPS radial basis ``r^2 log r`` between points ``a (n, 2)`` and ``b (m, 2)``: ``(n, m)``, 0 at ``r = 0``."""
    r2 = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
    return 0.5 * r2 * np.log(np.where(r2 > 0, r2, 1.0))


def _affine(p: np.ndarray) -> np.ndarray:
    return np.concatenate([np.ones((len(p), 1)), p], axis=1)


def tps_coordinates(
    source: np.ndarray, target: np.ndarray, shape: tuple[int, int], *, anchors: bool = True
) -> np.ndarray:
    """Input coordinates ``(2, H, W)`` (row, col) to sample for every output pixel of an ``(H, W)`` image, from the
    TPS mapping ``target (k, 2)`` points onto ``source (k, 2)`` points (plus the border anchors onto themselves)."""
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if source.ndim != 2 or source.shape[1] != 2 or source.shape != target.shape:
        raise ValueError(f"TPS needs source, target outlines of one shape (k, 2), got {source.shape}, {target.shape}")
    if anchors:
        fixed = border_anchors(shape)
        source, target = np.concatenate([source, fixed]), np.concatenate([target, fixed])
    if len(target) < 3:
        raise ValueError(f"TPS needs at least 3 control points, got {len(target)}")
    # scale coordinates to ~unit size for conditioning; the interpolant itself does not change (the kernel's
    # change under scaling is affine, absorbed by the affine part), only what LAMBDA means
    centre, scale = np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2]), float(max(shape))
    ctrl, values = (target - centre) / scale, (source - centre) / scale
    n = len(ctrl)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _kernel(ctrl, ctrl) + LAMBDA * np.eye(n)
    system[:n, n:] = _affine(ctrl)
    system[n:, :n] = _affine(ctrl).T
    rhs = np.concatenate([values, np.zeros((3, 2))])
    try:
        coef = np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:  # e.g. all control points collinear: the affine part is undetermined
        coef = np.linalg.lstsq(system, rhs, rcond=None)[0]
    grid = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), -1).reshape(-1, 2)
    grid = (grid - centre) / scale
    out = np.empty_like(grid)
    for i in range(0, len(grid), _CHUNK):
        g = grid[i : i + _CHUNK]
        out[i : i + _CHUNK] = _kernel(g, ctrl) @ coef[:n] + _affine(g) @ coef[n:]
    return (out * scale + centre).T.reshape(2, *shape)


def _sample(image: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    if image.dtype == bool:  # map_coordinates has no bool output; nearest sampling keeps 0/1 exact
        return map_coordinates(image.astype(np.uint8), coords, order=0, mode="nearest").astype(bool)
    return map_coordinates(image, coords, order=order, mode="nearest")


def _check_image(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"TPS warp needs a 2-D (H, W) {name}, got shape {image.shape}")
    return image


def tps_warp(
    image: np.ndarray, source: np.ndarray, target: np.ndarray, *, anchors: bool = True, order: int = 1
) -> np.ndarray:
    """Warp ``image (H, W)`` so the outline ``source (k, 2)`` moves to ``target (k, 2)``; ``(H, W)`` out.

    ``order`` is the interpolation order of :func:`scipy.ndimage.map_coordinates` (1 for images: values stay
    within the input's range; 0 for masks); outside the image the nearest border value is used. A non-float
    image is warped as float64, except with ``order=0`` (no new values arise; a bool mask stays bool).
    """
    image = _check_image(image, "image")
    if order != 0 and not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float64)
    return _sample(image, tps_coordinates(source, target, image.shape, anchors=anchors), order)


def warp_image_and_mask(
    image: np.ndarray, mask: np.ndarray, source: np.ndarray, target: np.ndarray, *, anchors: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tps_warp` of ``image (H, W)`` (linear) and ``mask (H, W)`` (nearest, returned bool) with one TPS."""
    image, mask = _check_image(image, "image"), _check_image(mask, "mask")
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in shape")
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float64)
    coords = tps_coordinates(source, target, image.shape, anchors=anchors)
    return _sample(image, coords, 1), _sample(mask.astype(bool), coords, 0)
