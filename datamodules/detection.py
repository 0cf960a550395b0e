"""What every detection datamodule shares: padded box batches, boxes moved with flipped and turned images, and the
loaders that collate them (also the DDP evaluation shards).

A detection batch (``d`` spatial dims, ``N`` the largest box count in the batch, at least 1, so no tensor is empty)::

    {"image": (B, C, *S), "boxes": float32 (B, N, 2d) MONAI StandardMode in pixels of the image's axis order,
     "labels": int64 (B, N) padding -1, "box_valid": bool (B, N), "box_target": bool (B, N) (False: an irrelevant
     finding, or padding), "id", "patient_id": list[str], "spacing": float32 (B, d)}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medrobust.data.intensity import IntensityWindow

from medrobust.datamodules.augment import FlipRot90
from medrobust.datamodules.base import EpochShuffle, SplitDataModule
from medrobust.datamodules.sharding import Collated, ShardSampler, shard_batches

PAD_LABEL = -1  # the label of a padding row: an index no class has, so a forgotten box_valid fails loudly


# --------------------------------------------------------------------------------- items
class CachedDetectionDataset(Dataset):
    """The samples ``idx`` of a detection cache's arrays: ``images``, ``ids``, and every sample's boxes
    concatenated (sample ``j`` owns rows ``box_offsets[j]:box_offsets[j + 1]`` of ``boxes``). An item: ``image``
    ``(C, *S)`` in model units, its ``k`` boxes ``(k, 2d)``, ``labels`` ``(k,)``, ``box_target`` ``(k,)``, ``id``,
    ``patient_id``, ``spacing`` ``(d,)``; :func:`collate_detection` pads the boxes into a batch. Subclasses say how
    their arrays give the per-source fields (:meth:`image`, :meth:`labels`, ...)."""

    def __init__(self, arrays: dict[str, np.ndarray], idx: np.ndarray, intensity: IntensityWindow):
        self.arrays, self.idx, self.intensity = arrays, np.asarray(idx, dtype=np.int64), intensity

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        a, j = self.arrays, int(self.idx[i])
        rows = slice(int(a["box_offsets"][j]), int(a["box_offsets"][j + 1]))
        return {"image": self.image(j), "boxes": torch.from_numpy(a["boxes"][rows].astype(np.float32)),
                "labels": self.labels(j, rows), "box_target": self.box_target(j, rows), "id": str(a["ids"][j]),
                "patient_id": self.patient_id(j), "spacing": self.spacing(j)}

    def split_boxes(self) -> np.ndarray:
        """``(total boxes,)`` bool: the boxes of this split's samples."""
        per_box = np.repeat(np.arange(len(self.arrays["ids"])), np.diff(self.arrays["box_offsets"]))
        return np.isin(per_box, self.idx)

    def image(self, j: int) -> torch.Tensor:
        raise NotImplementedError

    def labels(self, j: int, rows: slice) -> torch.Tensor:
        raise NotImplementedError

    def box_target(self, j: int, rows: slice) -> torch.Tensor:
        raise NotImplementedError

    def patient_id(self, j: int) -> str:
        raise NotImplementedError

    def spacing(self, j: int) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------------- batches
def collate_detection(items: Sequence[dict]) -> dict:
    """Stack the images and pad every sample's boxes to the batch's largest count (at least 1 row)."""
    counts = [len(item["boxes"]) for item in items]
    n, width = max(1, *counts), items[0]["image"].dim() * 2 - 2  # 2d box coordinates
    boxes = torch.zeros(len(items), n, width, dtype=torch.float32)
    labels = torch.full((len(items), n), PAD_LABEL, dtype=torch.int64)
    box_valid = torch.zeros(len(items), n, dtype=torch.bool)
    box_target = torch.zeros(len(items), n, dtype=torch.bool)
    for b, (item, k) in enumerate(zip(items, counts)):
        boxes[b, :k], labels[b, :k], box_target[b, :k], box_valid[b, :k] = item["boxes"], item["labels"], \
            item["box_target"], True  # fmt: skip
    return {
        "image": torch.stack([item["image"] for item in items]),
        "boxes": boxes,
        "labels": labels,
        "box_valid": box_valid,
        "box_target": box_target,
        "id": [item["id"] for item in items],
        "patient_id": [item["patient_id"] for item in items],
        "spacing": torch.stack([item["spacing"] for item in items]),
    }


class CollatedDetection(Collated):
    """:class:`~medrobust.datamodules.sharding.Collated` with the boxes padded (the DDP evaluation loader)."""

    def __getitem__(self, indices: list[int]) -> dict:
        return collate_detection([self.dataset[i] for i in indices])


# --------------------------------------------------------------------------------- boxes under flips and turns
def flip_boxes(boxes: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    """Boxes ``(..., 2d)`` mirrored along spatial ``axis`` of ``length`` pixels (half-open: ``lo' = L - hi``)."""
    d = boxes.shape[-1] // 2
    out = boxes.clone()
    out[..., axis], out[..., axis + d] = length - boxes[..., axis + d], length - boxes[..., axis]
    return out


def rot90_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes after one ``torch.rot90(x, 1, dims=(-2, -1))`` of an image ``width`` wide: pixel ``(r, c)`` moves to
    ``(width - 1 - c, r)``, so rows become ``[W - c_hi, W - c_lo)`` and columns ``[r_lo, r_hi)``."""
    d = boxes.shape[-1] // 2
    r, c = d - 2, d - 1  # the last two spatial axes turn
    out = boxes.clone()
    out[..., r], out[..., r + d] = width - boxes[..., c + d], width - boxes[..., c]
    out[..., c], out[..., c + d] = boxes[..., r], boxes[..., r + d]
    return out


def move_boxes(boxes: torch.Tensor, spatial: FlipRot90, shape: Sequence[int]) -> torch.Tensor:
    """Boxes ``(B, N, 2d)`` moved as ``spatial`` moves the image of spatial ``shape``: its per-sample flips
    first, then its quarter turns (the order :class:`FlipRot90` applies them)."""
    per_sample = lambda mask: mask.to(boxes.device).reshape(-1, 1, 1)  # noqa: E731
    out = boxes
    for axis, flip in spatial.flips.items():
        out = torch.where(per_sample(flip), flip_boxes(out, axis, shape[axis]), out)
    if spatial.k is None:
        return out
    turned, height, width = out, shape[-2], shape[-1]
    for r in (1, 2, 3):
        turned = rot90_boxes(turned, width)
        height, width = width, height
        out = torch.where(per_sample(spatial.k == r), turned, out)
    return out


class DetectionDataModule(SplitDataModule):
    """A :class:`SplitDataModule` whose batches carry padded boxes (:func:`collate_detection`) and whose training
    augmentation moves the boxes with the image (subclasses say which flips and turns, ``draw_spatial``)."""

    # ------------------------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """The base's loader (same sampler, so the same order) with the boxes padded by :func:`collate_detection`."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        sampler = EpochShuffle(len(dataset), self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=False,
                          num_workers=self.num_workers, collate_fn=collate_detection,
                          persistent_workers=self.num_workers > 0)  # fmt: skip

    def _eval_loader(self, split: str) -> DataLoader:
        """The base's loader, but DDP shards collate with :func:`collate_detection` too."""
        dataset = getattr(self, f"data_{split}")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if world_size == 1 or dataset is None:
            return self._loader(dataset, shuffle=False)
        rank, what = self.trainer.global_rank, f"the {split} split of {type(self).__name__}"
        sampler = ShardSampler(shard_batches(self.eval_batches(dataset), rank, world_size, what), world_size, rank)
        return DataLoader(CollatedDetection(dataset), sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)  # fmt: skip

    def augment_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """The image flipped / turned by one draw per sample and its boxes moved alike (padding rows stay 0)."""
        images = batch["image"]
        spatial = self.draw_spatial(images, generator)
        moved = move_boxes(batch["boxes"], spatial, tuple(images.shape[2:]))
        boxes = torch.where(batch["box_valid"][..., None].to(moved.device), moved, batch["boxes"])
        return {**batch, "image": self.augment_intensity(spatial(images), generator), "boxes": boxes}
