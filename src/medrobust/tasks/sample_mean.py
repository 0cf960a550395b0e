"""The mean of per-sample values over every update and DDP rank: the base of the tasks' rate and error metrics."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class SampleMean(Metric):
    """Mean of the values :meth:`sample_values` gives per update (one per sample, or per sample and part: landmark,
    class, point), summed in float64 and DDP-reduced by sum; NaN before any value. Subclasses check their task's
    ``(preds, target)`` and say which values."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Any, target: Any) -> None:
        values = self.sample_values(preds, target).double()
        # assignments, not +=: states created under inference mode (Lightning's evaluation) are inference tensors,
        # and the robustness evaluation updates them outside it
        self.total = self.total + values.sum().to(self.total.device)
        self.count = self.count + values.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(math.nan)

    def sample_values(self, preds: Any, target: Any) -> Tensor:
        raise NotImplementedError
