"""Rasterizing LIDC readers' contours on a scan's native grid (see :mod:`medrobust.data.lidc_annotations`).

Contour points are ``(row, col)`` pixel indices; inclusion contours fill, exclusion contours carve out, and the
outline itself lies just outside the lesion (removed, as in pylidc).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # annotations only: lidc_annotations imports this module
    from medrobust.data.lidc_annotations import Annotation


def _fill(mask2d: np.ndarray, pts: np.ndarray, origin: np.ndarray, value: bool) -> None:
    """Fill (``value=True``) or carve out (``False``) one closed contour, ``pts (n, 2)`` row/col, in place.

    The outline is drawn just outside the lesion, so its own pixels are cleared -- unless that leaves
    nothing inside (a lesion smaller than the outline's resolution), then the outline is the lesion.
    """
    rc = pts - origin
    canvas = Image.new("1", (mask2d.shape[1], mask2d.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon(rc[:, ::-1].ravel().tolist(), fill=1, outline=1)  # PIL wants x, y
    inside = np.array(canvas, dtype=bool)
    outline = np.zeros_like(mask2d)
    outline[rc[:, 0], rc[:, 1]] = True
    interior = inside & ~outline
    if value:
        mask2d |= interior if interior.any() else inside | outline
    else:
        mask2d &= ~(inside | outline)


def rasterize(ann: Annotation, k_of_z: dict[float, int], origin: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Boolean ``(D, H, W)`` mask of one annotation in a box whose voxel 0 is native index ``origin`` (k, row, col)."""
    mask = np.zeros(shape, dtype=bool)
    for inclusion in (True, False):  # all inclusions first, then carve exclusions
        for inc, z, pts in ann.contours:
            if inc == inclusion:
                _fill(mask[k_of_z[z] - origin[0]], pts, origin[1:], inclusion)
    return mask


def slice_positions(slice_z: np.ndarray, k: np.ndarray, dz: float) -> np.ndarray:
    """z (mm) of slice indices ``k``; indices past either end (the padding) extrapolate by ``dz``."""
    inside = np.clip(k, 0, slice_z.size - 1)
    return slice_z[inside] + (k - inside) * dz
