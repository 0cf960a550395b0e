"""Read one classification image file into native units: PNG / JPEG (and other pillow formats), DICOM, NIfTI.

A reader gives a :class:`Decoded`: the pixel values ``(C, *spatial)`` in the file's native units (grey levels; DICOM
after its modality LUT, i.e. RescaleSlope / Intercept, HU for CT; NIfTI after scl_slope / scl_inter) and what the
scale rules of :mod:`medrobust.data.classify_images` need: the storage type's range, the file's own window or VOI
LUT, and the polarity (MONOCHROME1). Channels are kept as the files have them (grey 1, RGB 3); an alpha channel is
dropped (RGBA -> RGB, LA -> L) and said so in ``note``. Anything unreadable raises naming the file and what was
expected.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from medrobust.data.landmark_formats import load_nifti, read_failure

EXPECTED = {"pillow": "a complete PNG / JPEG image", "dicom": "a DICOM image file with pixel data",
            "nifti": "a complete .nii or .nii.gz image"}  # fmt: skip
_PILLOW_RANGE = {"L": 255.0, "RGB": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0}


@dataclass
class Decoded:
    """One file in native units: ``values`` float64 ``(C, *spatial)``; ``dtype_range`` the storage type's range;
    ``file_window`` the file's own linear window; ``voi`` its non-linear VOI (native -> display values);
    ``inverted`` MONOCHROME1; ``kind`` the reader (picks the default rule); ``note`` what was changed (alpha)."""

    values: np.ndarray
    kind: str
    dtype_range: tuple[float, float] | None = None
    file_window: tuple[float, float] | None = None
    voi: Callable[[np.ndarray], np.ndarray] | None = None
    inverted: bool = False
    note: str = ""


def file_kind(path: str | os.PathLike) -> str:
    """``nifti`` by suffix, ``dicom`` by suffix or the 'DICM' magic, else ``pillow``."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".dcm", ".dicom")):
        return "dicom"
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return "dicom" if fh.read(4) == b"DICM" else "pillow"
    except OSError as err:
        raise read_failure(path, err, "an image file") from None


# ------------------------------------------------------------------------------------------ pillow
def _pillow_image(img):
    """``(array (C, H, W), dtype max or None, note)`` of an opened pillow image."""
    mode, note = img.mode, ""
    if mode in ("RGBA", "LA", "PA"):
        note, img = f"{mode} alpha channel dropped", img.convert("L" if mode == "LA" else "RGB")
    elif mode == "P":  # a palette: grey when every entry is (the channels then agree with plain grey files)
        img = img.convert("RGB")
        rgb = np.asarray(img)
        img = img.convert("L") if (rgb[..., :1] == rgb).all() else img
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("L" if mode == "1" else "RGB")
    array = np.asarray(img)
    top = _PILLOW_RANGE.get(img.mode)
    if img.mode == "I" and img.format == "PNG":  # older pillow opens 16-bit grey PNG as 32-bit "I"
        top = 65535.0
    values = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    return values.astype(np.float64), top, note


def read_pillow(path: str | os.PathLike, draft_size: Sequence[int] | None = None) -> Decoded:
    """A PNG / JPEG (any pillow format). ``draft_size``: ``(H, W)`` it will be shrunk to: a JPEG decodes at the
    smallest power-of-two reduction still at least that large (much faster; the resize does the rest)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft(img.mode, (int(draft_size[1]), int(draft_size[0])))
            img.load()  # decode now: a truncated file raises here, inside the try
            values, top, note = _pillow_image(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise read_failure(path, err, EXPECTED["pillow"]) from None
    return Decoded(values, "pillow", dtype_range=None if top is None else (0.0, top), note=note)


# ------------------------------------------------------------------------------------------ DICOM
def _dicom_window(ds, path) -> tuple[float, float] | None:
    """The first WindowCenter / WindowWidth pair as ``(low, high)`` (LINEAR or LINEAR_EXACT); None without one or
    for a SIGMOID function (then :func:`read_dicom` uses pydicom's VOI)."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    first = [v if not hasattr(v, "__len__") or isinstance(v, str) else v[0] for v in (ds.WindowCenter, ds.WindowWidth)]
    centre, width = (float(v) for v in first)
    if function == "LINEAR":  # PS3.3 C.11.2.1.2.1: linear between c - 0.5 -/+ (w - 1) / 2
        if width < 1:
            raise ValueError(f"{path}: WindowWidth {width:g} < 1; expected a LINEAR window at least 1 wide")
        return centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2
    if function == "LINEAR_EXACT":
        return centre - width / 2, centre + width / 2
    return None


def _dicom_voi(ds) -> Callable[[np.ndarray], np.ndarray] | None:
    """The file's non-linear VOI (a VOI LUT Sequence, or a SIGMOID window) by pydicom; None without one."""
    from pydicom.pixels import apply_voi_lut

    if "VOILUTSequence" not in ds and "WindowCenter" not in ds:
        return None
    by_table = "VOILUTSequence" in ds

    def apply(values: np.ndarray) -> np.ndarray:  # a LUT is indexed by whole numbers; a sigmoid takes any value
        values = np.rint(values).astype(np.int64) if by_table else np.asarray(values, dtype=np.float64)
        return np.asarray(apply_voi_lut(values, ds), dtype=np.float64)

    return apply


def read_dicom(path: str | os.PathLike) -> Decoded:
    """A DICOM image: grey values through the modality LUT (RescaleSlope / Intercept), its window or VOI LUT and
    polarity; colour ones as RGB. A multi-frame file is one volume ``(C, frames, H, W)``."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # pydicom raises many types on damaged or foreign files
        raise read_failure(path, err, EXPECTED["dicom"]) from None
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM without pixel data (a truncated download, or a report / structured object?); "
                         "expected an image with its PixelData")
    try:
        stored = ds.pixel_array
    except Exception as err:  # a truncated file, or a compressed one without its decoder
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
        raise ValueError(f"{path}: cannot decode the pixel data ({type(err).__name__}: {err}; transfer syntax "
                         f"{getattr(syntax, 'name', syntax)}); expected a complete image (compressed ones need "
                         "pylibjpeg or gdcm installed)") from None  # fmt: skip
    frames, samples = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    if samples > 1:  # colour: pydicom gives RGB; no modality LUT or window applies
        values = np.moveaxis(stored, -1, 0).astype(np.float64)
        return Decoded(values, "dicom", dtype_range=(0.0, 2.0**bits - 1))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    ends = np.array([-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1] if signed else [0.0, 2.0**bits - 1])
    native = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    dtype_range = tuple(sorted(float(v) for v in np.asarray(apply_modality_lut(ends, ds), dtype=np.float64)))
    window = _dicom_window(ds, path)
    voi = _dicom_voi(ds) if window is None else None
    inverted = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() == "MONOCHROME1"
    values = native.reshape((1, frames) + native.shape[-2:]) if frames > 1 else native[None]
    return Decoded(values, "dicom", dtype_range=dtype_range, file_window=window, voi=voi, inverted=inverted)


# ------------------------------------------------------------------------------------------ NIfTI
def read_nifti(path: str | os.PathLike) -> Decoded:
    """A grey 2-D or 3-D NIfTI image in RAS voxel order (nibabel's closest canonical), singleton axes dropped."""
    import nibabel as nib

    image = load_nifti(path, EXPECTED["nifti"])
    dtype = image.get_data_dtype()
    if dtype.fields is not None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"{path}: voxel type {dtype}; expected real grey values (an integer or float type)")
    if len(image.shape) >= 3:
        image = nib.as_closest_canonical(image)
    try:
        values = np.asarray(image.dataobj, dtype=np.float64)
    except Exception as err:  # a truncated .nii.gz raises a bare EOFError, other damage other types
        raise read_failure(path, err, EXPECTED["nifti"]) from None
    values = values.reshape([n for n in values.shape if n > 1] or [1])
    dtype_range = None
    if np.issubdtype(dtype, np.integer):  # the stored type's range through the header's scl_slope / scl_inter
        info, slope, inter = np.iinfo(dtype), image.dataobj.slope, image.dataobj.inter
        dtype_range = tuple(sorted((float(info.min) * slope + inter, float(info.max) * slope + inter)))
    return Decoded(values[None], "nifti", dtype_range=dtype_range)


def decode(path: str | os.PathLike, draft_size: Sequence[int] | None = None) -> Decoded:
    """Read ``path`` with the reader its format needs; a missing file raises naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image file missing (removed since the table was read?); expected an image")
    kind = file_kind(path)
    return {"nifti": read_nifti, "dicom": read_dicom}.get(kind, lambda p: read_pillow(p, draft_size))(path)


def peek_channels(path: str | os.PathLike) -> int:
    """The channels :func:`decode` will give ``path`` (alpha not counted): NIfTI 1, DICOM its SamplesPerPixel (header
    only), pillow formats by decoding (a JPEG at its smallest draft scale)."""
    kind = file_kind(path)
    if kind == "nifti":
        return 1
    if kind == "dicom":
        import pydicom

        try:
            return int(pydicom.dcmread(path, stop_before_pixels=True).get("SamplesPerPixel", 1) or 1)
        except Exception as err:
            raise read_failure(path, err, EXPECTED["dicom"]) from None
    return int(read_pillow(path, draft_size=(1, 1)).values.shape[0])
