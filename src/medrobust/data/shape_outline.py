"""A nodule's outline as ``k`` corresponding 2-D points, and back to a mask (shape reconstruction task).

Conventions, shared by :mod:`medrobust.data.shape_pca` and :mod:`medrobust.data.shape_warp`:

* points are ``(row, col)`` array indices, pixel centres at integers (as :func:`skimage.measure.find_contours`
  gives them), so the outline of a binary mask runs half a pixel outside its boundary pixels' centres;
* the outline is closed, the last point is *not* repeated, and the points are evenly spaced by arc length;
* it starts at the top of the outline, where it crosses the vertical line through its centroid (the most superior
  point of a round outline; a flat top's leftmost pixel would jump with the mask's rasterisation and spoil the
  correspondence) and runs counter-clockwise as seen on the displayed image (row axis down, col axis right), i.e.
  :func:`signed_area` is positive.

These rules make point ``i`` of one nodule correspond to point ``i`` of another, which the shape model needs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.draw import polygon2mask
from skimage.measure import find_contours, label


def signed_area(points: np.ndarray) -> float:
    """Signed area of the closed polygon ``points (n, 2)`` (row, col): positive when counter-clockwise on screen.

    That is the shoelace area with ``x = col, y = -row`` (the displayed image's axes), which reduces to
    ``0.5 * sum(r_i c_{i+1} - r_{i+1} c_i)``.
    """
    p = np.asarray(points, dtype=np.float64)
    r, c = p[:, 0], p[:, 1]
    return float(0.5 * np.sum(r * np.roll(c, -1) - np.roll(r, -1) * c))


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of ``mask (H, W)``, its holes filled (the outline is the outer boundary).
    Ties go to the region met first in raster order."""
    labels, n = label(mask, connectivity=2, return_num=True)
    if n == 0:
        raise ValueError(f"outline of an empty mask (shape {mask.shape}): no foreground pixel")
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def _contour(region: np.ndarray) -> np.ndarray:
    """Closed 0.5-level contour ``(n, 2)`` of one filled region, last point not repeated, counter-clockwise."""
    padded = np.pad(region, 1).astype(np.float64)  # a region touching the border still gets a closed contour
    # 'high': foreground diagonals connect, matching the 8-connected region, so it yields a single contour
    contours = find_contours(padded, 0.5, fully_connected="high")
    contour = max(contours, key=lambda c: abs(signed_area(c))) - 1.0  # undo the pad
    if np.array_equal(contour[0], contour[-1]):
        contour = contour[:-1]
    return contour if signed_area(contour) > 0 else contour[::-1]


def _resample(contour: np.ndarray, k: int) -> np.ndarray:
    """``k`` points evenly spaced by arc length along the closed ``contour (n, 2)``, starting at its first point."""
    closed = np.vstack([contour, contour[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    keep = np.concatenate([[True], seg > 0])  # repeated vertices would break interpolation's monotone abscissa
    closed, s = closed[keep], np.concatenate([[0.0], np.cumsum(seg[seg > 0])])
    t = np.arange(k) * (s[-1] / k)
    return np.stack([np.interp(t, s, closed[:, 0]), np.interp(t, s, closed[:, 1])], axis=1)


def _top_crossing(contour: np.ndarray) -> np.ndarray:
    """``contour (n, 2)`` rolled to start at its topmost crossing with the vertical through its centroid (the
    crossing inserted as the first point): continuous in the shape, so point ``i`` corresponds across outlines."""
    following = np.roll(contour, -1, axis=0)
    cross = contour[:, 0] * following[:, 1] - following[:, 0] * contour[:, 1]
    column = float(np.sum((contour[:, 1] + following[:, 1]) * cross) / (3 * np.sum(cross)))  # area centroid's col
    below, after = contour[:, 1] - column, following[:, 1] - column
    crosses = np.flatnonzero((below <= 0) & (after > 0) | (below >= 0) & (after < 0))
    fraction = below[crosses] / (below[crosses] - after[crosses])
    rows = contour[crosses, 0] + fraction * (following[crosses, 0] - contour[crosses, 0])
    i = int(np.argmin(rows))
    start = np.array([rows[i], column])
    return np.vstack([start, np.roll(contour, -(crosses[i] + 1), axis=0)])


def outline_points(mask: np.ndarray, k: int) -> np.ndarray:
    """Outline of the largest connected region of ``mask (H, W)`` (bool or 0/1) as ``(k, 2)`` float32 points.

    Points are ``(row, col)`` with pixel centres at integers, evenly spaced by arc length along the closed
    0.5-level contour (the region's 8-connected outer boundary; holes are ignored). Start: the topmost crossing
    of the contour with the vertical line through its centroid (:func:`_top_crossing`). Orientation:
    counter-clockwise as seen on the displayed image (row down, col right), i.e. :func:`signed_area` > 0.

    Raises ``ValueError`` for a mask that is not 2-D, is empty, or for ``k < 3``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"outline of a mask needs a 2-D (H, W) mask, got shape {mask.shape}")
    if int(k) != k or k < 3:
        raise ValueError(f"an outline needs k >= 3 points, got k={k}")
    contour = _contour(_largest_region(mask.astype(bool)))
    return _resample(_top_crossing(contour), int(k)).astype(np.float32)


def polygon_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``shape (H, W)`` mask of the pixels whose centre lies inside the closed polygon ``points (k, 2)``
    (row, col), the inverse of :func:`outline_points` up to the resampling's corner cutting."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        raise ValueError(f"a polygon needs points of shape (k >= 3, 2), got {points.shape}")
    return polygon2mask(tuple(shape), points)
