"""LIDC-IDRI nodule segmentation: every nodule's patch with the mask each reader drew and their consensus.

The patches are those of :class:`medrobust.datamodules.lidc.LIDCDataModule` (phantom CT around the real nodule
shapes, or the real DICOM scans), with every nodule kept -- small ones and those rated indeterminate too. The
masks come from the readers' contours in the annotation DB (:mod:`medrobust.data.reader_masks`), on the same
grid. Batches are dicts::

    {"image": float32 (B, 1, *spatial) in [0, 1], "label": int64 (B, *spatial) consensus (0 background, 1 nodule),
     "reader_masks": bool (B, 4, *spatial) (readers past "n_readers" are empty), "n_readers": int64 (B,),
     "reader_agreement": float32 (B,) (mean pairwise Dice of the readers, NaN for one reader),
     "spacing": float32 (B, spatial_dims) mm, "id": list[str] (nodule), "patient_id": list[str]}

``reader_agreement`` on the datamodule is the human baseline per split: the readers' mean pairwise Dice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medrobust.data.intensity import IntensityWindow
from medrobust.data.lidc_annotations import nodule_label
from medrobust.data.reader_masks import consensus, nodule_reader_masks, pairwise_dice
from medrobust.datamodules.base import SPLITS, image_item
from medrobust.datamodules.lidc import LIDCDataModule

log = logging.getLogger("medrobust")

READER_MASKS_VERSION = 1  # bump when the reader masks' rasterization or consensus changes, so old caches miss
STRATUM_RULE = "median_gt3_keep3"  # splits and subsets stay balanced for malignancy; no nodule is excluded


class LIDCSegDataset(Dataset):
    """Nodule patches of one split with their masks. ``images``: int16 HU ``(N, *spatial)``; ``labels`` uint8
    consensus ``(N, *spatial)``; ``reader_masks`` ``(N, 4, *spatial)`` packed bits (``np.packbits`` on the last axis);
    windowed and unpacked per item."""

    def __init__(self, arrays: dict[str, np.ndarray], intensity: IntensityWindow, spacing_mm: float):
        self.arrays, self.intensity = arrays, intensity
        self.spacing = torch.full((arrays["images"].ndim - 1,), spacing_mm, dtype=torch.float32)
        self.width = arrays["images"].shape[-1]

    def __len__(self) -> int:
        return len(self.arrays["images"])

    def __getitem__(self, i: int) -> dict:
        a = self.arrays
        return {
            "image": image_item(a["images"][i], self.intensity),
            "label": torch.from_numpy(a["labels"][i].astype(np.int64)),
            "reader_masks": torch.from_numpy(np.unpackbits(a["reader_masks"][i], axis=-1, count=self.width).view(bool)),
            "n_readers": torch.tensor(a["n_readers"][i], dtype=torch.int64),
            "reader_agreement": torch.tensor(a["reader_agreement"][i], dtype=torch.float32),
            "spacing": self.spacing,
            "id": str(a["nodule_ids"][i]),
            "patient_id": str(a["patient_ids"][i]),
        }

    def agreement(self) -> float:
        """The readers' mean pairwise Dice over the nodules with two or more readers (NaN when there are none)."""
        values = self.arrays["reader_agreement"]
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else float("nan")


class LIDCSegDataModule(LIDCDataModule):
    """LIDC nodule masks as 2-D slices or 3-D patches, phantom or DICOM; two classes: background, nodule.

    Args are :class:`~medrobust.datamodules.lidc.LIDCDataModule`'s, without ``label_rule``: every nodule is kept.
    After ``setup``, ``reader_agreement[split]`` is the readers' mean pairwise Dice on that split (the human
    baseline for the model's Dice) and ``split_counts[split]`` the number of nodules.
    """

    augment_name = "lidc-seg-augment"
    mask_keys = ("label", "reader_masks")  # flipped / rotated with the image
    stratum_key = "malignant"

    def __init__(
        self,
        source: str = "phantom",
        root: str | None = None,
        cache_dir: str | None = None,
        annotation_db: str | None = None,
        spatial_dims: int = 2,
        patch_size: int = 48,
        spacing_mm: float = 1.0,
        hu_window: Sequence[float] = (-1000.0, 400.0),
        split: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        max_nodules: int | None = None,
        augment: bool = True,
    ):
        super().__init__(
            source=source, root=root, cache_dir=cache_dir, annotation_db=annotation_db, spatial_dims=spatial_dims,
            patch_size=patch_size, spacing_mm=spacing_mm, hu_window=hu_window, label_rule=STRATUM_RULE,
            split=split, seed=seed, batch_size=batch_size, num_workers=num_workers, max_nodules=max_nodules,
            augment=augment,
        )  # fmt: skip
        self.num_classes, self.class_names = 2, ["background", "nodule"]
        self.reader_agreement: dict[str, float] = {}

    def summary_notes(self, split: str) -> list[str]:
        if split not in self.reader_agreement:
            return []
        return [f"Readers' agreement on the {split} split (mean pairwise Dice of the LIDC readers' masks, the human "
                f"baseline for the clean Dice): {self.reader_agreement[split]:.4f}"]

    # ------------------------------------------------------------------------------------ caching
    def _compute_settings(self) -> dict:
        return {**super()._compute_settings(), "kind": "lidc_seg_patches", "reader_masks": READER_MASKS_VERSION}

    def cache_path(self) -> Path:
        return super().cache_path().with_name(super().cache_path().name.replace("lidc_", "lidc_seg_", 1))

    def _build(self) -> dict[str, np.ndarray]:
        """Every nodule's patch, its readers' masks, their consensus and agreement; writes the cache."""
        nodules, images = self._patches(self._nodules(STRATUM_RULE))  # the rule keeps every nodule
        masks, counts = nodule_reader_masks(self._db(), nodules, self.spatial_dims, self.patch_size, self.spacing_mm)
        arrays = {
            "images": images,
            "labels": np.stack([consensus(m[:c]) for m, c in zip(masks, counts)]).astype(np.uint8),
            "reader_masks": np.packbits(masks, axis=-1),  # 8 voxels a byte: the 3-D cache stays the size of the images
            "n_readers": counts,
            "reader_agreement": np.array([pairwise_dice(m[:c]) for m, c in zip(masks, counts)]),
            "malignant": np.array([nodule_label(n.median_malignancy, STRATUM_RULE) for n in nodules], dtype=np.int64),
            "patient_ids": np.array([n.patient_id for n in nodules]),
            "nodule_ids": np.array([n.nodule_id for n in nodules]),
            "diameter_mm": np.array([n.diameter_mm for n in nodules]),
        }
        return self._write_cache(arrays, n_nodules=len(nodules))

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        dataset = LIDCSegDataset({key: v[idx] for key, v in arrays.items()}, self.intensity, self.spacing_mm)
        self.split_counts[split], self.reader_agreement[split] = len(idx), dataset.agreement()
        return dataset

    def _log_setup(self) -> None:
        log.info(
            "LIDC nodule masks, %s %d-D (%d px at %.2g mm): %s",
            self.source, self.spatial_dims, self.patch_size, self.spacing_mm,
            "; ".join(f"{n} {self.split_counts[n]} (readers' Dice {self.reader_agreement[n]:.3f})" for n in SPLITS),
        )  # fmt: skip
