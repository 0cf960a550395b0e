"""Evaluation under DDP: every process takes whole batches of the one-process order, and no sample twice.

Lightning's ``DistributedSampler`` deals samples out one at a time and repeats the first ones so that every process
holds equally many: 257 test images are scored as 258, and every batch holds other samples than in one process, so
the attacks' random draws (seeded per batch) fall differently as well. Here the batches of the one-process loader
are formed first and process ``r`` of ``W`` takes batches ``r, r + W, ...``: the same batches, each scored once, and
batch ``k`` is batch ``k`` (:func:`batch_number`) whatever the number of processes. Processes may hold one batch more
than others: nothing in an evaluation synchronises per batch (metrics sync at the epoch's end).

The sampler is a ``DistributedSampler`` so that Lightning keeps it instead of putting its own in its place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

log = logging.getLogger("medrobust")


def batch_number(index: int, rank: int, world_size: int) -> int:
    """The position in the one-process order of the ``index``-th batch that process ``rank`` of ``world_size``
    evaluates (what seeds its attacks and what ``max_batches`` counts)."""
    return index * world_size + rank


def consecutive_batches(n: int, batch_size: int) -> list[list[int]]:
    """The batches of a sequential loader over ``n`` samples (the last one short)."""
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


def shard_batches(batches: Sequence[Sequence[int]], rank: int, world_size: int, what: str) -> list[list[int]]:
    """Process ``rank``'s share of ``batches``: every ``world_size``-th batch from ``rank`` on.

    With fewer batches than processes some would get none, and a process without a batch skips the evaluation
    that the others wait for; the samples are then cut into ``world_size`` near-equal consecutive batches instead
    (the same samples, once each; seeded attacks then draw per these batches). Fewer samples than processes: an error.
    """
    batches = [list(batch) for batch in batches]
    if len(batches) >= world_size:
        return batches[rank::world_size]
    samples = [i for batch in batches for i in batch]
    if len(samples) < world_size:
        raise ValueError(f"{what}: {len(samples)} samples cannot be shared by {world_size} processes (every process "
                         f"needs at least one); evaluate it with fewer devices or give the split more samples")
    if rank == 0:
        log.warning("%s: %d batches for %d processes; cut into %d smaller batches instead, so attacks with random "
                    "draws differ from a run with another number of processes", what, len(batches), world_size,
                    world_size)  # fmt: skip
    return [part.tolist() for part in np.array_split(np.asarray(samples), world_size)][rank : rank + 1]


class ShardSampler(DistributedSampler):
    """Yields this process's batches (lists of indices) for a loader with ``batch_size=None`` over :class:`Collated`."""

    def __init__(self, batches: list[list[int]], num_replicas: int, rank: int) -> None:
        # DistributedSampler's own __init__ needs a dataset and an initialised process group; nothing of it is used
        self.batches, self.num_replicas, self.rank = batches, num_replicas, rank
        self.epoch, self.shuffle, self.drop_last, self.seed = 0, False, False, 0
        self.num_samples = sum(len(batch) for batch in batches)
        self.total_size = self.num_samples

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Collated(Dataset):
    """``dataset`` read a batch at a time: item ``[i, j, ...]`` is the collated batch of those samples."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: list[int]):
        return default_collate([self.dataset[i] for i in indices])

    def __len__(self) -> int:
        return len(self.dataset)


def sharded_loader(dataset: Dataset, batches: list[list[int]], rank: int, world_size: int, what: str,
                   num_workers: int = 0) -> DataLoader:
    """A loader over process ``rank``'s share of ``batches`` (see the module docstring)."""
    sampler = ShardSampler(shard_batches(batches, rank, world_size, what), world_size, rank)
    return DataLoader(Collated(dataset), sampler=sampler, batch_size=None, num_workers=num_workers,
                      persistent_workers=num_workers > 0)  # fmt: skip
