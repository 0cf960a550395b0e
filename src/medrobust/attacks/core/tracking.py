"""Bookkeeping of an attack over its batch: the best point per sample and the samples still under attack."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from medrobust.attacks.core.batch import index_batch


# -- bookkeeping -------------------------------------------------------------------------------------
class AttackResult(NamedTuple):
    """Per sample: the returned point ``(B, C, *spatial)``, whether it fools the model ``(B,)``, its loss ``(B,)``."""

    x_adv: Tensor
    success: Tensor
    loss: Tensor


class BestTracker:
    """The best point seen per sample of the full batch.

    ``prefer_success=True``: the first point where the model is wrong wins and is kept; until then, the
    highest-loss point. ``prefer_success=False``: the highest-loss point, whatever the model says there.
    """

    def __init__(self, x: Tensor, *, prefer_success: bool) -> None:
        self.prefer_success = prefer_success
        self.x_adv = x.detach().clone()
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # losses are compared in fp32+
        self.loss = torch.full((x.shape[0],), float("-inf"), dtype=dtype, device=x.device)
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def update(self, idx: Tensor, x_adv: Tensor, loss: Tensor, correct: Tensor) -> Tensor:
        """Offer points ``x_adv`` of samples ``idx`` (indices into the full batch) with their loss / correctness.

        Returns which of them were taken ``(n,)``: for a sample not yet fooled, whether its loss rose to a new best.
        """
        loss = loss.detach().to(self.loss.dtype)
        better = loss > self.loss[idx]
        take = (~self.success[idx] & (~correct | better)) if self.prefer_success else better
        if not bool(take.all()):  # all taken is the common case while the loss climbs: no gathers then
            rows = take.nonzero().flatten()
            idx, x_adv, loss, correct = idx[rows], x_adv[rows], loss[rows], correct[rows]
        self.x_adv[idx] = x_adv.detach()
        self.loss[idx] = loss
        self.success[idx] = ~correct
        return take

    def result(self) -> AttackResult:
        return AttackResult(self.x_adv, self.success, self.loss)


@dataclass
class WorkingSet:
    """The samples still under attack: indices into the full batch and their per-sample data."""

    idx: Tensor
    x: Tensor
    batch: dict
    eps: Tensor
    step: Tensor

    @classmethod
    def full(cls, x: Tensor, batch: dict, eps: Tensor, step: Tensor) -> "WorkingSet":
        return cls(torch.arange(x.shape[0], device=x.device), x, batch, eps, step)

    def __len__(self) -> int:
        return self.idx.shape[0]

    def keep(self, mask: Tensor) -> "WorkingSet":
        """Only the samples ``mask`` picks: a bool mask ``(n,)`` or row indices (the batch dict indexed with
        :func:`index_batch`)."""
        rows = mask.nonzero().flatten() if mask.dtype == torch.bool else mask  # one sync for every field
        batch = index_batch(self.batch, rows, batch_size=len(self))
        tensors = {f.name: getattr(self, f.name)[rows] for f in fields(self) if f.name != "batch"}
        return WorkingSet(batch=batch, **tensors)
