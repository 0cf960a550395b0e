"""Seeded randomness inside an attack, and seeds derived from what identifies a draw.

A resumed run must draw what the uninterrupted one drew. A running RNG cannot give that (Lightning restores the
loops' position from a checkpoint, not the global RNGs), so every random draw that matters for a result takes its
seed from what identifies it: the run's seed, the epoch, the batch index, the rank, the attack.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from medrobust.data.patches import stable_seed

SEED_ENV = "PL_GLOBAL_SEED"  # set by lightning.seed_everything (train.py and eval.py call it with cfg.seed)


def run_seed(seed: int | None = None) -> int:
    """``seed``, else the run's seed (``seed_everything``'s, from ``$PL_GLOBAL_SEED``), else 0."""
    if seed is not None:
        return int(seed)
    value = os.environ.get(SEED_ENV, "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${SEED_ENV} must be an integer seed, got {value!r}") from None


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``("adv", seed, epoch, batch_idx, rank)``), the same in every process."""
    return stable_seed(*parts)


def seed_global(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), NumPy and Python's ``random`` from one derived seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the global RNG inside the block only (the caller's RNG state is restored); ``None``: no-op."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)  # only the generators the attack draws from
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
