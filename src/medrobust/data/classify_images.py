"""Bring one classification image to the model's input: scaled to [0, 1] by a rule, at one size.

A file is read into native units by :mod:`medrobust.data.classify_readers`, scaled to [0, 1] by a rule
(:func:`to_unit`), then resized or centre-cropped / zero-padded to the configured size (:func:`fit_size`). The rules,
chosen so that an eps keeps its meaning (the model always sees [0, 1]):

* ``dtype``: the storage type's range maps to [0, 1]: 8-bit / 255, 16-bit / 65535 (pillow), the stored bits after
  RescaleSlope / Intercept (DICOM), the integer type's range (NIfTI); the default for PNG / JPEG and colour DICOM;
* ``window``: ``data.window = [low, high]`` in native units (rescaled DICOM units, HU for CT; grey levels), or with
  ``data.window = null`` the DICOM file's own WindowCenter / WindowWidth (linear, PS3.3 C.11.2.1.2) or, lacking
  those, its VOI LUT (non-linear, by pydicom); the default for grey DICOM;
* ``minmax``: each image's own minimum and maximum (a constant image raises); the default for NIfTI.

MONOCHROME1 DICOM (white = low values, as many radiographs) is inverted after scaling, so bright is high as in
MONOCHROME2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medrobust.data.classify_readers import Decoded, decode

SCALES = ("dtype", "window", "minmax")


# ------------------------------------------------------------------------------------------ scaling and size
def default_scale(decoded: Decoded) -> str:
    """``dtype`` for pillow and colour DICOM, ``window`` for grey DICOM, ``minmax`` for NIfTI."""
    if decoded.kind == "dicom":
        return "window" if decoded.values.shape[0] == 1 else "dtype"
    return "minmax" if decoded.kind == "nifti" else "dtype"


def to_unit(decoded: Decoded, scale: str | None, window: Sequence[float] | None, path) -> tuple[np.ndarray, tuple]:
    """``(values in [0, 1] float32, (native low, native high))``: the native values mapped to 0 and 1 (NaN for the
    per-image and non-linear rules, which have no common native scale). See the module docstring for the rules."""
    rule = scale or default_scale(decoded)
    values = decoded.values
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: the image holds NaN or infinite values; expected finite grey values")
    if rule == "dtype":
        if decoded.dtype_range is None:
            raise ValueError(f"{path}: its pixel type (floating point or 32-bit) has no known full range; expected "
                             "8- or 16-bit pixels for data.scale=dtype (else data.scale=minmax, or window with "
                             "data.window)")  # fmt: skip
        low, high = decoded.dtype_range
    elif rule == "window" and window is not None:
        low, high = (float(v) for v in window)
    elif rule == "window" and decoded.file_window is not None:
        low, high = decoded.file_window
    elif rule == "window" and decoded.voi is not None:
        display = decoded.voi(values)
        ends = decoded.voi(np.asarray(decoded.dtype_range))  # the VOI's output range over every storable value
        unit = (display - ends.min()) / max(float(ends.max() - ends.min()), 1e-12)
        return _finish(unit, decoded.inverted), (np.nan, np.nan)
    elif rule == "window":
        raise ValueError(f"{path}: no window for data.scale=window: the file has no WindowCenter / WindowWidth or VOI "
                         "LUT; expected data.window=[low, high] in its native units (or data.scale=minmax / dtype)")
    else:
        low, high = float(values.min()), float(values.max())
        if high <= low:
            raise ValueError(f"{path}: constant image (every pixel {low:g}); expected contrast for data.scale=minmax")
        return _finish((values - low) / (high - low), decoded.inverted), (np.nan, np.nan)
    return _finish((values - low) / (high - low), decoded.inverted), (low, high)


def _finish(unit: np.ndarray, inverted: bool) -> np.ndarray:
    unit = np.clip(unit, 0.0, 1.0)
    return (1.0 - unit if inverted else unit).astype(np.float32)


def fit_size(image: np.ndarray, size: Sequence[int], mode: str) -> np.ndarray:
    """``(C, *spatial)`` -> ``(C, *size)``. ``resize``: bilinear with antialiasing (2-D); 3-D: area averaging along
    the axes that shrink, then trilinear for those that grow. ``crop``: centred crop, or zero padding (black)."""
    size = tuple(int(n) for n in size)
    if tuple(image.shape[1:]) == size:
        return image
    if mode == "crop":
        out = np.zeros((image.shape[0], *size), dtype=image.dtype)
        src, dst = [], []
        for n, m in zip(image.shape[1:], size):
            lo_src, lo_dst = max((n - m) // 2, 0), max((m - n) // 2, 0)
            k = min(n, m)
            src.append(slice(lo_src, lo_src + k))
            dst.append(slice(lo_dst, lo_dst + k))
        out[(slice(None), *dst)] = image[(slice(None), *src)]
        return out
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    if x.dim() == 4:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    else:
        shrunk = tuple(min(n, m) for n, m in zip(x.shape[2:], size))
        x = F.adaptive_avg_pool3d(x, shrunk) if shrunk != tuple(x.shape[2:]) else x
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False) if shrunk != size else x
    return x[0].clamp(0.0, 1.0).numpy()


def preprocess(path: str | os.PathLike, spatial_dims: int, size: Sequence[int], resize: str, scale: str | None,
               window: Sequence[float] | None) -> tuple[np.ndarray, tuple, str]:  # fmt: skip
    """One file as float32 ``(C, *size)`` in [0, 1], its ``(native low, native high)`` and the reader's note."""
    decoded = decode(path, draft_size=size if resize == "resize" and spatial_dims == 2 else None)
    dims = decoded.values.ndim - 1
    if dims != spatial_dims:
        raise ValueError(f"{path}: a {dims}-D image of shape {list(decoded.values.shape[1:])}; expected "
                         f"{spatial_dims}-D images (data.spatial_dims={spatial_dims})")  # fmt: skip
    unit, native = to_unit(decoded, scale, window, path)
    return fit_size(unit, size, resize), native, decoded.note
