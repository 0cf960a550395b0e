"""Image classification on the user's own data: one LightningDataModule, four layouts.

* ``source="csv"``: a label table ``csv`` (columns ``path``, ``label``, optional ``patient_id`` and ``split``; paths
  relative to the table's folder);
* ``source="folder"``: ``root`` holds one sub-folder per class (the folder name is the class), images inside;
* ``source="isic"``: ISIC 2018 task 3 / 2019 (``csv`` the ground truth, ``root`` the JPEG folder, ``metadata`` the
  lesion / patient ids); ``source="ddsm"``: CBIS-DDSM (``root`` the DICOM tree, ``csv`` the folder of the case
  descriptions); see :mod:`medrobust.data.classify_public`.

PNG / JPEG, DICOM and NIfTI files are decoded, scaled to [0, 1] by ``scale`` and resized or cropped to
``image_size`` (:mod:`medrobust.data.classify_images`), once per setting, into a cache keyed by the settings and every
file's fingerprint. ``class_names`` and ``in_channels`` are known right after construction (the table is parsed and
one file's header read), so the run can size the network before any image is decoded. Batches are dicts::

    {"image": float32 (B, C, *image_size) in [0, 1], "label": int64 (B,), "id": list[str], "patient_id": list[str]}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medrobust.data import classify_images as images_io
from medrobust.data import classify_readers as readers
from medrobust.data.classify_public import DDSM_ABNORMALITIES, DDSM_LABEL_RULES, ddsm_table, isic_table
from medrobust.data.classify_tables import EXPECTED_IMAGE, LabelTable, csv_table, folder_table, resolve_classes
from medrobust.data.intensity import IntensityWindow
from medrobust.data.patches import file_fingerprint, settings_key
from medrobust.datamodules.augment import FlipRot90, draw_flip_rot90
from medrobust.datamodules.base import SPLITS, SplitDataModule, check_bool, check_choice, check_floats, check_int
from medrobust.datamodules.base import check_spatial_dims, check_split, check_split_counts, default_cache_dir
from medrobust.datamodules.classify_split import IMBALANCE_WARNING, BalancedEpochSampler, assign_splits
from medrobust.datamodules.classify_split import count_classes, describe_counts, imbalance

log = logging.getLogger("medrobust")

SOURCES = ("csv", "folder", "isic", "ddsm")
NEEDS = {"csv": ("csv",), "folder": ("root",), "isic": ("csv", "root"), "ddsm": ("root",)}  # data keys per source
USES = {"csv": ("csv",), "folder": ("root",), "isic": ("csv", "root", "metadata"), "ddsm": ("root", "csv")}
VERSION = 1  # bump when decoding or scaling changes, so old caches miss
STORED = IntensityWindow(0.0, 65535.0, unit="uint16 code")  # cached images: [0, 1] as uint16 codes (1.5e-5 steps)


class ClassifyDataset(Dataset):
    """Images of one split: ``images`` uint16 codes ``(N, C, *spatial)`` of [0, 1]; ``labels`` class indices."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, ids: Sequence[str], patient_ids: Sequence[str]):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.ids, self.patient_ids = [str(i) for i in ids], [str(p) for p in patient_ids]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        image = STORED.to_model(self.images[i].astype(np.float32))
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "label": torch.tensor(self.labels[i], dtype=torch.int64), "id": self.ids[i],
                "patient_id": self.patient_ids[i]}  # fmt: skip


def check_image_size(image_size, spatial_dims: int) -> tuple[int, ...]:
    """One int for a square / cube, or one per axis; each an integer >= 4."""
    size = [image_size] * spatial_dims if isinstance(image_size, (int, np.integer)) else image_size
    values = check_floats("image_size", size, spatial_dims) if not isinstance(image_size, bool) else (0.0,)
    if any(v != int(v) or v < 4 for v in values):
        raise ValueError(f"data.image_size must be one integer >= 4 or {spatial_dims} of them, got {image_size!r}")
    return tuple(int(v) for v in values)


def read_table(source: str, csv: str | None, root: str | None, metadata: str | None, abnormality: str,
               label_rule: str) -> LabelTable:  # fmt: skip
    """The layout's label table; the keys it needs (and those it does not use) checked first, naming them."""
    given = {"csv": csv, "root": root, "metadata": metadata}
    missing = [key for key in NEEDS[source] if given[key] is None]
    if missing:
        raise ValueError(f"data.{missing[0]} is required for data.source={source}, got None")
    unused = [key for key, value in given.items() if value is not None and key not in USES[source]]
    if unused:
        why = " (a table's paths are relative to its folder)" if source == "csv" else ""
        raise ValueError(f"data.{unused[0]} is not used with data.source={source}{why}; set it to null")
    if source == "csv":
        return csv_table(csv)
    if source == "folder":
        return folder_table(root)
    if source == "isic":
        return isic_table(csv, root, metadata)
    return ddsm_table(root, csv, abnormality, label_rule)


class ClassifyDataModule(SplitDataModule):
    """Classification from image files (module docstring).

    Args:
        source: ``csv``, ``folder``, ``isic`` or ``ddsm``. csv / root / metadata: see the module docstring.
        cache_dir: where decoded images are cached (the configs: ``${paths.data_dir}/<task>``); default
            ``$MEDROBUST_DATA_DIR/classify``, else ``$XDG_CACHE_HOME/medrobust/classify``.
        classes: the class names in label order; labels outside it are an error. null: the layout's own order
            (ISIC's columns, CBIS-DDSM's rule) or the sorted labels (numbers in numeric order).
        image_size: pixels (voxels) per side, or one per axis. resize: ``resize`` (interpolated, antialiased) or
            ``crop`` (centred crop / zero padding).
        scale: ``dtype``, ``window`` or ``minmax`` (:mod:`medrobust.data.classify_images`); null: per format.
        window: ``[low, high]`` native units mapped to [0, 1] with ``scale=window``; null: the DICOM file's own.
        spatial_dims: 2 (images) or 3 (NIfTI volumes, multi-frame DICOM).
        split: train / val / test fractions, by patient when the layout has patients; a fixed split (a ``split``
            column; CBIS-DDSM's test files) is kept. seed: split, augmentation and balanced draws.
        augment: random flips of every axis of training batches; augment_rot90: and in-plane quarter turns (square
            images only). balanced_sampling: training batches draw every class equally often.
        label_rule: ddsm: ``binary`` (malignant vs the rest) or ``three_way``. abnormality: ddsm: ``both``,
            ``mass`` or ``calc``.

    ``class_names``, ``num_classes`` and ``in_channels`` are set by the constructor; ``intensity`` (the native window
    shared by every image, else None) and ``class_counts`` (per split) by :meth:`setup`.
    """

    augment_name = "classify-augment"

    def __init__(self, source: str = "csv", csv: str | None = None, root: str | None = None,
                 metadata: str | None = None, cache_dir: str | None = None, classes: Sequence[str] | None = None,
                 image_size: int | Sequence[int] = 128, resize: str = "resize", scale: str | None = None,
                 window: Sequence[float] | None = None, spatial_dims: int = 2,
                 split: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0, batch_size: int = 32,
                 num_workers: int = 0, augment: bool = True, augment_rot90: bool = True,
                 balanced_sampling: bool = False, label_rule: str = "binary", abnormality: str = "both"):  # fmt: skip
        super().__init__()
        check_choice("source", source, SOURCES)
        check_spatial_dims(spatial_dims)
        self.image_size = check_image_size(image_size, spatial_dims)
        check_choice("resize", resize, ("resize", "crop"))
        if scale is not None:
            check_choice("scale", scale, images_io.SCALES)
        if window is not None:
            window = check_floats("window", window, 2)
            if not window[1] > window[0]:
                raise ValueError(f"data.window must be [low, high] with high > low, got {list(window)}")
        for key, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("seed", seed, 0)):
            check_int(key, value, minimum)
        for key, value in (("augment", augment), ("augment_rot90", augment_rot90),
                           ("balanced_sampling", balanced_sampling)):  # fmt: skip
            check_bool(key, value)
        if augment and augment_rot90 and self.image_size[-1] != self.image_size[-2]:
            raise ValueError(f"data.augment_rot90 turns images a quarter, which needs square in-plane sizes; got "
                             f"data.image_size={list(self.image_size)} (set data.augment_rot90=false)")  # fmt: skip
        check_choice("label_rule", label_rule, DDSM_LABEL_RULES)
        check_choice("abnormality", abnormality, DDSM_ABNORMALITIES)
        if classes is not None and (isinstance(classes, str) or not all(isinstance(c, (str, int)) for c in classes)):
            raise ValueError(f"data.classes must be null or a list of class names, got {classes!r}")
        self.split = check_split(split)
        self.save_hyperparameters(logger=False)

        self.source, self.resize, self.scale, self.window = source, resize, scale, window
        self.spatial_dims, self.seed = int(spatial_dims), int(seed)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.augment, self.augment_rot90, self.balanced_sampling = augment, augment_rot90, balanced_sampling
        self.table = read_table(source, csv, root, metadata, abnormality, label_rule)
        self.class_names = resolve_classes(self.table, classes)
        self.num_classes = len(self.class_names)
        index = {name: k for k, name in enumerate(self.class_names)}
        self.labels = np.array([index[row.label] for row in self.table.rows], dtype=np.int64)
        self.in_channels = readers.peek_channels(self.table.rows[0].path)  # every file is checked while decoding
        self.cache_dir = str(cache_dir) if cache_dir is not None else default_cache_dir(source, "", "classify")
        self.input_bounds, self.intensity = (0.0, 1.0), None
        self.class_counts: dict[str, list[int]] = {}
        self._settings_cache: dict | None = None
        for line in self.table.notes:
            log.info("%s", line)
        for line in self.table.warnings:
            log.warning("%s", line)

    # ------------------------------------------------------------------------------------ caching
    def _settings(self) -> dict:
        """What the cached images depend on: decoding settings and every file's fingerprint (computed once)."""
        if self._settings_cache is None:
            files = []
            for row in self.table.rows:
                try:
                    files.append(file_fingerprint(row.path))
                except OSError as err:
                    raise FileNotFoundError(f"{row.where}: image {row.path} cannot be read ({err.strerror or err}); "
                                            f"expected {EXPECTED_IMAGE}") from None
            self._settings_cache = dict(kind="classify", version=VERSION, spatial_dims=self.spatial_dims,
                                        image_size=self.image_size, resize=self.resize, scale=self.scale,
                                        window=self.window, files=files)  # fmt: skip
        return self._settings_cache

    def cache_path(self) -> Path:
        return Path(self.cache_dir) / f"classify_{self.source}_{settings_key(self._settings())}.npz"

    def _build(self) -> dict[str, np.ndarray]:
        """Decode every image (progress bar), check their channels agree, and write the cache."""
        rows = self.table.rows
        images = np.zeros((len(rows), self.in_channels, *self.image_size), dtype=np.uint16)
        native = np.zeros((len(rows), 2))
        notes: dict[str, list[Path]] = {}
        for i, row in enumerate(tqdm(rows, desc=f"classify {self.source}", unit="image")):
            unit, native[i], note = images_io.preprocess(row.path, self.spatial_dims, self.image_size, self.resize,
                                                         self.scale, self.window)  # fmt: skip
            if unit.shape[0] != self.in_channels:  # in_channels is the first file's
                raise ValueError(f"{row.path} ({row.where}) has {unit.shape[0]} channel(s), but {rows[0].path} has "
                                 f"{self.in_channels}; expected every image with the same channels (convert them, "
                                 "e.g. all to grey or all to RGB)")  # fmt: skip
            if note:
                notes.setdefault(note, []).append(row.path)
            images[i] = np.rint(STORED.to_native(unit)).astype(np.uint16)
        for note, paths in notes.items():
            log.info("classify: %s in %d image(s), e.g. %s", note, len(paths), paths[0])
        return self._write_cache({"images": images, "native_window": native}, n_images=len(rows))

    # ------------------------------------------------------------------------------------ setup
    def _assign(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Fixed splits kept, the rest by patient and stratified (:func:`assign_splits`); every split asked for gets
        images and every class training images, else an error before any training."""
        rows = self.table.rows
        fixed, groups = [r.split for r in rows], [r.patient_id for r in rows]
        assign = assign_splits(fixed, groups, self.labels, self.split, self.seed)
        counts = {name: int((assign == k).sum()) for k, name in enumerate(SPLITS)}
        hint = "add images, or set the fraction of a split you do not want to 0 (e.g. data.split=[0.8,0.2,0.0])"
        check_split_counts(counts, self.split, "images", hint + ("; the table fixes some splits" if any(fixed) else ""))
        self.class_counts = {name: count_classes(self.labels[assign == k], self.num_classes)
                             for k, name in enumerate(SPLITS)}  # fmt: skip
        empty = [c for c, n in zip(self.class_names, self.class_counts["train"]) if n == 0]
        if empty:
            raise ValueError(f"{self.table.source}: class(es) {empty} have no training images (images per split and "
                             f"class: {self.class_counts}); expected every class in the training split (add images "
                             "or patients of that class, or change data.split / the split column)")  # fmt: skip
        self.intensity = self._shared_window(arrays["native_window"])
        return assign

    def _shared_window(self, native: np.ndarray) -> IntensityWindow | None:
        """The native window every image was scaled by, when they share one (eps in native units then works)."""
        if not np.isfinite(native).all() or (native != native[0]).any() or native[0, 1] <= native[0, 0]:
            return None
        dicom = readers.file_kind(self.table.rows[0].path) == "dicom"
        unit = "DICOM rescaled unit (HU for CT)" if dicom else "grey level"
        return IntensityWindow(float(native[0, 0]), float(native[0, 1]), unit=unit)

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        rows = [self.table.rows[i] for i in idx]  # ids from the table: the cache is keyed by the files alone
        return ClassifyDataset(arrays["images"][idx], self.labels[idx], [r.sample_id for r in rows],
                               [r.patient_id for r in rows])  # fmt: skip

    def _log_setup(self) -> None:
        sets = (self.data_train, self.data_val, self.data_test)
        log.info("classify %s: %d classes, %d channel(s), %s px: %s", self.source, self.num_classes, self.in_channels,
                 "x".join(map(str, self.image_size)),
                 "; ".join(f"{name} {len(s)} ({describe_counts(self.class_counts[name], self.class_names)})"
                           for name, s in zip(SPLITS, sets)))  # fmt: skip
        ratio = imbalance(self.class_counts["train"])
        if ratio > IMBALANCE_WARNING:
            log.warning("classify: the training split is imbalanced, largest / smallest class = %.1f (%s)%s", ratio,
                        describe_counts(self.class_counts["train"], self.class_names),
                        "" if self.balanced_sampling else "; data.balanced_sampling=true draws classes equally")

    def summary_notes(self, split: str) -> list[str]:
        if split not in self.class_counts:
            return []
        return [f"Images per class ({split} split): {describe_counts(self.class_counts[split], self.class_names)}"]

    # ------------------------------------------------------------------------------------ loading and augmentation
    def train_dataloader(self) -> DataLoader:
        """The shuffled training loader; ``balanced_sampling``: class-balanced draws (:class:`BalancedEpochSampler`)."""
        if not self.balanced_sampling or self.data_train is None:
            return super().train_dataloader()
        return DataLoader(self.data_train, batch_size=self.batch_size,
                          sampler=BalancedEpochSampler(self.data_train.labels, self.seed),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def draw_spatial(self, images: torch.Tensor, generator: torch.Generator) -> FlipRot90:
        """Flips of every spatial axis and (``augment_rot90``) an in-plane quarter turn, as LIDC's."""
        return draw_flip_rot90(images.shape[0], images.dim() - 2, generator, rotate=self.augment_rot90)
