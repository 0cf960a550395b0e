"""What every dataset's DataModule shares: split loaders, seeded on-device augmentation, argument checks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medrobust.data.intensity import IntensityWindow
from medrobust.data.patches import load_npz, save_npz_atomic, stable_seed
from medrobust.datamodules.sharding import consecutive_batches, sharded_loader

SPLITS = ("train", "val", "test")


class SplitDataModule(L.LightningDataModule):
    """Loaders over ``data_train`` / ``data_val`` / ``data_test`` and batch augmentation on the device.

    Subclasses set the attributes ``seed``, ``batch_size``, ``num_workers``, ``augment``, ``split``, and implement
    :meth:`cache_path`, :meth:`_build`, :meth:`_assign` and :meth:`_dataset` (``setup`` joins them) and, when they
    augment, :meth:`draw_spatial` (plus :meth:`augment_intensity` for image-only changes). ``augment_name`` keys the
    augmentation's seed; ``mask_keys`` names the batch entries that are maps on the image's grid (a segmentation's
    ``label``, readers' masks): they move with the image.
    """

    augment_name = "augment"
    mask_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.data_train = self.data_val = self.data_test = None

    def summary_notes(self, split: str) -> list[str]:
        """Lines about the data of ``split`` for the run's ``summary.md`` (e.g. a human baseline); none by default."""
        return []

    # -- augmentation: one spatial draw per batch for the image and its masks, intensity changes for the image only
    def draw_spatial(self, images: torch.Tensor, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
        """The random spatial transform of this batch (e.g. :func:`~medrobust.datamodules.augment.draw_flip_rot90`),
        applicable to any ``(B, ..., *spatial)`` tensor without interpolation."""
        raise NotImplementedError

    def augment_intensity(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Image-only changes after the spatial transform; none by default (and no draws)."""
        return images

    def augment_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.augment_intensity(self.draw_spatial(images, generator)(images), generator)

    def augment_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """The image augmented, and every ``mask_keys`` entry moved by the same spatial draw (values and dtype kept)."""
        images = batch["image"]
        n_spatial = images.dim() - 2
        for key in self.mask_keys:
            shape = tuple(batch[key].shape)
            if shape[:1] != images.shape[:1] or shape[len(shape) - n_spatial :] != tuple(images.shape[2:]):
                raise ValueError(f"{type(self).__name__}: batch[{key!r}] of shape {list(shape)} is not a map on the "
                                 f"grid of batch['image'] {list(images.shape)}")  # fmt: skip
        spatial = self.draw_spatial(images, generator)
        out = {**batch, "image": self.augment_intensity(spatial(images), generator)}
        out.update({key: spatial(batch[key]) for key in self.mask_keys})
        return out

    # -- the on-disk cache of one setting: subclasses implement cache_path() and _build() -> arrays
    def cache_path(self) -> Path:
        raise NotImplementedError

    def _build(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Generate (phantom) or read (real source) the data once per setting; a no-op when cached."""
        if not self.cache_path().exists():
            self._build_cache()

    def cached_arrays(self) -> dict[str, np.ndarray]:
        """The cache's arrays; built now when missing, so ``setup`` without ``prepare_data`` still works."""
        return load_npz(self.cache_path()) or self._build_cache()

    def _build_cache(self) -> dict[str, np.ndarray]:
        """:meth:`_build`, once the cache's folder is known to take files (reading a dataset can take minutes)."""
        check_writable(self.cache_path().parent)
        return self._build()

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        sampler = EpochShuffle(len(dataset), self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def eval_batches(self, dataset: Dataset) -> list[list[int]]:
        """The batches (sample indices) of ``_loader(dataset, shuffle=False)``, for :meth:`_eval_loader`."""
        return consecutive_batches(len(dataset), self.batch_size)

    def _eval_loader(self, split: str) -> DataLoader:
        """The split's loader; under DDP this process's whole batches of it (:mod:`~medrobust.datamodules.sharding`)."""
        dataset = getattr(self, f"data_{split}")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if world_size == 1 or dataset is None:
            return self._loader(dataset, shuffle=False)
        return sharded_loader(dataset, self.eval_batches(dataset), self.trainer.global_rank, world_size,
                              f"the {split} split of {type(self).__name__}", self.num_workers)  # fmt: skip

    def whole_loader(self, split: str) -> DataLoader:
        """Every sample of ``split`` in order, in every process (for work that rank 0 does on the whole split)."""
        return self._loader(getattr(self, f"data_{split}"), shuffle=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Augment training batches here rather than in the dataset, so the draws are the same whatever the number
        of workers. Each batch draws from a generator seeded by ``seed``, the rank, the epoch and the batch index:
        a run resumed from a checkpoint draws what the uninterrupted run drew (a running generator would restart)."""
        if self.augment and self.trainer is not None and self.trainer.training:
            epoch, index = _batch_position(self.trainer)
            seed = stable_seed(self.augment_name, self.seed, self.trainer.global_rank, epoch, index)
            batch = self.augment_batch(batch, torch.Generator().manual_seed(seed))
        return batch

    # -- setup: load the cache, assign samples to splits, build one dataset per split
    def setup(self, stage: str | None = None) -> None:
        """Load the cache, assign every sample a split (:meth:`_assign`) and build the datasets (:meth:`_dataset`)."""
        if self.data_train is not None:
            return
        arrays = self.cached_arrays()
        assign = self._assign(arrays)
        sets = [self._dataset(arrays, np.flatnonzero(assign == k), name) for k, name in enumerate(SPLITS)]
        self.data_train, self.data_val, self.data_test = sets
        self._log_setup()

    def _assign(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Split index (0 train, 1 val, 2 test) per sample of ``arrays``."""
        raise NotImplementedError

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        """The dataset of the samples ``idx`` (sorted) of ``arrays``, which form split ``split``."""
        raise NotImplementedError

    def _log_setup(self) -> None:
        """Log what ``setup`` built; nothing by default."""

    def _write_cache(self, arrays: dict[str, np.ndarray], **meta) -> dict[str, np.ndarray]:
        """Save ``arrays`` at :meth:`cache_path` with the settings (``_settings()``) and ``meta``; returns them."""
        save_npz_atomic(self.cache_path(), {**self._settings(), **meta}, **arrays)
        return arrays


class EpochShuffle(Sampler[int]):
    """A random order of ``n`` samples per epoch, drawn from ``(seed, epoch)`` alone.

    Lightning calls :meth:`set_epoch` before every training epoch (also after a resume), so epoch ``k`` gets the
    same order in a resumed run as in an uninterrupted one; a ``RandomSampler`` with a generator would restart the
    generator's stream at the resume. Under DDP, Lightning wraps this sampler in its distributed sampler, which
    reshuffles per epoch from its own seed and epoch: still a function of the epoch alone.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(stable_seed("shuffle", self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def _batch_position(trainer) -> tuple[int, int]:
    """``(epoch, index of the batch being prepared)`` while training. The training loop moves a batch to the device
    before counting it ready, so the count of batches ready is this batch's index (restored on a mid-epoch resume)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    index = loop.batch_progress.current.ready if loop is not None else 0
    return int(getattr(trainer, "current_epoch", 0)), int(index)


def default_cache_dir(source: str, root: str, dataset: str) -> str:
    """A phantom caches under its ``root``; a real source under ``$MEDROBUST_DATA_DIR/<dataset>`` (what the configs'
    ``${paths.data_dir}`` honours), else ``$XDG_CACHE_HOME/medrobust/<dataset>``."""
    if source == "phantom":
        return root
    if os.environ.get("MEDROBUST_DATA_DIR"):
        return os.path.join(os.environ["MEDROBUST_DATA_DIR"], dataset)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "medrobust", dataset)


def check_writable(folder: Path) -> None:
    """``folder`` exists (made if missing) and takes a new file; else a ``PermissionError`` naming it and the knobs."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise PermissionError(f"{folder}: cannot write the data cache there ({error.strerror or error}); expected a "
                              f"writable folder: set data.cache_dir, or MEDROBUST_DATA_DIR for every cache") from None


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


def check_split(split) -> tuple[float, float, float]:
    """``data.split``: train / val / test fractions, each >= 0, train > 0, summing to 1."""
    split = check_floats("split", split, 3)
    if min(split) < 0 or split[0] <= 0 or abs(sum(split) - 1) > 1e-6:
        raise ValueError(f"data.split must be 3 fractions >= 0 (train > 0) summing to 1, got {list(split)}")
    return split


def check_choice(key: str, value, choices) -> None:
    if value not in choices or isinstance(value, bool):
        raise ValueError(f"data.{key} must be one of {list(choices)}, got {value!r}")


def check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"data.{key} must be true or false, got {value!r}")


def check_split_counts(counts: dict[str, int], split, what: str, hint: str) -> None:
    """Every split asked for (fraction > 0) got some ``what`` and train at least two; else name the knob (``hint``)."""
    if any(split[k] > 0 and counts[name] == 0 for k, name in enumerate(SPLITS)) or counts["train"] < 2:
        raise ValueError(f"data: {sum(counts.values())} {what} are too few for split {list(split)} "
                         f"({what} per split {counts}); {hint}")  # fmt: skip


def image_item(stored: np.ndarray, window: IntensityWindow) -> torch.Tensor:
    """One cached image (native units, any dtype) as float32 ``(1, *spatial)`` in model units."""
    image = window.to_model(stored.astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]


def check_spatial_dims(value) -> None:
    if value not in (2, 3) or isinstance(value, bool):
        raise ValueError(f"data.spatial_dims must be 2 or 3, got {value!r}")
