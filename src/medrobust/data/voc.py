"""Read object-detection data in the Pascal VOC layout, as the BCCD blood-cell dataset ships it.

    <root>/Annotations/<stem>.xml          one per image: <size> and one <object> (<name>, <bndbox>) per box
    <root>/JPEGImages/<filename>           the image the XML's <filename> names (<stem>.jpg without one)
    <root>/ImageSets/Main/<split>.txt      the image stems of each split, one per line (trainval.txt is not read)

Coordinates. VOC writes pixel indices 1-based and inclusive: ``xmin=1, xmax=10`` covers the first ten columns. The
reader gives MONAI StandardMode boxes of the image array ``(C, H, W)`` (as :mod:`medrobust.tasks.detection_metrics`
takes them): ``(row_lo, col_lo, row_hi, col_hi)`` in pixels, 0-based and half-open, extents ``hi - lo``::

    row_lo = ymin - 1    col_lo = xmin - 1    row_hi = ymax    col_hi = xmax

so that box is ``col_lo=0, col_hi=10``, 10 pixels wide as in VOC (``xmax - xmin + 1``); back to VOC: ``xmin = col_lo
+ 1, xmax = col_hi`` (:func:`standard_to_voc`). x is the column, y the row.

What is checked. A box may overhang its image by at most :data:`EDGE_TOLERANCE` pixel (tools round, and some write
0-based corners such as ``xmin=0``) and is then clipped to the image; further out it is an error. A box whose corners
coincide on an axis (``xmin == xmax`` or ``ymin == ymax``, a click without a drag in the annotation tool; BCCD has a
few) holds no cell: it is skipped, listed in :attr:`VocDataset.skipped` by file, object number and class, and logged
as a warning. Swapped corners (``xmin > xmax``), an unknown class, a malformed XML, a missing image and a JPEG of
another size than its XML says are errors naming the file and what was expected; nothing is dropped silently.

Splits are by image, never by box: the published ``ImageSets/Main`` lists, where an image in two splits is an error.
Without that folder, :func:`read_voc` stops and says what is expected, unless it is given ``split`` fractions: then
every annotated image is split by a seeded shuffle (the fallback is never used while ``ImageSets/Main`` exists).
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np

from medrobust.data.landmark_formats import list_folder, read_failure

log = logging.getLogger("medrobust")

BCCD_CLASSES = ("RBC", "WBC", "Platelets")
SPLIT_NAMES = ("train", "val", "test")
EDGE_TOLERANCE = 1.0  # pixels a box may overhang its image before it is an error
CORNERS = ("xmin", "ymin", "xmax", "ymax")
LAYOUT = "Annotations/<stem>.xml, JPEGImages/<stem>.jpg and ImageSets/Main/<split>.txt"
EXPECTED_XML = "a Pascal VOC annotation (<annotation> with <size> and <object> boxes)"
EXPECTED_JPEG = "a complete JPEG image"


@dataclass(frozen=True)
class VocImage:
    """One annotated image: ``boxes`` float32 ``(N, 4)`` StandardMode ``(row_lo, col_lo, row_hi, col_hi)`` (module
    docstring), ``labels`` int64 ``(N,)`` indices into the dataset's classes; ``width`` / ``height`` in pixels as
    the XML's <size> says (checked against the JPEG)."""

    stem: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class SkippedBox:
    """A zero-size box left out: its file, its place among the file's <object> s (``index`` counts from 1), its
    class and its VOC corners ``(xmin, ymin, xmax, ymax)``."""

    file: Path
    index: int
    class_name: str
    voc_box: tuple[float, float, float, float]

    def __str__(self) -> str:
        corners = ", ".join(f"{k}={v:g}" for k, v in zip(CORNERS, self.voc_box))
        return f"{self.file}: object {self.index} ({self.class_name}) has zero size ({corners})"


@dataclass
class VocDataset:
    """The images of each split (``splits[name]``, in the order of its list), the class names (label ``k`` is
    ``classes[k]``), the zero-size boxes left out, and where the split came from (``split_source``)."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, list[VocImage]]
    skipped: list[SkippedBox] = field(default_factory=list)
    split_source: str = ""


# ------------------------------------------------------------------------------------------ coordinates
def voc_to_standard(xmin: float, ymin: float, xmax: float, ymax: float) -> tuple[float, float, float, float]:
    """VOC corners (1-based, inclusive; x = column) -> ``(row_lo, col_lo, row_hi, col_hi)`` (0-based, half-open)."""
    return ymin - 1, xmin - 1, ymax, xmax


def standard_to_voc(box: Sequence[float]) -> tuple[float, float, float, float]:
    """``(row_lo, col_lo, row_hi, col_hi)`` -> VOC ``(xmin, ymin, xmax, ymax)``; the inverse of
    :func:`voc_to_standard`."""
    row_lo, col_lo, row_hi, col_hi = (float(v) for v in box)
    return col_lo + 1, row_lo + 1, col_hi, row_hi


# ------------------------------------------------------------------------------------------ the dataset
def read_voc(root: str | os.PathLike, classes: Sequence[str] = BCCD_CLASSES, splits: Sequence[str] = SPLIT_NAMES,
             split: Sequence[float] | None = None, seed: int = 0) -> VocDataset:  # fmt: skip
    """Read the VOC layout under ``root`` (module docstring): every image of ``splits`` with its boxes.

    ``classes``: the class names, in label order (an object of another class is an error). ``split``: fractions per
    entry of ``splits`` (e.g. ``(0.7, 0.15, 0.15)``), used only when ``root`` has no ``ImageSets/Main``: all annotated
    images are then shuffled with ``seed`` and cut by image. Zero-size boxes are skipped, listed in
    ``VocDataset.skipped`` and logged as one warning.
    """
    root = Path(root)
    annotations = check_root(root)
    classes = tuple(classes)
    if (root / "ImageSets" / "Main").is_dir():
        listed, source = published_splits(root, splits), str(root / "ImageSets" / "Main")
    elif split is not None:
        listed = seeded_splits(annotation_stems(annotations), splits, split, seed)
        source = f"seeded split {list(split)} of every annotation (seed {seed}; no ImageSets/Main)"
    else:
        raise FileNotFoundError(f"{root / 'ImageSets' / 'Main'}: split folder missing; expected "
                                f"{', '.join(f'{s}.txt' for s in splits)} there, image stems one per line (or "
                                "give split fractions, e.g. split=(0.7, 0.15, 0.15), for a seeded split by "
                                "image)")  # fmt: skip
    dataset = VocDataset(root, classes, {name: [] for name in splits}, split_source=source)
    for name, entries in listed.items():
        for stem, where in entries:
            image, skipped = read_annotation(annotation_path(annotations, stem, where), root / "JPEGImages", classes)
            dataset.splits[name].append(image)
            dataset.skipped += skipped
    check_images_once(dataset)
    if dataset.skipped:  # reported, not silently dropped: a user may want to fix the files
        log.warning("%d zero-size box(es) skipped:\n  %s", len(dataset.skipped), "\n  ".join(map(str, dataset.skipped)))
    return dataset


def check_root(root: Path) -> Path:
    """The root's Annotations folder; a missing root or folder raises saying what the layout is."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root missing or not a folder; expected a Pascal VOC layout ({LAYOUT})")
    annotations = root / "Annotations"
    if not annotations.is_dir():
        raise FileNotFoundError(f"{annotations}: folder missing; expected the Pascal VOC layout {LAYOUT} under "
                                f"{root}")  # fmt: skip
    return annotations


def annotation_stems(annotations: Path) -> list[str]:
    """The stems of every ``.xml`` in the Annotations folder, sorted; none raises."""
    stems = [p.stem for p in list_folder(annotations, "the VOC annotations <stem>.xml") if p.suffix.lower() == ".xml"]
    if not stems:
        raise FileNotFoundError(f"{annotations}: no .xml annotations; expected one <stem>.xml per image")
    return stems


def annotation_path(annotations: Path, stem: str, where: str) -> Path:
    """``Annotations/<stem>.xml`` of a listed stem; missing, the error names the list (``where``) that asked."""
    path = annotations / f"{stem}.xml"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {stem!r} has no annotation {path}; expected an XML for every listed "
                                "image")  # fmt: skip
    return path


def check_images_once(dataset: VocDataset) -> None:
    """No JPEG is named by two annotations: it would count twice, perhaps in two splits."""
    first: dict[Path, tuple[str, Path]] = {}
    for name, images in dataset.splits.items():
        for image in images:
            key = Path(os.path.realpath(image.image_path))
            seen_split, seen_xml = first.setdefault(key, (name, image.annotation_path))
            if seen_xml != image.annotation_path:
                raise ValueError(f"{image.annotation_path} ({name}): names image {image.image_path}, as does "
                                 f"{seen_xml} ({seen_split}); expected each image annotated once")  # fmt: skip


# ------------------------------------------------------------------------------------------ splits
def published_splits(root: Path, splits: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """``{split: [(stem, where)]}`` from ``ImageSets/Main/<split>.txt`` (``where``: file and line, for errors); a
    stem in two lists raises naming both."""
    listed = {name: read_split_file(root / "ImageSets" / "Main" / f"{name}.txt") for name in splits}
    first: dict[str, tuple[str, str]] = {}
    for name, entries in listed.items():
        for stem, where in entries:
            seen_split, seen_where = first.setdefault(stem, (name, where))
            if seen_split != name:
                raise ValueError(f"{where}: image {stem!r} is in {name}, but {seen_where} puts it in {seen_split}; "
                                 "expected each image in one split (the split is by image)")  # fmt: skip
    return listed


def read_split_file(path: Path) -> list[tuple[str, str]]:
    """``[(stem, "<path> line <n>")]`` of a split list, blank lines ignored; a repeated stem or a line that is no
    single stem raises."""
    expected = "image stems, one per line"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split list missing; expected {expected}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as err:
        raise read_failure(path, err, expected) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); expected {expected}") from None
    entries, first_line = [], {}
    for n, line in enumerate(lines, start=1):
        stem = line.strip()
        if not stem:
            continue
        if len(stem.split()) != 1:  # e.g. a class list 'stem  1' given for the split list
            raise ValueError(f"{path} line {n}: {line!r}; expected one image stem per line")
        if stem in first_line:
            raise ValueError(f"{path} line {n}: image {stem!r} already on line {first_line[stem]}; expected each image "
                             "once")  # fmt: skip
        first_line[stem] = n
        entries.append((stem, f"{path} line {n}"))
    if not entries:
        raise ValueError(f"{path}: no image stems; expected {expected}")
    return entries


def seeded_splits(stems: Sequence[str], splits: Sequence[str], fractions: Sequence[float],
                  seed: int) -> dict[str, list[tuple[str, str]]]:  # fmt: skip
    """The fallback split: ``stems`` shuffled with ``seed`` and cut into ``splits`` by ``fractions`` (rounded; the
    first split takes the remainder). Each split keeps its stems sorted."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != len(splits) or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split {fractions}: expected {len(splits)} non-negative fractions summing to 1, one per "
                         f"split {list(splits)}")  # fmt: skip
    order = np.random.default_rng(seed).permutation(len(stems))
    counts = [round(f * len(stems)) for f in fractions[1:]]
    counts = [len(stems) - sum(counts)] + counts
    if min(counts) < 0:
        raise ValueError(f"split {fractions}: cannot cut {len(stems)} images into {counts}")
    cuts = np.cumsum([0] + counts)
    where = f"seeded split (seed {seed})"
    return {name: [(stems[i], where) for i in sorted(order[lo:hi])]
            for name, lo, hi in zip(splits, cuts[:-1], cuts[1:])}  # fmt: skip


# ------------------------------------------------------------------------------------------ one annotation
def read_annotation(path: Path, jpeg_folder: Path, classes: Sequence[str]) -> tuple[VocImage, list[SkippedBox]]:
    """One XML: its image (checked to exist, at the size the XML says), its boxes and the zero-size boxes left out."""
    root = parse_xml(path)
    width, height = image_size(root, path)
    image_path = find_image(root, path, jpeg_folder)
    check_jpeg_size(image_path, width, height, path)
    boxes, labels, skipped = [], [], []
    for index, obj in enumerate(root.findall("object"), start=1):
        name, corners = read_object(obj, index, path, classes)
        box = clip_to_image(voc_to_standard(*corners), width, height, f"{path}: object {index} ({name})")
        if corners[0] == corners[2] or corners[1] == corners[3] or box[2] <= box[0] or box[3] <= box[1]:
            skipped.append(SkippedBox(path, index, name, corners))  # no extent (or none left inside the image)
            continue
        boxes.append(box)
        labels.append(classes.index(name))
    image = VocImage(path.stem, image_path, path, width, height, np.asarray(boxes, np.float32).reshape(-1, 4),
                     np.asarray(labels, np.int64))  # fmt: skip
    return image, skipped


def parse_xml(path: Path) -> ET.Element:
    """The <annotation> element of ``path``; a file that cannot be read or parsed, or another root, raises."""
    try:
        root = ET.parse(path).getroot()
    except OSError as err:
        raise read_failure(path, err, EXPECTED_XML) from None
    except ET.ParseError as err:
        raise ValueError(f"{path}: not well-formed XML ({err}); expected {EXPECTED_XML}") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: root element <{root.tag}>; expected {EXPECTED_XML}")
    return root


def field_number(element: ET.Element, tag: str, where: str) -> float:
    """The finite number in ``element``'s child ``tag``; missing, empty or not a number raises."""
    child = element.find(tag)
    text = (child.text or "").strip() if child is not None else ""
    if child is None or not text:
        raise ValueError(f"{where}: <{tag}> {'missing' if child is None else 'empty'}; expected a number")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{where}: <{tag}> is {text!r}; expected a finite number")
    return value


def image_size(root: ET.Element, path: Path) -> tuple[int, int]:
    """``(width, height)`` of <size>, whole positive pixel counts."""
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: no <size>; expected <size><width>..</width><height>..</height></size>")
    width, height = (field_number(size, tag, f"{path}: <size>") for tag in ("width", "height"))
    if min(width, height) < 1 or not float(width).is_integer() or not float(height).is_integer():
        raise ValueError(f"{path}: <size> width {width:g}, height {height:g}; expected whole pixel counts >= 1")
    return int(width), int(height)


def find_image(root: ET.Element, path: Path, jpeg_folder: Path) -> Path:
    """``JPEGImages/<filename>`` (``.jpg`` added to a name without a suffix; ``<stem>.jpg`` without <filename>);
    missing, the error names the XML and the image expected."""
    name = (root.findtext("filename") or "").strip() or f"{path.stem}.jpg"
    if not Path(name).suffix:  # some converters write the stem only
        name += ".jpg"
    # the folder is fixed by the layout: a path in <filename> (POSIX or Windows, from the annotating machine) is cut
    image_path = jpeg_folder / PureWindowsPath(name).name
    if not image_path.is_file():
        raise FileNotFoundError(f"{path}: names image {name!r}, but {image_path} is missing; expected the annotated "
                                "JPEG in JPEGImages")  # fmt: skip
    return image_path


def check_jpeg_size(image_path: Path, width: int, height: int, xml_path: Path) -> None:
    """The JPEG's header says the XML's size (boxes are in the XML's pixels). Only the header is read."""
    from PIL import Image

    try:
        with Image.open(image_path) as img:
            real = img.size
    except (OSError, ValueError) as err:  # PIL: UnidentifiedImageError, ...
        raise read_failure(image_path, err, EXPECTED_JPEG) from None
    if real != (width, height):
        raise ValueError(f"{image_path}: {real[0]} x {real[1]} pixels (width x height), but {xml_path} says "
                         f"{width} x {height}; expected the size of its annotation")  # fmt: skip


def read_object(obj: ET.Element, index: int, path: Path, classes: Sequence[str]) -> tuple[str, tuple[float, ...]]:
    """``(class name, (xmin, ymin, xmax, ymax))`` of one <object>; an unknown class, a missing or non-numeric corner
    or swapped corners raise."""
    name = (obj.findtext("name") or "").strip()
    where = f"{path}: object {index}"
    if name not in classes:
        raise ValueError(f"{where}: class {name!r}" + (" (no <name>)" if not name else "") +
                         f"; expected one of {list(classes)}")  # fmt: skip
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise ValueError(f"{where} ({name}): no <bndbox>; expected <bndbox> with {', '.join(CORNERS)}")
    corners = tuple(field_number(bndbox, tag, f"{where} ({name}) <bndbox>") for tag in CORNERS)
    xmin, ymin, xmax, ymax = corners
    if xmin > xmax or ymin > ymax:
        raise ValueError(f"{where} ({name}): xmin {xmin:g}, xmax {xmax:g}, ymin {ymin:g}, ymax {ymax:g}; expected "
                         "xmin <= xmax and ymin <= ymax")  # fmt: skip
    return name, corners


def clip_to_image(box: Sequence[float], width: int, height: int, where: str) -> tuple[float, ...]:
    """A StandardMode box clipped to the image; one overhanging by more than :data:`EDGE_TOLERANCE` raises."""
    row_lo, col_lo, row_hi, col_hi = box
    tol = EDGE_TOLERANCE
    if min(row_lo, col_lo) < -tol or row_hi > height + tol or col_hi > width + tol:
        xmin, ymin, xmax, ymax = standard_to_voc(box)
        raise ValueError(f"{where}: box xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax {ymax:g} lies outside the "
                         f"{width} x {height} image; expected 1 <= xmin, xmax <= {width} and 1 <= ymin, ymax <= "
                         f"{height} (VOC pixels, 1-based)")  # fmt: skip
    return max(row_lo, 0.0), max(col_lo, 0.0), min(row_hi, float(height)), min(col_hi, float(width))


# ------------------------------------------------------------------------------------------ pixels
def load_image(image: VocImage) -> np.ndarray:
    """The JPEG as float32 ``(3, H, W)`` RGB in [0, 1] (grey files are repeated to RGB); a missing or damaged file, or
    one whose decoded size is not the XML's, raises naming it."""
    from PIL import Image

    path = image.image_path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image missing (removed since the annotations were read?); expected the JPEG "
                                f"of {image.annotation_path}")  # fmt: skip
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file raises here, inside the try
            pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError) as err:
        raise read_failure(path, err, EXPECTED_JPEG) from None
    if pixels.shape[:2] != (image.height, image.width):
        raise ValueError(f"{path}: {pixels.shape[1]} x {pixels.shape[0]} pixels (width x height), but "
                         f"{image.annotation_path} says {image.width} x {image.height}; expected the size of its "
                         "annotation")  # fmt: skip
    return np.ascontiguousarray(np.moveaxis(pixels, -1, 0) / np.float32(255.0))
