"""LIDC nodule outlines for shape reconstruction (seed 002): every nodule's 2-D patch with its consensus outline as
``K`` points and its mask, and the seed's PCA shape augmentation.

The patches and consensus masks are :class:`~medrobust.datamodules.lidc_seg.LIDCSegDataModule`'s (same cache).
The outline is the consensus mask's iso-contour resampled to ``num_points`` points evenly by arc length, from the
top of the outline above its centroid, counter-clockwise on screen (:func:`medrobust.data.shape_outline.outline_points`). Batches::

    {"image": float32 (B, 1, H, W) in [0, 1], "points": float32 (B, K, 2) pixel coordinates (row, col),
     "mask": int64 (B, H, W) consensus, "reader_masks", "n_readers", "reader_agreement", "spacing": (B, 2) mm,
     "id", "patient_id"}

Training batches are flipped and turned (the outline recomputed from the moved mask, so its start and direction
keep their rule); with ``shape_modes > 0``, a fraction ``shape_prob`` of them then takes a new outline drawn from a
PCA of the training outlines (``shape_modes`` modes, coefficients uniform in ``[-shape_limit, shape_limit]``
standard deviations, at the nodule's centroid), and the image and mask are warped onto it by a thin-plate spline.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from medrobust.data.shape_outline import outline_points
from medrobust.data.shape_pca import ShapeModel
from medrobust.data.shape_warp import warp_image_and_mask
from medrobust.datamodules.base import check_int
from medrobust.datamodules.lidc_seg import LIDCSegDataModule, LIDCSegDataset

log = logging.getLogger("medrobust")


class LIDCShapeDataset(LIDCSegDataset):
    """:class:`LIDCSegDataset` items with the consensus as ``mask`` and its outline ``points`` ``(K, 2)``."""

    def __init__(self, arrays: dict[str, np.ndarray], intensity, spacing_mm: float, points: np.ndarray):
        super().__init__(arrays, intensity, spacing_mm)
        self.points = points

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        item["mask"] = item.pop("label")
        item["points"] = torch.from_numpy(self.points[i])
        return item


class LIDCShapeDataModule(LIDCSegDataModule):
    """LIDC nodule outlines and masks, 2-D; PCA shape augmentation with ``shape_modes > 0``.

    Args are :class:`~medrobust.datamodules.lidc_seg.LIDCSegDataModule`'s (``spatial_dims`` must be 2), and:
        num_points: ``K``, the outline's points (64; the seed paper used 176).
        shape_modes: PCA modes of the shape augmentation (0: off), at most the modes the training outlines have.
        shape_limit: the modes' coefficients are uniform in ``[-shape_limit, shape_limit]`` standard deviations.
        shape_prob: the fraction of training samples given a new outline (the rest keep their own).

    Nodules whose consensus is empty on their central slice (fewer than half the readers' masks reach it) have no
    outline: they are left out and named in the log. After ``setup``, ``shape_model`` is the training outlines' PCA.
    """

    augment_name = "lidc-shape-augment"
    mask_keys = ("mask", "reader_masks")

    def __init__(self, *, num_points: int = 64, shape_modes: int = 0, shape_limit: float = 2.0,
                 shape_prob: float = 0.5, spatial_dims: int = 2, **kwargs):
        if spatial_dims != 2:
            raise ValueError(f"task=lidc_shape reconstructs 2-D outlines: data.spatial_dims must be 2, got "
                             f"{spatial_dims!r}")
        check_int("num_points", num_points, 3)
        check_int("shape_modes", shape_modes, 0)
        for key, value, low in (("shape_limit", shape_limit, 0.0), ("shape_prob", shape_prob, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise ValueError(f"data.{key} must be a number > {low:g}, got {value!r}")
        if shape_prob > 1:
            raise ValueError(f"data.shape_prob must be a fraction in (0, 1], got {shape_prob!r}")
        super().__init__(spatial_dims=spatial_dims, **kwargs)
        self.num_points, self.shape_modes = int(num_points), int(shape_modes)
        self.shape_limit, self.shape_prob = float(shape_limit), float(shape_prob)
        self.shape_model: ShapeModel | None = None
        self.left_out: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        super().setup(stage)
        self.shape_model = ShapeModel.fit(self.data_train.points)
        available = len(self.shape_model.sd)
        if self.shape_modes > available:
            raise ValueError(f"data.shape_modes={self.shape_modes} but the {len(self.data_train)} training outlines "
                             f"give {available} modes")

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        has_outline = np.array([arrays["labels"][i].any() for i in idx], dtype=bool)
        self.left_out[split] = [str(arrays["nodule_ids"][i]) for i in idx[~has_outline]]
        if self.left_out[split]:
            log.warning("lidc_shape: %d nodules of the %s split have an empty consensus on their central slice, so no "
                        "outline, and are left out: %s", len(self.left_out[split]), split,
                        ", ".join(self.left_out[split]))
        idx = idx[has_outline]
        points = np.stack([outline_points(arrays["labels"][i], self.num_points) for i in idx]).astype(np.float32)
        dataset = LIDCShapeDataset({key: v[idx] for key, v in arrays.items()}, self.intensity, self.spacing_mm, points)
        self.split_counts[split], self.reader_agreement[split] = len(idx), dataset.agreement()
        return dataset

    # -- augmentation: flips and turns (base), then a new outline from the shape model -----------
    def augment_batch(self, batch: dict, generator: torch.Generator) -> dict:
        out = super().augment_batch(batch, generator)
        masks = out["mask"].cpu().numpy()
        points = np.stack([outline_points(m, self.num_points) for m in masks])
        if self.shape_modes > 0:
            images = out["image"].cpu().numpy().copy()
            chosen = (torch.rand(len(masks), generator=generator) < self.shape_prob).tolist()
            seeds = torch.randint(0, 2**31 - 1, (len(masks),), generator=generator).tolist()
            for i in np.flatnonzero(chosen):
                rng = np.random.default_rng(seeds[i])
                target = points[i].mean(axis=0) + self.shape_model.sample(self.shape_modes, rng, self.shape_limit)
                images[i, 0], masks[i] = warp_image_and_mask(images[i, 0], masks[i], points[i], target)
                points[i] = target
            out["image"] = torch.from_numpy(images).to(out["image"])
            out["mask"] = torch.from_numpy(masks).to(out["mask"])
        out["points"] = torch.from_numpy(points.astype(np.float32)).to(out["image"].device)
        return out

    def _log_setup(self) -> None:
        super()._log_setup()
        log.info("LIDC outlines: %d points each; shape augmentation %s", self.num_points,
                 f"{self.shape_modes} PCA modes, coefficients in +-{self.shape_limit:g} sd, p={self.shape_prob:g}"
                 if self.shape_modes else "off")
