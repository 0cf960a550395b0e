"""Seeded randomness inside an attack, leaving the caller's RNG state as it was."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


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
