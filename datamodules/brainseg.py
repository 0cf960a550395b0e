"""Brain tissue segmentation (background, CSF, ventricles, grey matter, white matter) on the brain phantom.

The subjects are the brain-age phantom's (:mod:`medrobust.data.brain_phantom`: the MNI152 template deformed
per subject, with age effects, contrast, bias field, Rician noise and partial volume), drawn once per setting
and cached under ``root``; the label maps the images were rendered from are the ground truth.

* ``spatial_dims=2`` (default): ``slices_per_subject`` axial slices per subject, evenly spaced through the part
  of the head where the intracranial area is at least half its largest (every slice shows brain);
* ``spatial_dims=3``: the whole volume.

Splits are by subject (age-stratified, as for brain age): a subject's slices never land in two splits.
Batches are dicts::

    {"image": float32 (B, 1, *spatial) in [0, 1], RAS voxel order (X: left -> right; 2-D: (X, Y)),
     "label": int64 (B, *spatial) values indexing ``class_names``,
     "id": list[str] "sub-00007/z031" (2-D) or "sub-00007" (3-D), stable across runs and splits,
     "subject_id": list[str],
     "spacing": float32 (B, spatial_dims) voxel size in mm}
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
from medrobust.data.brain_phantom import NATIVE_WINDOW, TISSUE_LABELS, generate_subjects, image_spacing_mm
from medrobust.data.intensity import IntensityWindow
from medrobust.data.patches import settings_key
from medrobust.datamodules.augment import FlipRot90, draw_flip_rot90
from medrobust.datamodules.base import SPLITS, SplitDataModule, check_bool, check_floats, image_item
from medrobust.datamodules.base import check_int, check_spatial_dims, check_split, check_split_counts
from medrobust.datamodules.brainage import split_subjects

log = logging.getLogger("medrobust")

PHANTOM_VERSION = 1  # bump when the slicing or the phantom changes, so old caches miss
DEFAULT_IMAGE_SIZE = {2: 64, 3: 40}  # voxels per side: a 2-D slice, a 3-D volume (sized for a 2-core CPU)
DEFAULT_BATCH_SIZE = {2: 32, 3: 4}  # comparable voxels per batch


class BrainSegDataset(Dataset):
    """Samples of one split. ``images`` uint16 native a.u. ``(N, *spatial)``, mapped to [0, 1] per item through
    ``intensity``; ``labels`` uint8 ``(N, *spatial)``; ``ids`` / ``subject_ids`` ``N`` strings."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, ids: Sequence[str], subject_ids: Sequence[str],
                 intensity: IntensityWindow, spacing_mm: float):  # fmt: skip
        self.images, self.labels, self.intensity = images, labels, intensity
        self.ids, self.subject_ids = list(ids), list(subject_ids)
        self.spacing = torch.full((images.ndim - 1,), float(spacing_mm), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": image_item(self.images[i], self.intensity),
            "label": torch.from_numpy(self.labels[i].astype(np.int64)),
            "id": self.ids[i],
            "subject_id": self.subject_ids[i],
            "spacing": self.spacing,
        }

    def class_voxels(self, num_classes: int) -> list[int]:
        """Voxels per class over the split."""
        return np.bincount(self.labels.ravel(), minlength=num_classes).tolist()


def axial_slices(label_map: np.ndarray, n: int) -> np.ndarray:
    """``n`` axial (z) indices of a ``(X, Y, Z)`` label map, evenly spaced over the slices whose intracranial
    area (label > 0) is at least half the largest; fewer distinct slices than ``n`` there raises."""
    area = (label_map > 0).sum(axis=(0, 1))
    inside = np.flatnonzero(area >= 0.5 * area.max())
    z = np.unique(np.rint(np.linspace(inside[0], inside[-1], n)).astype(int))
    if len(z) < n:
        raise ValueError(f"data.slices_per_subject={n}: only {inside[-1] - inside[0] + 1} axial slices cross the "
                         f"brain at this data.image_size ({label_map.shape[0]}); lower it or raise the image size")
    return z


class BrainSegDataModule(SplitDataModule):
    """Brain tissue segmentation from the brain phantom, 2-D axial slices or 3-D volumes.

    Args:
        root: folder of the generated cache (default ``data_cache/brainseg``); the MNI152 atlas is cached there too.
        spatial_dims: 2 (axial slices, default) or 3 (volumes).
        image_size: voxels per side; null: 64 for 2-D, 40 for 3-D. The field of view is fixed (200 mm), so the
            voxel size is ``200 / image_size`` mm.
        slices_per_subject: 2-D: axial slices taken from each subject.
        num_subjects: subjects to draw.
        age_range: ``(low, high)`` years; ages are uniform in it (older brains: larger ventricles, thinner cortex).
        split: train / val / test fractions of subjects.
        seed: phantom drawing and split.
        batch_size: null: 32 for 2-D, 4 for 3-D; num_workers: of the dataloaders.
        augment: random left-right flips of training batches, the label maps flipped with their images.

    ``intensity`` maps native a.u. ``[0, 1000]`` to ``[0, 1]``; ``num_classes`` / ``class_names`` are the
    phantom's tissue labels (label value = index).
    """

    augment_name = "brainseg-augment"
    mask_keys = ("label",)  # flipped with the image

    def __init__(
        self,
        root: str | None = None,
        spatial_dims: int = 2,
        image_size: int | None = None,
        slices_per_subject: int = 8,
        num_subjects: int = 100,
        age_range: Sequence[float] = (20.0, 90.0),
        split: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        batch_size: int | None = None,
        num_workers: int = 0,
        augment: bool = True,
    ):
        super().__init__()
        check_spatial_dims(spatial_dims)
        image_size = DEFAULT_IMAGE_SIZE[spatial_dims] if image_size is None else image_size
        batch_size = DEFAULT_BATCH_SIZE[spatial_dims] if batch_size is None else batch_size
        for key, value, minimum in (("image_size", image_size, 8), ("slices_per_subject", slices_per_subject, 1),
                                    ("num_subjects", num_subjects, 3), ("batch_size", batch_size, 1),
                                    ("num_workers", num_workers, 0), ("seed", seed, 0)):  # fmt: skip
            check_int(key, value, minimum)
        age_range = check_floats("age_range", age_range, 2)
        if not 0 <= age_range[0] < age_range[1] <= 150:
            raise ValueError(f"data.age_range must be (low, high) years with 0 <= low < high <= 150, "
                             f"got {list(age_range)}")  # fmt: skip
        split = check_split(split)
        check_bool("augment", augment)
        self.save_hyperparameters(logger=False)

        self.spatial_dims, self.image_size = int(spatial_dims), int(image_size)
        self.slices_per_subject = int(slices_per_subject)
        self.num_subjects, self.age_range, self.split, self.seed = int(num_subjects), age_range, split, int(seed)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.augment = augment
        self.root = self.cache_dir = str(root) if root is not None else os.path.join("data_cache", "brainseg")
        self.intensity, self.input_bounds, self.in_channels = NATIVE_WINDOW, NATIVE_WINDOW.bounds, 1
        self.class_names, self.num_classes = list(TISSUE_LABELS), len(TISSUE_LABELS)
        self.spacing_mm = image_spacing_mm(self.image_size)
        self.split_counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------------ caching
    def _settings(self) -> dict:
        """Everything the cached samples depend on."""
        return dict(kind="brainseg_phantom", version=PHANTOM_VERSION, atlas_version=ATLAS_VERSION, seed=self.seed,
                    spatial_dims=self.spatial_dims, image_size=self.image_size, num_subjects=self.num_subjects,
                    slices_per_subject=self.slices_per_subject if self.spatial_dims == 2 else None,
                    age_range=self.age_range)  # fmt: skip

    def cache_path(self) -> Path:
        """The sample cache of the current settings (``brainseg_<hash>.npz`` + ``.json``)."""
        return Path(self.cache_dir) / f"brainseg_{settings_key(self._settings())}.npz"

    def _build(self) -> dict[str, np.ndarray]:
        """Draw the subjects (progress bar), cut 2-D slices, write the cache. Arrays: ``images`` uint16 and
        ``labels`` uint8 ``(N, *spatial)``, per sample ``ids``, ``subject_ids`` and ``ages``."""
        ids = [f"sub-{i:05d}" for i in range(self.num_subjects)]
        drawn = generate_subjects(ids, self.seed, self.image_size, self.age_range, atlas_dir=self.cache_dir)
        if self.spatial_dims == 3:
            arrays = {"images": drawn["images"], "labels": drawn["label_maps"], "ids": np.asarray(ids),
                      "subject_ids": np.asarray(ids), "ages": drawn["ages"]}  # fmt: skip
        else:
            n = self.slices_per_subject
            picks = [(s, z) for s in range(len(ids)) for z in axial_slices(drawn["label_maps"][s], n)]
            arrays = {"images": np.stack([drawn["images"][s, :, :, z] for s, z in picks]),
                      "labels": np.stack([drawn["label_maps"][s, :, :, z] for s, z in picks]),
                      "ids": np.asarray([f"{ids[s]}/z{z:03d}" for s, z in picks]),
                      "subject_ids": np.asarray([ids[s] for s, _ in picks]),
                      "ages": drawn["ages"][[s for s, _ in picks]]}  # fmt: skip
        return self._write_cache(arrays, n_samples=len(arrays["ids"]))

    # ------------------------------------------------------------------------------------ setup
    def _assign(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """By subject, age-stratified (:func:`~medrobust.datamodules.brainage.split_subjects`): a subject's slices
        share a split."""
        sample_subjects = arrays["subject_ids"].astype(str)
        subjects, first = np.unique(sample_subjects, return_index=True)
        assign = split_subjects(arrays["ages"][first], self.split, self.seed)  # per subject
        self.split_counts = {name: int((assign == k).sum()) for k, name in enumerate(SPLITS)}
        check_split_counts(self.split_counts, self.split, "subjects", "raise data.num_subjects")
        split_of = dict(zip(subjects, assign))
        return np.array([split_of[s] for s in sample_subjects])

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        ids, subjects = arrays["ids"][idx].tolist(), arrays["subject_ids"][idx].astype(str).tolist()
        return BrainSegDataset(arrays["images"][idx], arrays["labels"][idx], ids, subjects, self.intensity,
                               self.spacing_mm)  # fmt: skip

    def _log_setup(self) -> None:
        sets = (self.data_train, self.data_val, self.data_test)
        log.info("brain segmentation %d-D (%d px a side, %.2f mm): subjects %s; samples %s; voxels per class "
                 "(train) %s",
                 self.spatial_dims, self.image_size, self.spacing_mm, self.split_counts,
                 {name: len(s) for name, s in zip(SPLITS, sets)},
                 dict(zip(self.class_names, self.data_train.class_voxels(self.num_classes))))  # fmt: skip

    def draw_spatial(self, images: torch.Tensor, generator: torch.Generator) -> FlipRot90:
        """Left-right flips (X, the first spatial axis in 2-D and 3-D): brains are nearly symmetric; the tissue
        classes are not lateralised, so a flipped label map stays valid."""
        return draw_flip_rot90(images.shape[0], images.dim() - 2, generator, axes=(0,), rotate=False)
