"""Per-sample values (robustness radii) from every DDP rank, in the order one process would have them."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule


def gather(pl_module: LightningModule, values: torch.Tensor) -> torch.Tensor:
    """Every rank's per-sample values ``(n_rank,)``, concatenated. Ranks may hold different counts (same-shape
    batches of whole volumes, or ``max_batches`` cutting them unevenly): all_gather needs one shape, so each rank
    pads to the largest count and the padding is cut off again."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None or trainer.world_size == 1:
        return values
    counts = pl_module.all_gather(torch.tensor(values.shape[0], device=values.device)).flatten().tolist()
    padded = torch.cat([values, values.new_zeros(max(counts) - values.shape[0])])
    parts = pl_module.all_gather(padded).reshape(len(counts), -1)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def gather_in_order(pl_module: LightningModule, parts: list[tuple[int, torch.Tensor]], device) -> torch.Tensor:
    """Per-sample values of ``(batch number, values)`` parts from every rank, in the one-process order."""
    values = torch.cat([v for _, v in parts]) if parts else torch.zeros(0, device=device)
    numbers = torch.cat([torch.full((len(v),), n, device=v.device) for n, v in parts]) if parts else values.long()
    values, numbers = gather(pl_module, values), gather(pl_module, numbers)
    return values[torch.sort(numbers, stable=True).indices]
