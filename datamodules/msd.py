"""Any Medical Segmentation Decathlon or nnU-Net v2 dataset (``data.root``), 2-D slices or 3-D volumes.

Cases are read once with MONAI (:mod:`medrobust.data.msd`: checked, RAS, optionally resampled to ``pixdim``,
intensities scaled to [0, 1]) and cached as one ``.npy`` pair per case, memory-mapped at load. Splits are by case
(a seeded permutation; the Decathlon's test images have no labels, so all three splits come from ``imagesTr``).

* training: random crops of ``patch_size`` (padded where the volume is smaller), a ``foreground_fraction`` of them
  centred on a random foreground voxel (as nnU-Net oversamples foreground); 2-D mode crops axial slices;
* validation / test: whole volumes (3-D) or whole axial slices (2-D), batched only with samples of the same shape;
  the task's sliding window (``module.roi_size``) handles sizes beyond the patch.

Batches: ``{"image": float32 (B, C, *spatial) in [0, 1], "label": int64 (B, *spatial), "spacing": (B, D) mm,
"id": list[str] (case, or case:z<slice>), "case_id": list[str]}``; spatial axes are RAS (X, Y[, Z]).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, SequentialSampler
from tqdm.auto import tqdm

from medrobust.data.intensity import IntensityWindow
from medrobust.data.msd import load_case, read_dataset
from medrobust.data.patches import file_fingerprint, save_npz_atomic, settings_key, stable_seed
from medrobust.datamodules.augment import FlipRot90, draw_flip_rot90
from medrobust.datamodules.base import SplitDataModule, default_cache_dir
from medrobust.datamodules.base import check_floats, check_int, check_spatial_dims, check_split

log = logging.getLogger("medrobust")

CACHE_VERSION = 1  # bump when reading or preprocessing changes, so old caches miss


class CaseStore:
    """The cached cases: ``image(i)`` float32 ``(C, X, Y, Z)`` and ``label(i)`` uint8 ``(X, Y, Z)``, memory-mapped."""

    def __init__(self, folder: Path, case_ids: Sequence[str], spacings: np.ndarray):
        self.folder, self.case_ids, self.spacings = folder, list(case_ids), spacings

    def image(self, i: int) -> np.ndarray:
        return np.load(self.folder / f"{self.case_ids[i]}_image.npy", mmap_mode="r")

    def label(self, i: int) -> np.ndarray:
        return np.load(self.folder / f"{self.case_ids[i]}_label.npy", mmap_mode="r")


def random_crop(image: np.ndarray, label: np.ndarray, size: Sequence[int], foreground_fraction: float):
    """A ``size`` crop of ``image (C, *S)`` and ``label (*S)``, zero-padded where ``S`` is smaller; with probability
    ``foreground_fraction`` (and some foreground) centred on a random foreground voxel. Draws from torch's RNG."""
    pad = [(0, max(0, n - s)) for n, s in zip(size, label.shape)]
    image, label = np.pad(image, [(0, 0), *pad]), np.pad(label, pad)
    if torch.rand(()).item() < foreground_fraction and label.any():
        voxels = np.argwhere(label > 0)
        centre = voxels[torch.randint(len(voxels), ()).item()]
        start = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(centre, size, label.shape)]
    else:
        start = [torch.randint(s - n + 1, ()).item() for n, s in zip(size, label.shape)]
    box = tuple(slice(a, a + n) for a, n in zip(start, size))
    return image[(slice(None), *box)], label[box]


class MSDSamples(Dataset):
    """Samples of one split: ``items`` are ``(case index, axial slice or None)``; ``crop`` a patch size for random
    training crops, or None for whole volumes / slices."""

    def __init__(self, store: CaseStore, items: list[tuple[int, int | None]], crop: Sequence[int] | None,
                 foreground_fraction: float = 0.33):  # fmt: skip
        self.store, self.items, self.crop, self.foreground_fraction = store, items, crop, foreground_fraction

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        case, z = self.items[i]
        image, label, spacing = self.store.image(case), self.store.label(case), self.store.spacings[case]
        if z is not None:
            image, label, spacing = image[..., z], label[..., z], spacing[:2]
        if self.crop is not None:
            image, label = random_crop(image, label, self.crop, self.foreground_fraction)
        case_id = self.store.case_ids[case]
        return {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)),  # a copy: the cache is memory-mapped
            "label": torch.from_numpy(np.array(label, dtype=np.int64)),
            "spacing": torch.as_tensor(spacing, dtype=torch.float32),
            "id": case_id if z is None else f"{case_id}:z{z:03d}",
            "case_id": case_id,
        }

    def shape(self, i: int) -> tuple[int, ...]:
        case, z = self.items[i]
        shape = self.store.label(case).shape
        return tuple(shape[:2]) if z is not None else tuple(shape)


class SameShapeBatchSampler(BatchSampler):
    """Batches of consecutive samples with one shape (the slices of one case, or equal-sized volumes), so whole
    images of different sizes never meet in a batch.

    Under DDP the datamodule's validation and test loaders hand each process whole batches of these
    (:mod:`medrobust.datamodules.sharding`). A loader made before the trainer (``trainer.test(dataloaders=
    dm.test_dataloader())``) does not know the processes; Lightning rebuilds this batch sampler around its
    ``DistributedSampler`` (rank ``r`` of ``W`` takes samples ``r, r + W, ...``, the first samples repeated so that
    every rank holds equally many) as ``cls(sampler, batch_size=..., drop_last=...)``: ``shapes`` then come from the
    sampler's dataset (:meth:`MSDSamples.shape`), and batches stay same-shape.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool, shapes: Sequence[tuple[int, ...]] | None = None):
        super().__init__(sampler, batch_size, drop_last)
        if shapes is None:
            # DistributedSampler keeps its dataset as .dataset, SequentialSampler as .data_source
            distributed = isinstance(sampler, DistributedSampler)
            dataset = sampler.dataset if distributed else getattr(sampler, "data_source", None)
            if not isinstance(dataset, MSDSamples):
                raise TypeError(f"SameShapeBatchSampler needs shapes, or a sampler over MSDSamples to read them from; "
                                f"got a {type(sampler).__name__} over {type(dataset).__name__}")  # fmt: skip
            shapes = [dataset.shape(i) for i in range(len(dataset))]
        self.shapes = list(shapes)

    def __iter__(self):
        batch: list[int] = []
        for i in self.sampler:
            if batch and (len(batch) == self.batch_size or self.shapes[i] != self.shapes[batch[0]]):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self)


class MSDDataModule(SplitDataModule):
    """A Decathlon / nnU-Net v2 dataset folder as a segmentation DataModule.

    Args:
        root: the dataset folder holding ``dataset.json``, ``imagesTr/``, ``labelsTr/`` (required).
        cache_dir: where preprocessed cases are cached; default ``$XDG_CACHE_HOME/medrobust/msd``.
        spatial_dims: 3 (volumes) or 2 (axial slices).
        patch_size: training crop, ``spatial_dims`` voxels (in-plane square when ``augment`` rotates).
        pixdim: resample to this spacing in mm (3 numbers); null keeps each case's grid.
        ct_window: ``(low, high)`` native units (HU) mapped to [0, 1] (``self.intensity``, eps in HU works);
            null: each channel's ``percentiles`` map to [0, 1].
        split: train / val / test fractions of cases; seed: split, crops and augmentation.
        samples_per_volume: random crops per case per epoch (3-D).
        foreground_fraction: share of crops centred on foreground.
        max_cases: use the first cases only (quick runs).
        augment: random flips of every axis and in-plane 90-degree rotations of training batches.
    """

    augment_name = "msd-augment"
    mask_keys = ("label",)  # flipped / rotated with the image

    def __init__(
        self,
        root: str,
        cache_dir: str | None = None,
        spatial_dims: int = 3,
        patch_size: Sequence[int] = (64, 64, 64),
        pixdim: Sequence[float] | None = None,
        ct_window: Sequence[float] | None = None,
        percentiles: Sequence[float] = (0.5, 99.5),
        split: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        batch_size: int = 2,
        num_workers: int = 0,
        samples_per_volume: int = 1,
        foreground_fraction: float = 0.33,
        max_cases: int | None = None,
        augment: bool = True,
    ):
        super().__init__()
        if root is None or not os.path.isdir(str(root)):
            raise FileNotFoundError(f"data.root must be a Decathlon / nnU-Net v2 dataset folder, got {root!r}")
        check_spatial_dims(spatial_dims)
        for key, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("seed", seed, 0),
                                ("samples_per_volume", samples_per_volume, 1)):  # fmt: skip
            check_int(key, value, low)
        if max_cases is not None:
            check_int("max_cases", max_cases, 3)
        patch = list(patch_size) if isinstance(patch_size, Sequence) and not isinstance(patch_size, str) else None
        if patch is None or len(patch) != spatial_dims or not all(isinstance(p, int) and p >= 4 for p in patch):
            raise ValueError(f"data.patch_size must be a list of {spatial_dims} integers >= 4 (one per spatial axis "
                             f"of data.spatial_dims={spatial_dims}), got {patch_size!r}")  # fmt: skip
        self.patch_size = tuple(patch)
        if augment and self.patch_size[-1] != self.patch_size[-2]:
            raise ValueError(f"data.patch_size {list(self.patch_size)}: augment rotates in-plane, so the last two "
                             "sizes must be equal (or set data.augment=false)")  # fmt: skip
        self.pixdim = check_floats("pixdim", pixdim, 3) if pixdim is not None else None
        self.ct_window = check_floats("ct_window", ct_window, 2) if ct_window is not None else None
        self.percentiles = check_floats("percentiles", percentiles, 2)
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"data.percentiles must be 0 <= low < high <= 100, got {list(percentiles)}")
        self.split = check_split(split)
        if not 0 <= foreground_fraction <= 1:
            raise ValueError(f"data.foreground_fraction must be in [0, 1], got {foreground_fraction!r}")
        self.save_hyperparameters(logger=False)

        self.spec = read_dataset(root)  # a bad dataset.json fails here, before anything is built
        if max_cases is not None:
            self.spec = dataclasses.replace(self.spec, cases=self.spec.cases[:max_cases])
        self.root, self.spatial_dims, self.seed = str(root), int(spatial_dims), int(seed)
        self.batch_size, self.num_workers, self.augment = int(batch_size), int(num_workers), bool(augment)
        self.samples_per_volume, self.foreground_fraction = int(samples_per_volume), float(foreground_fraction)
        self.cache_dir = str(cache_dir) if cache_dir is not None else default_cache_dir("real", self.root, "msd")
        self.num_classes, self.in_channels = self.spec.num_classes, self.spec.in_channels
        self.class_names = list(self.spec.class_names)
        self.intensity = IntensityWindow(*self.ct_window, unit="HU") if self.ct_window else None
        self.input_bounds = (0.0, 1.0)
        self.split_counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------------ caching
    def cache_path(self) -> Path:
        """The manifest of the current settings; the cases' arrays sit in the folder of the same stem."""
        files = [p for c in self.spec.cases for p in (*c.images, c.label) if os.path.isfile(p)]
        settings = dict(kind="msd_cases", version=CACHE_VERSION, dataset=file_fingerprint(self.spec.json_path),
                        files=[file_fingerprint(p) for p in files], pixdim=self.pixdim, ct_window=self.ct_window,
                        percentiles=self.percentiles)  # fmt: skip
        name = "".join(ch if ch.isalnum() else "_" for ch in self.spec.name)
        return Path(self.cache_dir) / f"msd_{name}_{settings_key(settings)}.npz"

    def _build(self) -> dict[str, np.ndarray]:
        """Check, read and preprocess every case; write one ``.npy`` pair per case, then the manifest."""
        folder = self.cache_path().with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        spacings = []
        for case in tqdm(self.spec.cases, desc=f"{self.spec.name} cases", leave=False):
            image, label, spacing = load_case(case, self.spec, self.pixdim, self.ct_window, self.percentiles)
            np.save(folder / f"{case.case_id}_image.npy", image)
            np.save(folder / f"{case.case_id}_label.npy", label)
            spacings.append(spacing)
        arrays = {"case_ids": np.array([c.case_id for c in self.spec.cases]), "spacings": np.stack(spacings)}
        save_npz_atomic(self.cache_path(), {"root": self.root, "n_cases": len(spacings)}, **arrays)
        return arrays

    # ------------------------------------------------------------------------------------ splits
    def split_cases(self, n: int) -> list[np.ndarray]:
        """Case indices of train / val / test: a seeded permutation cut by ``split``; every split asked for is
        nonempty."""
        order = np.random.default_rng(stable_seed("msd-split", self.seed)).permutation(n)
        counts = np.floor(np.asarray(self.split) * n).astype(int)
        counts[0] = n - counts[1:].sum()
        for k in (1, 2):  # a requested split gets at least one case, taken from train
            if self.split[k] > 0 and counts[k] == 0:
                counts[k], counts[0] = 1, counts[0] - 1
        if counts[0] < 1:
            raise ValueError(f"data.split {list(self.split)}: {n} cases in {self.root} leave no training case")
        return np.split(order, np.cumsum(counts)[:-1])

    def _assign(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        self._store = CaseStore(self.cache_path().with_suffix(""), arrays["case_ids"].tolist(), arrays["spacings"])
        assign = np.full(len(self._store.case_ids), -1)
        for k, cases in enumerate(self.split_cases(len(assign))):
            assign[cases] = k
        return assign

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        store, cases = self._store, idx.tolist()
        if self.spatial_dims == 2:
            items = [(c, z) for c in cases for z in range(store.label(c).shape[2])]
        else:
            items = [(c, None) for c in cases for _ in range(self.samples_per_volume if split == "train" else 1)]
        self.split_counts[split] = len(cases)
        return MSDSamples(store, items, self.patch_size if split == "train" else None, self.foreground_fraction)

    def _log_setup(self) -> None:
        log.info("%s (%s layout) %d-D, %d channel(s), classes %s: %s cases", self.spec.name, self.spec.layout,
                 self.spatial_dims, self.in_channels, self.class_names,
                 ", ".join(f"{n} {c}" for n, c in self.split_counts.items()))  # fmt: skip

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        if shuffle or dataset is None:
            return super()._loader(dataset, shuffle)
        return DataLoader(dataset, batch_sampler=self._same_shape(dataset), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)  # fmt: skip

    def eval_batches(self, dataset: Dataset) -> list[list[int]]:
        return list(self._same_shape(dataset))

    def _same_shape(self, dataset: Dataset) -> SameShapeBatchSampler:
        shapes = [dataset.shape(i) for i in range(len(dataset))]
        return SameShapeBatchSampler(SequentialSampler(dataset), self.batch_size, False, shapes)

    def draw_spatial(self, images: torch.Tensor, generator: torch.Generator) -> FlipRot90:
        """Random flips of every axis and an in-plane rot90, applied to the image and its label alike."""
        return draw_flip_rot90(images.shape[0], images.dim() - 2, generator)
