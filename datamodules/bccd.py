"""BCCD blood-cell detection (RBC, WBC, Platelets) from a Pascal VOC folder, or from a phantom in the same layout.

* ``root`` given: the user's BCCD download (``Annotations/*.xml``, ``JPEGImages/*.jpg``, ``ImageSets/Main/{train,
  val,test}.txt``), read by :func:`medrobust.data.voc.read_voc`: its errors name the bad file, and the zero-size
  boxes it skips are logged by file. The split is the published one, by image (``split`` fractions give a seeded
  split by image, used only when the folder has no ``ImageSets/Main``).
* ``root=None``: a phantom. :func:`medrobust.data.voc_examples.write_voc` draws ``phantom_images`` smears at BCCD's
  640 x 480 into ``<cache_dir>/bccd_phantom_<hash>/`` once (written in a temporary folder and renamed into place,
  so a half-written folder is never read), then it is read through the same reader: the phantom exercises the real
  format, JPEG decoding and resizing included.

Every image is resized to ``image_size`` ``(H, W)`` (bilinear, antialiased) and its boxes scaled with it (per axis,
so they stay fractional pixels). The resized uint8 images and the boxes are cached as one ``bccd_<source>_<hash>
.npz`` keyed by the settings and every XML's and JPEG's fingerprint (path, size, mtime): a later run loads it in
seconds, and an edited file misses. Batches have LUNA's detection format (:mod:`medrobust.datamodules.luna`,
``N`` = the batch's largest box count, at least 1)::

    {"image": float32 (B, 3, H, W) RGB in [0, 1] (8-bit levels / 255),
     "boxes": float32 (B, N, 4) StandardMode (row_lo, col_lo, row_hi, col_hi) in pixels of the resized image,
              half-open; padding rows 0,
     "labels": int64 (B, N) index into class_names (RBC 0, WBC 1, Platelets 2); padding -1,
     "box_valid": bool (B, N), "box_target": bool (B, N) (every valid box is a target: BCCD has no "ignore" box),
     "id": list[str] and "patient_id": list[str], both the image stem (BCCD has no patient ids: the split is by image),
     "spacing": float32 (B, 2) ones: BCCD gives no physical pixel size, so distances are pixels of the resized image}
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from medrobust.data.intensity import IntensityWindow
from medrobust.data.patches import file_fingerprint, settings_key
from medrobust.data.voc import BCCD_CLASSES, VocDataset, VocImage, check_root, load_image, read_voc
from medrobust.data.voc_examples import write_voc
from medrobust.datamodules.augment import FlipRot90, draw_flip_rot90
from medrobust.datamodules.base import SPLITS, check_bool, check_int, check_split, check_split_counts
from medrobust.datamodules.base import check_writable, default_cache_dir, image_item
from medrobust.datamodules.detection import CachedDetectionDataset, DetectionDataModule

log = logging.getLogger("medrobust")

VERSION = 1  # bump when resizing or the cache layout changes, so old caches miss
PHANTOM_VERSION = 1  # bump when the phantom folder's content changes
PHANTOM_SIZE = (480, 640)  # (rows, columns) of BCCD's JPEGs: 640 x 480
DEFAULT_IMAGE_SIZE = (192, 256)
MAX_SIDE = 2048
EIGHT_BIT = IntensityWindow(0.0, 255.0, unit="8-bit RGB level")  # the cache's uint8 levels -> [0, 1]


# --------------------------------------------------------------------------------- pixels and boxes
def resize_image(pixels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """float32 ``(3, h, w)`` in [0, 1] (:func:`load_image`) -> uint8 ``(3, *size)``, bilinear and antialiased."""
    from PIL import Image

    levels = np.rint(np.moveaxis(pixels, 0, -1) * 255.0).astype(np.uint8)  # load_image's / 255 undone exactly
    resized = Image.fromarray(levels).resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.moveaxis(np.asarray(resized), -1, 0))


def scale_boxes(boxes: np.ndarray, source: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """StandardMode boxes ``(N, 4)`` of an image of ``source`` (rows, columns) in pixels of the image resized to
    ``size``: pixel edges scale with the image, so a half-open box covers the same part of it."""
    rows, cols = size[0] / source[0], size[1] / source[1]
    return (boxes * np.array([rows, cols, rows, cols], dtype=np.float64)).astype(np.float32).reshape(-1, 4)


def write_phantom(folder: Path, n_images: int, seed: int) -> Path:
    """The phantom VOC folder, written once: drawn in a temporary sibling and renamed into place, so ``folder``
    exists only complete (a concurrent writer that renames first wins; its folder is the same, by seed)."""
    if folder.is_dir():
        return folder
    check_writable(folder.parent)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".tmp"))
    try:
        log.info("BCCD phantom: drawing %d images into %s", n_images, folder)
        write_voc(tmp, n_images, seed, PHANTOM_SIZE)
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------- batches
class BccdDataset(CachedDetectionDataset):
    """The images ``idx`` of the cached arrays (see :meth:`BccdDataModule._build`); items as LUNA's, which
    :func:`~medrobust.datamodules.detection.collate_detection` pads into a batch."""

    def image(self, j: int) -> torch.Tensor:
        return image_item(self.arrays["images"][j], self.intensity)[0]  # image_item adds a channel axis: RGB has one

    def labels(self, j: int, rows: slice) -> torch.Tensor:
        return torch.from_numpy(self.arrays["labels"][rows].astype(np.int64))

    def box_target(self, j: int, rows: slice) -> torch.Tensor:
        return torch.ones(rows.stop - rows.start, dtype=torch.bool)  # every cell is a target

    def patient_id(self, j: int) -> str:
        return str(self.arrays["ids"][j])  # split by image: each image its own "patient"

    def spacing(self, j: int) -> torch.Tensor:
        return torch.ones(2, dtype=torch.float32)  # no physical pixel size: pixels

    def counts(self, class_names: Sequence[str]) -> dict[str, int]:
        """Images, boxes, and boxes per class of this split."""
        labels = self.arrays["labels"][self.split_boxes()]
        per_class = {name: int((labels == k).sum()) for k, name in enumerate(class_names)}
        return {"images": len(self.idx), "boxes": len(labels), **per_class}


# --------------------------------------------------------------------------------- the datamodule
class BccdDataModule(DetectionDataModule):
    """BCCD blood-cell detection (module docstring).

    Args:
        root: the BCCD / Pascal VOC folder; ``None``: the phantom.
        cache_dir: where the phantom folder and the resized cache go (the config: ``${paths.data_dir}/bccd``);
            default ``data_cache/bccd`` for the phantom, ``$MEDROBUST_DATA_DIR/bccd`` (else
            ``$XDG_CACHE_HOME/medrobust/bccd``) for a real root.
        image_size: ``[H, W]`` every image is resized to, multiples of 16 (a detector halves it four times).
        phantom_images: images the phantom draws (a quarter each to val and test).
        split: train / val / test fractions for a seeded split by image, used only without ``ImageSets/Main``.
        seed: the phantom's drawing, the fallback split and the augmentation.
        augment: random flips of both axes of training batches (and quarter turns when ``image_size`` is square),
            boxes moved with the image.

    After ``setup``, ``split_counts[split]`` holds the split's images, boxes and boxes per class.
    """

    augment_name = "bccd-augment"

    def __init__(self, root: str | None = None, cache_dir: str | None = None,
                 image_size: Sequence[int] = DEFAULT_IMAGE_SIZE, phantom_images: int = 160,
                 split: Sequence[float] | None = None, seed: int = 0, batch_size: int = 16, num_workers: int = 0,
                 augment: bool = True):  # fmt: skip
        super().__init__()
        self.image_size = check_image_size(image_size)
        for key, value, minimum in (("phantom_images", phantom_images, 8), ("seed", seed, 0),
                                    ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):  # fmt: skip
            check_int(key, value, minimum)
        check_bool("augment", augment)
        self.split = check_split(split) if split is not None else None
        for key, value in (("root", root), ("cache_dir", cache_dir)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"data.{key} must be null or a folder path, got {value!r}")
        if root is not None:
            try:
                check_root(Path(root))
            except FileNotFoundError as err:
                raise FileNotFoundError(f"data.root: {err}") from None
        self.save_hyperparameters(logger=False)

        self.root = str(root) if root is not None else None
        self.source = "phantom" if root is None else "voc"
        default = os.path.join("data_cache", "bccd")
        self.cache_dir = str(cache_dir) if cache_dir is not None else default_cache_dir(self.source, default, "bccd")
        self.phantom_images, self.seed = int(phantom_images), int(seed)
        self.batch_size, self.num_workers, self.augment = int(batch_size), int(num_workers), augment
        self.spatial_dims, self.in_channels = 2, 3
        self.class_names, self.num_classes = list(BCCD_CLASSES), len(BCCD_CLASSES)
        self.intensity, self.input_bounds = EIGHT_BIT, (0.0, 1.0)
        self.split_counts: dict[str, dict[str, int]] = {}
        self._voc: VocDataset | None = None
        self._settings_cache: dict | None = None

    # ------------------------------------------------------------------------------------ reading
    def phantom_root(self) -> Path:
        """The phantom's VOC folder, named by what its content depends on."""
        key = settings_key(dict(kind="bccd_phantom", version=PHANTOM_VERSION, n_images=self.phantom_images,
                                seed=self.seed, size=list(PHANTOM_SIZE)))  # fmt: skip
        return Path(self.cache_dir) / f"bccd_phantom_{key}"

    def voc(self) -> VocDataset:
        """The annotations of every split (read once; the phantom is drawn first when missing). Cheap next to the
        pixels, so read on every run: its checks and the log of skipped zero-size boxes always happen."""
        if self._voc is None:
            root = self.root if self.root is not None else write_phantom(self.phantom_root(), self.phantom_images,
                                                                         self.seed)  # fmt: skip
            self._voc = read_voc(root, BCCD_CLASSES, SPLITS, split=self.split, seed=self.seed)
        return self._voc

    def images(self) -> list[VocImage]:
        """Every image of every split, by stem (the cache's order: independent of which split lists it)."""
        return sorted((image for images in self.voc().splits.values() for image in images), key=lambda i: i.stem)

    # ------------------------------------------------------------------------------------ caching
    def _settings(self) -> dict:
        """What a cached pixel or box depends on; the split is applied at load time from the lists."""
        if self._settings_cache is None:
            files = [file_fingerprint(p) for image in self.images() for p in (image.annotation_path, image.image_path)]
            self._settings_cache = dict(kind="bccd", version=VERSION, classes=list(BCCD_CLASSES),
                                        image_size=list(self.image_size), files=files)  # fmt: skip
        return self._settings_cache

    def cache_path(self) -> Path:
        return Path(self.cache_dir) / f"bccd_{self.source}_{settings_key(self._settings())}.npz"

    def _build(self) -> dict[str, np.ndarray]:
        """Decode, resize and box every image; the boxes of all images concatenated (image ``i`` owns rows
        ``box_offsets[i]:box_offsets[i + 1]``)."""
        images = self.images()
        pixels = np.zeros((len(images), 3, *self.image_size), dtype=np.uint8)
        for i, image in enumerate(tqdm(images, desc=f"BCCD {self.source}", unit="image")):
            pixels[i] = resize_image(load_image(image), self.image_size)
        counts = [len(image.boxes) for image in images]
        arrays = {
            "images": pixels,
            "boxes": np.concatenate([scale_boxes(i.boxes, (i.height, i.width), self.image_size) for i in images]),
            "labels": np.concatenate([i.labels for i in images]).astype(np.int64),
            "box_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "ids": np.array([image.stem for image in images]),
            "source_size": np.array([(image.height, image.width) for image in images], dtype=np.int64),
        }
        return self._write_cache(arrays, n_images=len(images), n_boxes=int(sum(counts)))

    # ------------------------------------------------------------------------------------ setup
    def _assign(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Each cached image's split from the reader's lists (by stem: the split is by image)."""
        split_of = {image.stem: k for k, name in enumerate(SPLITS) for image in self.voc().splits[name]}
        assign = np.array([split_of[str(stem)] for stem in arrays["ids"]], dtype=np.int64)
        if self.split is not None:  # a seeded split can leave a split empty; published lists never are
            counts = {name: int((assign == k).sum()) for k, name in enumerate(SPLITS)}
            check_split_counts(counts, self.split, "images", "add images or change data.split")
        return assign

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        dataset = BccdDataset(arrays, idx, self.intensity)
        self.split_counts[split] = dataset.counts(self.class_names)
        return dataset

    def _log_setup(self) -> None:
        voc = self.voc()
        log.info(
            "BCCD %s (%s, split from %s, %d zero-size box(es) skipped), %dx%d px: %s", self.source, voc.root,
            voc.split_source, len(voc.skipped), *self.image_size,
            "; ".join(f"{n} {c['images']} images ({', '.join(f'{c[k]} {k}' for k in self.class_names)})"
                      for n, c in self.split_counts.items()),
        )  # fmt: skip

    # ------------------------------------------------------------------------------------ augmentation
    def draw_spatial(self, images: torch.Tensor, generator: torch.Generator) -> FlipRot90:
        """Flips of both axes (a smear has no up or left); quarter turns only for square images, since a turn of
        a 3:4 image would change its shape."""
        return draw_flip_rot90(images.shape[0], 2, generator, rotate=images.shape[-1] == images.shape[-2])


# --------------------------------------------------------------------------------- argument checks
def check_image_size(value) -> tuple[int, int]:
    """``data.image_size``: ``[H, W]``, multiples of 16 from 16 to :data:`MAX_SIDE`."""
    try:
        size = tuple(value)
    except TypeError:
        size = ()
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 16 <= v <= MAX_SIDE
                             or v % 16 for v in size):  # fmt: skip
        raise ValueError(f"data.image_size must be [height, width], multiples of 16 from 16 to {MAX_SIDE}, got "
                         f"{value!r}")  # fmt: skip
    return int(size[0]), int(size[1])
