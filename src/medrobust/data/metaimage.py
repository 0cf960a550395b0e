"""MetaImage (``.mhd`` + ``.raw`` / ``.zraw``, or ``.mha``) read and written with numpy alone.

LUNA16 ships its CT scans as MetaImage. Neither SimpleITK nor itk is a dependency (and nothing may be downloaded at
run time), and the format is small: a text header of ``Key = Value`` lines, then the voxels, raw or zlib-compressed,
in a separate file (``ElementDataFile = name``, relative to the header) or after the header (``LOCAL``).

Geometry follows ITK, which wrote LUNA16's files:

* ``DimSize``, ``ElementSpacing`` and ``Offset`` list the axes fastest first (x = column, y = row, z = slice); the
  array is returned in numpy order ``(z, y, x)`` with ``spacing`` in that order too, and ``origin`` in world
  ``(x, y, z)`` mm;
* ``TransformMatrix`` lists, axis by axis, the world direction of each index axis: ``direction[:, j]`` (a column)
  is the world (x, y, z) direction of index axis j (x, y, z). A voxel at index ``(i, j, k)`` (column, row, slice)
  lies at ``origin + direction @ (spacing_xyz * (i, j, k))`` mm, its centre (ITK's convention).

Every error names the file and the header key (or the data file and the size it should have), so a broken
download is found from the message alone.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

ELEMENT_TYPES = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
    "MET_UINT": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}  # fmt: skip
_SYNONYMS = {"Offset": ("Offset", "Origin", "Position"), "TransformMatrix": ("TransformMatrix", "Rotation",
                                                                               "Orientation")}  # fmt: skip
_ORIENTATION_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # ITK's codes name where each axis comes from
MAX_HEADER_LINES = 200  # a MetaImage header has a few dozen keys; more means this is not one
ORTHONORMAL_TOL = 1e-3


class MetaImageError(ValueError):
    """A MetaImage header or data file that cannot be read as the header says."""


class MetaImage(NamedTuple):
    """A volume ``(z, y, x)``, its ``spacing`` (z, y, x) mm, ``origin`` (x, y, z) mm and ``direction`` 3 x 3."""

    array: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray


@dataclass(frozen=True)
class MetaImageHeader:
    """A parsed header: ``shape``/``spacing`` in numpy order, ``origin``/``direction`` in world (x, y, z) order,
    where the voxels are (``data_path``, from byte ``data_offset``; ``header_size`` -1: the last bytes of the file)
    and how (``dtype`` with its byte order, ``compressed``); ``fields`` holds every key as written."""

    path: Path
    shape: tuple[int, ...]
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    dtype: np.dtype
    element_type: str
    data_path: Path
    data_offset: int
    header_size: int
    compressed: bool
    compressed_size: int | None
    fields: dict[str, str] = field(repr=False)

    @property
    def n_bytes(self) -> int:
        """Bytes of the uncompressed voxels."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# --------------------------------------------------------------------------------- header
def _header_lines(path: Path) -> tuple[dict[str, str], int]:
    """``Key = Value`` pairs up to and including ``ElementDataFile`` (the last key by the format's rule) and the
    byte offset after that line (where ``LOCAL`` data starts)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as fh:
        for number in range(1, MAX_HEADER_LINES + 1):
            raw = fh.readline()
            if not raw:
                break
            line = raw.decode("latin-1").strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise MetaImageError(f"{path}: line {number}: expected 'Key = Value', got {line[:80]!r}")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return fields, fh.tell()
    raise MetaImageError(f"{path}: missing key ElementDataFile (the header's last key, naming the voxels' file)")


def _get(fields: dict[str, str], key: str, path: Path) -> str:
    for name in _SYNONYMS.get(key, (key,)):
        if name in fields:
            return fields[name]
    raise MetaImageError(f"{path}: missing key {key}")


def _numbers(fields, key: str, path: Path, n: int, kind=float, default=None) -> np.ndarray:
    """``n`` numbers of ``key`` (or ``default`` when the key is absent and a default exists)."""
    try:
        text = _get(fields, key, path)
    except MetaImageError:
        if default is None:
            raise
        return np.asarray(default, dtype=np.float64 if kind is float else np.int64)
    try:
        values = [kind(v) if kind is float else int(v) for v in text.split()]
    except ValueError:
        values = None
    if values is None or len(values) != n or not np.all(np.isfinite(values)):
        raise MetaImageError(f"{path}: {key}: expected {n} {'integers' if kind is int else 'numbers'}, got {text!r}")
    return np.asarray(values, dtype=np.float64 if kind is float else np.int64)


def _flag(fields, key: str, path: Path, default: bool) -> bool:
    if key not in fields:
        return default
    value = fields[key].lower()
    if value not in ("true", "false", "1", "0"):
        raise MetaImageError(f"{path}: {key}: expected True or False, got {fields[key]!r}")
    return value in ("true", "1")


def _direction(fields, path: Path, n: int) -> np.ndarray:
    """The direction matrix (columns: index axes); it must be orthonormal, as a scanner's axes are."""
    values = _numbers(fields, "TransformMatrix", path, n * n, default=np.eye(n).ravel())
    direction = values.reshape(n, n).T
    if not np.allclose(direction.T @ direction, np.eye(n), atol=ORTHONORMAL_TOL):
        raise MetaImageError(f"{path}: TransformMatrix: expected an orthonormal {n} x {n} matrix, got "
                             f"{' '.join(f'{v:g}' for v in values)}")  # fmt: skip
    return direction


def _check_fields(fields: dict[str, str], path: Path, n: int) -> None:
    """The keys that only need checking: an image of one channel, binary data, a valid orientation code."""
    if fields.get("ObjectType", "Image").lower() != "image":
        raise MetaImageError(f"{path}: ObjectType: expected Image, got {fields['ObjectType']!r}")
    if not _flag(fields, "BinaryData", path, default=True):
        raise MetaImageError(f"{path}: BinaryData: ASCII voxel data is not supported, expected True")
    if fields.get("ElementNumberOfChannels", "1") != "1":
        raise MetaImageError(f"{path}: ElementNumberOfChannels: expected 1 (a scalar image), got "
                             f"{fields['ElementNumberOfChannels']!r}")  # fmt: skip
    if "CenterOfRotation" in fields:
        _numbers(fields, "CenterOfRotation", path, n)
    code = fields.get("AnatomicalOrientation", "?" * n).upper()
    if len(code) != n or any(c not in "RLAPSI?" for c in code):
        raise MetaImageError(f"{path}: AnatomicalOrientation: expected {n} letters of RLAPSI, got {code!r}")


def _data_location(fields: dict[str, str], path: Path) -> tuple[Path, bool]:
    """The voxels' file and whether it is the header's own (``LOCAL``)."""
    name = fields["ElementDataFile"]
    if name.upper() == "LOCAL":
        return path, True
    if name.upper().startswith("LIST") or "%" in name:
        raise MetaImageError(f"{path}: ElementDataFile: one file per slice ({name!r}) is not supported")
    return (path.parent / name), False


def read_metaimage_header(path: str | os.PathLike) -> MetaImageHeader:
    """Parse and check a MetaImage header (no voxels are read): cheap, so a whole dataset can be planned first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MetaImage header")
    fields, end = _header_lines(path)
    ndims = _numbers(fields, "NDims", path, 1, kind=int)[0]
    if ndims < 1:
        raise MetaImageError(f"{path}: NDims: expected a positive integer, got {fields['NDims']!r}")
    _check_fields(fields, path, ndims)
    shape = _numbers(fields, "DimSize", path, ndims, kind=int)
    spacing = _numbers(fields, "ElementSpacing", path, ndims)
    if (shape < 1).any():
        raise MetaImageError(f"{path}: DimSize: expected {ndims} positive integers, got {fields['DimSize']!r}")
    if (spacing <= 0).any():
        raise MetaImageError(f"{path}: ElementSpacing: expected {ndims} positive numbers, got "
                             f"{fields['ElementSpacing']!r}")  # fmt: skip
    element_type = _get(fields, "ElementType", path)
    if element_type not in ELEMENT_TYPES:
        raise MetaImageError(f"{path}: ElementType: unknown element type {element_type!r}; expected one of "
                             f"{sorted(ELEMENT_TYPES)}")  # fmt: skip
    msb = _flag(fields, "ElementByteOrderMSB", path, _flag(fields, "BinaryDataByteOrderMSB", path, False))
    data_path, local = _data_location(fields, path)
    compressed = _flag(fields, "CompressedData", path, default=False)
    header_size = int(_numbers(fields, "HeaderSize", path, 1, kind=int, default=[0])[0]) if not local else 0
    if header_size < -1 or (header_size == -1 and compressed):
        raise MetaImageError(f"{path}: HeaderSize: expected >= 0 (or -1 for uncompressed data), got {header_size}")
    size = _numbers(fields, "CompressedDataSize", path, 1, kind=int)[0] if "CompressedDataSize" in fields else None
    return MetaImageHeader(
        path=path, shape=tuple(int(v) for v in shape[::-1]), spacing=spacing[::-1].copy(),
        origin=_numbers(fields, "Offset", path, ndims, default=np.zeros(ndims)),
        direction=_direction(fields, path, ndims),
        dtype=np.dtype(ELEMENT_TYPES[element_type]).newbyteorder(">" if msb else "<"), element_type=element_type,
        data_path=data_path, data_offset=end if local else max(header_size, 0), header_size=header_size,
        compressed=compressed, compressed_size=None if size is None else int(size), fields=fields,
    )  # fmt: skip


# --------------------------------------------------------------------------------- voxels
def _size_error(header: MetaImageHeader, found: int, expected: int, what: str) -> MetaImageError:
    dims = " ".join(str(v) for v in header.shape[::-1])
    return MetaImageError(f"{header.data_path}: {found} bytes of {what} where the header {header.path} (DimSize "
                          f"{dims}, ElementType {header.element_type}) needs {expected}")  # fmt: skip


def _compressed_voxels(header: MetaImageHeader) -> np.ndarray:
    with open(header.data_path, "rb") as fh:
        fh.seek(header.data_offset)
        blob = fh.read() if header.compressed_size is None else fh.read(header.compressed_size)
    if header.compressed_size is not None and len(blob) != header.compressed_size:
        raise _size_error(header, len(blob), header.compressed_size, "compressed data (CompressedDataSize)")
    try:
        raw = zlib.decompress(blob)
    except zlib.error as error:
        raise MetaImageError(f"{header.data_path}: CompressedData: not a zlib stream ({error})") from None
    if len(raw) != header.n_bytes:
        raise _size_error(header, len(raw), header.n_bytes, "decompressed data")
    return np.frombuffer(raw, dtype=header.dtype)


def _raw_voxels(header: MetaImageHeader, mmap: bool) -> np.ndarray:
    available = os.path.getsize(header.data_path) - header.data_offset
    offset = header.data_offset
    if header.header_size == -1:  # the voxels are the file's last bytes
        offset, available = offset + max(available - header.n_bytes, 0), min(available, header.n_bytes)
    if available != header.n_bytes:
        raise _size_error(header, available, header.n_bytes, "data")
    count = header.n_bytes // header.dtype.itemsize
    if mmap:
        return np.memmap(header.data_path, dtype=header.dtype, mode="r", offset=offset, shape=(count,))
    return np.fromfile(header.data_path, dtype=header.dtype, count=count, offset=offset)


def read_metaimage_voxels(header: MetaImageHeader, mmap: bool = False) -> np.ndarray:
    """The voxels of a parsed header, ``(z, y, x)`` in native byte order. With ``mmap`` (uncompressed data in the
    native byte order only) a read-only memory map: reading a few slices of a 150 MB scan then reads a few MB."""
    if not header.data_path.is_file():
        raise FileNotFoundError(f"{header.path}: ElementDataFile {header.fields['ElementDataFile']!r}: no such file "
                                f"{header.data_path}")  # fmt: skip
    native = header.dtype.isnative or header.dtype.itemsize == 1
    flat = _compressed_voxels(header) if header.compressed else _raw_voxels(header, mmap and native)
    volume = flat.reshape(header.shape)
    return volume if native else volume.astype(header.dtype.newbyteorder("="))


def read_metaimage(path: str | os.PathLike, mmap: bool = False) -> MetaImage:
    """``(array (z, y, x), spacing (z, y, x) mm, origin (x, y, z) mm, direction (3, 3))`` of a MetaImage file."""
    header = read_metaimage_header(path)
    return MetaImage(read_metaimage_voxels(header, mmap), header.spacing, header.origin, header.direction)


# --------------------------------------------------------------------------------- writing
def orientation_code(direction: np.ndarray) -> str:
    """ITK's AnatomicalOrientation letters of a direction matrix (identity: ``RAI``, LUNA16's)."""
    letters = []
    for j in range(direction.shape[1]):
        i = int(np.argmax(np.abs(direction[:, j])))
        letters.append(_ORIENTATION_LETTERS[i][0 if direction[i, j] > 0 else 1] if i < 3 else "?")
    return "".join(letters)


def write_metaimage(path: str | os.PathLike, array: np.ndarray, spacing=None, origin=None, direction=None,
                    compress: bool = False) -> Path:
    """Write ``array`` ``(z, y, x)`` as MetaImage: ``<stem>.mhd`` + ``<stem>.raw`` (``.zraw`` with ``compress``,
    zlib), or one ``.mha`` file (``LOCAL`` data). ``spacing`` (z, y, x) mm, ``origin`` (x, y, z) mm and
    ``direction`` (columns: index axes x, y, z) as :func:`read_metaimage` returns them. Returns the header's path."""
    path, array = Path(path), np.asarray(array)
    n = array.ndim
    types = {v: k for k, v in ELEMENT_TYPES.items()}
    code = array.dtype.newbyteorder("<").str[1:]
    if code not in types:
        raise ValueError(f"write_metaimage: no MetaImage element type for dtype {array.dtype}")
    spacing = np.ones(n) if spacing is None else np.asarray(spacing, dtype=np.float64)
    origin = np.zeros(n) if origin is None else np.asarray(origin, dtype=np.float64)
    direction = np.eye(n) if direction is None else np.asarray(direction, dtype=np.float64)
    payload = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    if compress:
        payload = zlib.compress(payload)
    local = path.suffix.lower() == ".mha"
    data_name = "LOCAL" if local else path.with_suffix(".zraw" if compress else ".raw").name
    fmt = lambda values: " ".join(repr(float(v)) for v in values)  # noqa: E731  (shortest exact round trip)
    lines = [
        "ObjectType = Image", f"NDims = {n}", "BinaryData = True", "BinaryDataByteOrderMSB = False",
        f"CompressedData = {compress}", *([f"CompressedDataSize = {len(payload)}"] if compress else []),
        f"TransformMatrix = {fmt(direction.T.ravel())}", f"Offset = {fmt(origin)}",
        f"CenterOfRotation = {fmt(np.zeros(n))}",
        f"AnatomicalOrientation = {orientation_code(direction)}", f"ElementSpacing = {fmt(spacing[::-1])}",
        f"DimSize = {' '.join(str(v) for v in array.shape[::-1])}", f"ElementType = {types[code]}",
        f"ElementDataFile = {data_name}",
    ]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("\n".join(lines) + "\n").encode("latin-1")
    if local:
        path.write_bytes(header + payload)
    else:
        path.write_bytes(header)
        (path.parent / data_name).write_bytes(payload)
    return path
