"""Brain age from 3-D T1 MRI (regression): one LightningDataModule, two sources.

* ``source="phantom"`` (default): synthetic T1 brains built on the MNI152 template that nilearn's wheel
  ships, ageing like real ones (:mod:`medrobust.data.brain_phantom`); generated once per setting and
  cached under ``root``;
* ``source="nifti"``: T1 volumes listed in a participants table in the style of IXI / OpenBHB
  (:mod:`medrobust.data.brain_nifti`); preprocessed once and cached under ``cache_dir``.

Batches are dicts::

    {"image": float32 (B, 1, X, Y, Z) in [0, 1], RAS voxel order (X: left -> right),
     "label": float32 (B,) age in years,
     "features": float32 (B, F) regional volumes, z-scored with the training split's
                 ``features_mean`` / ``features_std`` (raw mL: ``dataset.volumes_ml``),
     "subject_id": list[str]}

Features are never lateralised (no left / right volumes), so the left-right flip augmentation leaves
them valid. A nifti table without volume columns gives ``F = 0`` (``features`` of shape ``(B, 0)``):
image-only models work, the hybrid image + volume model does not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medrobust.data.brain_anatomy import ATLAS_VERSION
from medrobust.data.intensity import IntensityWindow
from medrobust.data.patches import file_fingerprint, settings_key, stable_seed
from medrobust.datamodules.augment import FlipRot90, draw_flip_rot90
from medrobust.datamodules.base import SPLITS, SplitDataModule, check_bool, check_floats, default_cache_dir, image_item
from medrobust.datamodules.base import check_choice, check_int, check_split, check_split_counts

log = logging.getLogger("medrobust")

SOURCES = ("phantom", "nifti")
PHANTOM_VERSION = 1  # bump when the phantom changes, so old caches miss
NIFTI_VERSION = 1  # bump when the NIfTI preprocessing changes
STORED_UNIT = IntensityWindow(0.0, 65535.0, unit="uint16 code")  # how cached NIfTI volumes ([0, 1]) are stored


class BrainAgeDataset(Dataset):
    """Subjects of one split. ``images``: ``(N, X, Y, Z)`` stored values, mapped to [0, 1] per item by
    ``decode``; ``ages`` ``(N,)`` years; ``volumes_ml`` ``(N, F)`` raw regional volumes; ``label_maps``
    (phantom only) uint8 ``(N, X, Y, Z)`` tissue labels the images were built from."""

    def __init__(self, images: np.ndarray, ages: np.ndarray, volumes_ml: np.ndarray, subject_ids: Sequence[str],
                 decode: IntensityWindow, features_mean: np.ndarray, features_std: np.ndarray,
                 label_maps: np.ndarray | None = None):  # fmt: skip
        self.images, self.decode, self.label_maps = images, decode, label_maps
        self.ages = np.asarray(ages, dtype=np.float64)
        self.volumes_ml = np.asarray(volumes_ml, dtype=np.float64)
        self.features = ((self.volumes_ml - features_mean) / features_std).astype(np.float32)
        self.subject_ids = list(subject_ids)

    def __len__(self) -> int:
        return len(self.ages)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": image_item(self.images[i], self.decode),
            "label": torch.tensor(self.ages[i], dtype=torch.float32),
            "features": torch.from_numpy(self.features[i]),
            "subject_id": self.subject_ids[i],
            "id": self.subject_ids[i],  # the stable per-sample key every datamodule gives (per-sample training state)
        }


def select_subjects(subject_ids: Sequence[str], max_subjects: int | None) -> np.ndarray:
    """Indices (sorted) of a deterministic, seed-independent subset of ``max_subjects`` subjects."""
    if max_subjects is None or max_subjects >= len(subject_ids):
        return np.arange(len(subject_ids))
    order = sorted(range(len(subject_ids)), key=lambda i: stable_seed("brainage-subset", subject_ids[i]))
    return np.sort(order[:max_subjects])


def split_subjects(ages: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per subject, stratified by age.

    Subjects are visited from youngest to oldest in blocks of ten (shuffled within a block), each going
    to the split furthest below its share so far: every split spans the age range, and the counts
    match the fractions to within a subject.
    """
    rng = np.random.default_rng(stable_seed("brainage-split", seed))
    by_age = np.argsort(ages, kind="stable")
    order = np.concatenate([rng.permutation(by_age[i : i + 10]) for i in range(0, len(by_age), 10)])
    fractions = np.asarray(fractions, dtype=np.float64)
    assignment, filled = np.full(len(ages), -1), np.zeros(3)
    for seen, i in enumerate(order, start=1):
        deficit = np.where(fractions > 0, fractions * seen - filled, -np.inf)
        k = int(np.argmax(deficit))
        assignment[i], filled[k] = k, filled[k] + 1
    return assignment


class BrainAgeDataModule(SplitDataModule):
    """Age regression from T1 brain MRI, phantom or NIfTI, with regional volumes as side features.

    Args:
        source: ``"phantom"`` (synthetic, default) or ``"nifti"`` (a participants table and its volumes).
        root: phantom: folder for the generated cache (default ``data_cache/brainage``); nifti: where
            relative image paths are looked up first (then next to the table).
        cache_dir: where caches go (the config: ``${paths.data_dir}/brainage``, moved by ``MEDROBUST_DATA_DIR``;
            a nifti cache's name hashes its files' resolved paths, so two data roots never share one); default
            ``root`` for phantom, ``$XDG_CACHE_HOME/medrobust/brainage`` (``~/.cache/...``) for nifti.
        csv: nifti: the participants table (``.csv`` or ``.tsv``), a relative path being relative to ``root``;
            default ``root/participants.csv`` (or ``.tsv``). Columns: see :mod:`medrobust.data.brain_nifti`.
        image_size: voxels per side of the cubic image.
        num_subjects: phantom: how many subjects to draw.
        age_range: phantom: ``(low, high)`` years; ages are uniform in it.
        split: train / val / test fractions of subjects (age-stratified).
        seed: phantom drawing, split and augmentation.
        batch_size, num_workers: of the dataloaders.
        max_subjects: use a deterministic, seed-independent subset of this many subjects (tests, quick runs).
        augment: random left-right flips of training batches (brains are nearly symmetric).
        feature_columns: nifti: the table's regional-volume columns; null: every numeric column other
            than id, age and path; ``[]``: none.
        intensity_percentiles: nifti: ``(low, high)`` percentiles of each volume mapped to 0 and 1.
        spacing_mm: nifti: isotropic voxel size (mm) before padding / cropping to ``image_size``; null:
            each volume's whole field of view fitted into the cube.

    ``intensity`` maps native units to model units: phantom a.u. ``[0, 1000] -> [0, 1]``; None for nifti,
    whose volumes are normalised each by its own percentiles (no common native scale; use eps in
    ``model`` or ``range`` units). ``age_mean`` / ``age_std`` and ``features_mean`` / ``features_std``
    are the training split's, set in :meth:`setup`.
    """

    augment_name = "brainage-augment"

    def __init__(
        self,
        source: str = "phantom",
        root: str | None = None,
        cache_dir: str | None = None,
        csv: str | None = None,
        image_size: int = 32,
        num_subjects: int = 400,
        age_range: Sequence[float] = (20.0, 90.0),
        split: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        max_subjects: int | None = None,
        augment: bool = True,
        feature_columns: Sequence[str] | None = None,
        intensity_percentiles: Sequence[float] = (0.5, 99.5),
        spacing_mm: float | None = None,
    ):
        super().__init__()
        check_choice("source", source, SOURCES)
        check_int("image_size", image_size, 8)
        check_int("num_subjects", num_subjects, 3)
        for key, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("seed", seed, 0)):
            check_int(key, value, minimum)
        if max_subjects is not None:
            check_int("max_subjects", max_subjects, 3)
        age_range = check_floats("age_range", age_range, 2)
        if not 0 <= age_range[0] < age_range[1] <= 150:
            raise ValueError(f"data.age_range must be (low, high) years with 0 <= low < high <= 150, "
                             f"got {list(age_range)}")  # fmt: skip
        split = check_split(split)
        percentiles = check_floats("intensity_percentiles", intensity_percentiles, 2)
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"data.intensity_percentiles must be (low, high) with 0 <= low < high <= 100, "
                             f"got {list(percentiles)}")  # fmt: skip
        if spacing_mm is not None and not (isinstance(spacing_mm, (int, float)) and 0.1 <= spacing_mm <= 20):
            raise ValueError(f"data.spacing_mm must be null or a number in [0.1, 20] mm, got {spacing_mm!r}")
        check_bool("augment", augment)
        if feature_columns is not None and (isinstance(feature_columns, str) or
                                            not all(isinstance(c, str) for c in feature_columns)):  # fmt: skip
            raise ValueError(f"data.feature_columns must be null or a list of column names, got {feature_columns!r}")
        self.save_hyperparameters(logger=False)

        self.source, self.image_size, self.num_subjects = source, int(image_size), int(num_subjects)
        self.age_range, self.split, self.seed, self.max_subjects = age_range, split, int(seed), max_subjects
        self.batch_size, self.num_workers, self.augment = int(batch_size), int(num_workers), augment
        self.percentiles, self.spacing_mm = percentiles, None if spacing_mm is None else float(spacing_mm)
        self.root = str(root) if root is not None else os.path.join("data_cache", "brainage")
        self.cache_dir = str(cache_dir) if cache_dir is not None else default_cache_dir(source, self.root, "brainage")
        self.input_bounds, self.in_channels, self.spatial_dims = (0.0, 1.0), 1, 3
        self.table = None
        if source == "phantom":
            from medrobust.data.brain_phantom import FEATURE_NAMES, NATIVE_WINDOW

            self.intensity, self.feature_names = NATIVE_WINDOW, list(FEATURE_NAMES)
        else:
            from medrobust.data.brain_nifti import participants_table_path, read_participants

            if root is not None and not os.path.isdir(root):
                raise FileNotFoundError(f"data.root: {str(root)!r} does not exist or is not a folder")
            csv_path = participants_table_path(csv, root)
            self.table = read_participants(csv_path, root, None if feature_columns is None else list(feature_columns))
            self.intensity, self.feature_names = None, list(self.table.feature_names)
        self.num_features = len(self.feature_names)
        self.age_mean = self.age_std = self.features_mean = self.features_std = None
        self.split_counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------------ caching
    def _subject_ids(self) -> list[str]:
        """All subjects of the source, before ``max_subjects``."""
        if self.source == "phantom":
            return [f"sub-{i:05d}" for i in range(self.num_subjects)]
        return self.table.subject_ids

    def _chosen(self) -> np.ndarray:
        return select_subjects(self._subject_ids(), self.max_subjects)

    def _settings(self) -> dict:
        """Everything the cached images depend on."""
        if self.source == "phantom":
            return dict(kind="brainage_phantom", version=PHANTOM_VERSION, atlas_version=ATLAS_VERSION, seed=self.seed,
                        image_size=self.image_size, age_range=self.age_range, num_subjects=self.num_subjects,
                        max_subjects=self.max_subjects)  # fmt: skip
        chosen = self._chosen()
        return dict(kind="brainage_nifti", version=NIFTI_VERSION, image_size=self.image_size,
                    spacing_mm=self.spacing_mm, percentiles=self.percentiles,
                    subjects=[self.table.subject_ids[i] for i in chosen],
                    files=[self._fingerprint(i) for i in chosen])  # fmt: skip

    def _fingerprint(self, i: int) -> dict:
        """Subject ``i``'s image fingerprint; a file gone or unreadable since the table was read names the subject."""
        try:
            return file_fingerprint(self.table.paths[i])
        except OSError as exc:
            raise FileNotFoundError(f"{self.table.csv_path} (subject {self.table.subject_ids[i]!r}): image "
                                    f"{str(self.table.paths[i])!r} cannot be read ({exc.strerror or exc}); expected "
                                    "a NIfTI file") from exc  # fmt: skip

    def cache_path(self) -> Path:
        """The image cache of the current settings (``brainage_<source>_<hash>.npz`` + ``.json``)."""
        return Path(self.cache_dir) / f"brainage_{self.source}_{settings_key(self._settings())}.npz"

    def _build(self) -> dict[str, np.ndarray]:
        """Draw (phantom) or read (nifti) the chosen subjects' images and write the cache."""
        chosen, ids = self._chosen(), self._subject_ids()
        if self.source == "phantom":
            from medrobust.data.brain_phantom import generate_subjects

            arrays = generate_subjects([ids[i] for i in chosen], self.seed, self.image_size, self.age_range,
                                       atlas_dir=self.cache_dir)  # fmt: skip
        else:
            from medrobust.data.brain_nifti import read_volumes

            volumes = read_volumes([self.table.paths[i] for i in chosen], self.image_size, self.spacing_mm,
                                   self.percentiles)  # fmt: skip
            arrays = {"images": np.rint(STORED_UNIT.to_native(volumes)).astype(np.uint16),
                      "subject_ids": np.asarray([ids[i] for i in chosen], dtype=str)}  # fmt: skip
        return self._write_cache(arrays, n_subjects=len(chosen))

    # ------------------------------------------------------------------------------------ setup
    def _assign(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Age-stratified subjects (:func:`split_subjects`); sets the training split's age and feature statistics."""
        if self.source == "nifti":  # ages and volumes from the table, which may have been corrected since caching
            arrays.update(ages=self.table.ages[self._chosen()], volumes_ml=self.table.volumes[self._chosen()])
        ages, volumes = arrays["ages"], arrays["volumes_ml"]
        assign = split_subjects(ages, self.split, self.seed)
        self.split_counts = {name: int((assign == k).sum()) for k, name in enumerate(SPLITS)}
        check_split_counts(self.split_counts, self.split, "subjects", "raise data.num_subjects / data.max_subjects")
        train = assign == 0
        self.age_mean, self.age_std = float(ages[train].mean()), float(max(ages[train].std(), 1e-6))
        self.features_mean = volumes[train].mean(axis=0).astype(np.float32)
        std = volumes[train].std(axis=0)
        self.features_std = np.where(std > 0, std, 1.0).astype(np.float32)  # a constant column stays 0
        return assign

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        decode = self.intensity if self.source == "phantom" else STORED_UNIT
        label_maps = arrays["label_maps"][idx] if "label_maps" in arrays else None  # phantom only
        return BrainAgeDataset(arrays["images"][idx], arrays["ages"][idx], arrays["volumes_ml"][idx],
                               arrays["subject_ids"][idx].tolist(), decode, self.features_mean, self.features_std,
                               label_maps)  # fmt: skip

    def _log_setup(self) -> None:
        sets = (self.data_train, self.data_val, self.data_test)
        log.info(
            "brain age %s (%d^3): %s subjects; age mean %.1f, sd %.1f years (train); %d features %s",
            self.source, self.image_size,
            ", ".join(f"{name} {n} (ages {_age_span(s)})" for (name, n), s in zip(self.split_counts.items(), sets)),
            self.age_mean, self.age_std, self.num_features, self.feature_names,
        )  # fmt: skip

    def draw_spatial(self, images: torch.Tensor, generator: torch.Generator) -> FlipRot90:
        """Left-right flips (X, RAS) only: brains are nearly symmetric, up-down ones are not."""
        return draw_flip_rot90(images.shape[0], images.dim() - 2, generator, axes=(0,), rotate=False)


def flip_left_right(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample of ``(B, C, X, Y, Z)`` (RAS: X is left -> right) along X with probability 1/2."""
    return draw_flip_rot90(images.shape[0], images.dim() - 2, generator, axes=(0,), rotate=False)(images)


def _age_span(dataset: BrainAgeDataset) -> str:
    return f"{dataset.ages.min():.0f}-{dataset.ages.max():.0f}" if len(dataset) else "-"