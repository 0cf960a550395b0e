"""What every dataset's DataModule shares: split loaders, seeded on-device augmentation, argument checks."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medrobust.data.patches import load_npz, stable_seed


class SplitDataModule(L.LightningDataModule):
    """Loaders over ``data_train`` / ``data_val`` / ``data_test`` and batch augmentation on the device.

    Subclasses set ``data_*`` in ``setup`` (from :meth:`cached_arrays`), the attributes ``seed``, ``batch_size``,
    ``num_workers``, ``augment``, and implement :meth:`cache_path`, :meth:`_build` and :meth:`augment_images`.
    ``augment_name`` keys the augmentation's seed.
    """

    augment_name = "augment"

    def __init__(self) -> None:
        super().__init__()
        self.data_train = self.data_val = self.data_test = None
        self._aug_generator: torch.Generator | None = None

    def summary_notes(self, split: str) -> list[str]:
        """Lines about the data of ``split`` for the run's ``summary.md`` (e.g. a human baseline); none by default."""
        return []

    def augment_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    # -- the on-disk cache of one setting: subclasses implement cache_path() and _build() -> arrays
    def cache_path(self) -> Path:
        raise NotImplementedError

    def _build(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Generate (phantom) or read (real source) the data once per setting; a no-op when cached."""
        if not self.cache_path().exists():
            self._build()

    def cached_arrays(self) -> dict[str, np.ndarray]:
        """The cache's arrays; built now when missing, so ``setup`` without ``prepare_data`` still works."""
        return load_npz(self.cache_path()) or self._build()

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator, drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Augment training batches here rather than in the dataset, so the draws come from one generator
        seeded by ``seed`` and the rank, whatever the number of workers."""
        if self.augment and self.trainer is not None and self.trainer.training:
            if self._aug_generator is None:
                seed = stable_seed(self.augment_name, self.seed, self.trainer.global_rank)
                self._aug_generator = torch.Generator().manual_seed(seed)
            batch = {**batch, "image": self.augment_images(batch["image"], self._aug_generator)}
        return batch


def default_cache_dir(source: str, root: str, dataset: str) -> str:
    """A phantom caches under its ``root``; a real source under ``$XDG_CACHE_HOME/medrobust/<dataset>``."""
    if source == "phantom":
        return root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "medrobust", dataset)


def check_int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"data.{key} must be an integer >= {minimum}, got {value!r}")


def check_floats(key: str, value, n: int) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"data.{key} must be a list of {n} numbers, got {value!r}") from None
    if len(out) != n:
        raise ValueError(f"data.{key} must be a list of {n} numbers, got {list(out)}")
    return out
