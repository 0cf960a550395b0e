"""Write a tiny detection dataset in the Pascal VOC layout as BCCD ships it (tests, smoke runs, a format example):
JPEGs of pale-pink blood smears with coloured ellipses for the cells, one XML per image with a box per cell, and the
split lists ``ImageSets/Main/{train,val,test,trainval}.txt``. Everything is drawn from one seed.

    python -c "from medrobust.data.voc_examples import write_voc; print(write_voc('demo/BCCD'))"
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BACKGROUND = (232, 204, 208)  # a stained smear's pale pink
# per class: RGB fill, (smallest, largest) diameter as a fraction of the image's shorter side, cells per image
CELLS = {"RBC": ((205, 55, 60), (0.15, 0.21), (2, 4)),
         "WBC": ((95, 60, 185), (0.24, 0.30), (1, 1)),
         "Platelets": ((60, 140, 70), (0.06, 0.08), (1, 2))}  # fmt: skip
PLACEMENT_TRIES = 200  # random places tried per cell before it is left out (the image is full)


def example_stems(n_images: int) -> list[str]:
    return [f"BloodImage_{i:05d}" for i in range(n_images)]


def example_objects(n_images: int = 8, seed: int = 0, size: Sequence[int] = (96, 128)) -> dict[str, list[tuple]]:
    """The cells :func:`write_voc` draws: per stem ``[(class, xmin, ymin, xmax, ymax)]`` in VOC pixels (1-based,
    inclusive), boxes apart by at least a pixel, inside an image of ``size`` (rows, columns)."""
    rng = np.random.default_rng(seed)
    height, width = (int(n) for n in size)
    objects = {}
    for stem in example_stems(n_images):
        taken: list[tuple[int, int, int, int]] = []  # 0-based half-open (c0, r0, c1, r1)
        cells = []
        for name, (_, diameters, counts) in CELLS.items():
            for _ in range(int(rng.integers(counts[0], counts[1] + 1))):
                box = place_cell(rng, diameters, width, height, taken)
                if box is not None:
                    taken.append(box)
                    c0, r0, c1, r1 = box
                    cells.append((name, c0 + 1, r0 + 1, c1, r1))
        objects[stem] = cells
    return objects


def place_cell(rng: np.random.Generator, diameters: Sequence[float], width: int, height: int,
               taken: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:  # fmt: skip
    """A free box ``(c0, r0, c1, r1)`` (0-based, half-open) for one cell, or None when none is found."""
    short = min(width, height)
    for _ in range(PLACEMENT_TRIES):
        w, h = (max(3, int(round(rng.uniform(*diameters) * short))) for _ in range(2))
        c0, r0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        box = (c0, r0, c0 + w, r0 + h)
        if all(box[2] < t[0] or t[2] < box[0] or box[3] < t[1] or t[3] < box[1] for t in taken):
            return box
    return None


def example_splits(n_images: int = 8, seed: int = 0) -> dict[str, list[str]]:
    """The published split :func:`write_voc` writes: a quarter each (at least one) to val and test, the rest to
    train, by a seeded shuffle of the images; stems sorted in each list."""
    if n_images < 3:
        raise ValueError(f"n_images {n_images}: expected at least 3, one per split")
    stems = example_stems(n_images)
    order = [stems[i] for i in np.random.default_rng(seed + 1).permutation(n_images)]
    k = max(1, n_images // 4)
    return {"train": sorted(order[2 * k :]), "val": sorted(order[:k]), "test": sorted(order[k : 2 * k])}


def draw_cells(cells: Sequence[tuple], size: Sequence[int], seed: int) -> np.ndarray:
    """``uint8 (H, W, 3)``: the background with a little noise and one filled ellipse per cell, inside its box."""
    from PIL import Image, ImageDraw

    height, width = (int(n) for n in size)
    noise = np.random.default_rng(seed).normal(0, 3, (height, width, 3))
    image = Image.fromarray(np.clip(np.asarray(BACKGROUND) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for name, xmin, ymin, xmax, ymax in cells:
        # VOC pixels xmin..xmax (1-based, inclusive) are 0-based xmin - 1 .. xmax - 1; pillow's corners are inclusive
        draw.ellipse((xmin - 1, ymin - 1, xmax - 1, ymax - 1), fill=CELLS[name][0])
    return np.asarray(image)


def write_annotation(path: str | os.PathLike, filename: str | None, size: Sequence, objects: Sequence[tuple]) -> Path:
    """A VOC XML as BCCD writes it. ``size``: ``(height, width)``, or None for no <size>; ``objects``: ``(name,
    xmin, ymin, xmax, ymax)``, any value written as given (a string too, or None to leave that field out);
    ``filename`` None leaves out <filename>."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    if filename is not None:
        ET.SubElement(root, "filename").text = filename
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "Unknown"
    if size is not None:
        size_element = ET.SubElement(root, "size")
        for tag, value in (("width", size[1]), ("height", size[0]), ("depth", 3)):
            ET.SubElement(size_element, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, *corners in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        for tag, value in (("pose", "Unspecified"), ("truncated", 0), ("difficult", 0)):
            ET.SubElement(obj, tag).text = str(value)
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), corners):
            if value is not None:
                ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root, space="\t")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8")
    return Path(path)


def write_voc(root: str | os.PathLike, n_images: int = 8, seed: int = 0, size: Sequence[int] = (96, 128)) -> Path:
    """A BCCD-like VOC folder under ``root``: ``n_images`` JPEGs of ``size`` (rows, columns) with the cells of
    :func:`example_objects`, their XMLs and the split lists of :func:`example_splits`. Deterministic by ``seed``.
    Returns ``root``."""
    from PIL import Image

    root = Path(root)
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, (stem, cells) in enumerate(example_objects(n_images, seed, size).items()):
        pixels = draw_cells(cells, size, seed * 100_003 + i)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        write_annotation(root / "Annotations" / f"{stem}.xml", f"{stem}.jpg", size, cells)
    splits = example_splits(n_images, seed)
    splits["trainval"] = sorted(splits["train"] + splits["val"])
    for name, stems in splits.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{s}\n" for s in stems))
    return root
