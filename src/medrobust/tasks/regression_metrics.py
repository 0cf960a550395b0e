"""Regression metrics for clean and adversarial evaluation: MAE, RMSE, R^2, within-tau accuracy, prediction shift.

Every metric is updated with the same ``(preds, target)`` pair that :meth:`RegressionTask.metric_inputs`
builds:

- ``preds``: ``(B, 2)``, column 0 the prediction being evaluated, column 1 the *reference* prediction for the
  same images (the clean one when the evaluated prediction is adversarial; the prediction itself on clean
  images, so every shift there is 0);
- ``target``: ``(B,)``, the true value (in target units, e.g. years).

States are sums with ``dist_reduce_fx="sum"``, so values reduce exactly across DDP ranks. A metric over an
empty subset (a target band holding no samples) has ``is_empty()`` true and computes NaN; callers skip it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def _check_inputs(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if preds.ndim != 2 or preds.shape[1] != 2 or target.shape != preds.shape[:1]:
        raise ValueError(f"regression metrics take preds (B, 2) [prediction, reference] and target (B,), "
                         f"got {tuple(preds.shape)} and {tuple(target.shape)}")
    preds, target = preds.float(), target.float()
    return preds[:, 0], preds[:, 1], target


class _SumMetric(Metric):
    """Running sums over (a subset of) the samples; subclasses say which sums and how to combine them."""

    full_state_update = False
    skip_when_empty = True  # see medrobust.tasks.base.compute_metrics
    sums: tuple[str, ...] = ()

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("count", *self.sums):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        pred, reference, true = _check_inputs(preds, target)
        keep = self.select(true)
        pred, reference, true = pred[keep].double(), reference[keep].double(), true[keep].double()
        # assignments, not +=: states created under inference mode (Lightning's evaluation) are inference
        # tensors, and the robustness evaluation updates them outside it
        self.count = self.count + keep.sum()
        for name, value in self.terms(pred, reference, true).items():
            setattr(self, name, getattr(self, name) + value.sum())

    def select(self, true: Tensor) -> Tensor:
        return torch.ones_like(true, dtype=torch.bool)

    def is_empty(self) -> bool:
        return bool(self.count == 0)

    def compute(self) -> Tensor:
        if self.is_empty():
            return torch.tensor(math.nan)
        return self.combine().float()

    def terms(self, pred: Tensor, reference: Tensor, true: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def combine(self) -> Tensor:
        raise NotImplementedError


class MeanAbsoluteError(_SumMetric):
    """Mean |prediction - target|."""

    higher_is_better = False
    sums = ("abs_error",)

    def terms(self, pred, reference, true):
        return {"abs_error": (pred - true).abs()}

    def combine(self):
        return self.abs_error / self.count


class RootMeanSquaredError(_SumMetric):
    higher_is_better = False
    sums = ("squared_error",)

    def terms(self, pred, reference, true):
        return {"squared_error": (pred - true) ** 2}

    def combine(self):
        return (self.squared_error / self.count).sqrt()


class R2Score(_SumMetric):
    """Coefficient of determination ``1 - SSE / SST`` (SST around the evaluated samples' mean target)."""

    higher_is_better = True
    sums = ("squared_error", "target_sum", "target_sq_sum")

    def terms(self, pred, reference, true):
        return {"squared_error": (pred - true) ** 2, "target_sum": true, "target_sq_sum": true ** 2}

    def combine(self):
        total = self.target_sq_sum - self.target_sum ** 2 / self.count
        return 1 - self.squared_error / total.clamp_min(1e-12)


class WithinTolerance(_SumMetric):
    """Fraction of samples with ``|prediction - target| <= tau``: the task's ``is_correct`` rate."""

    higher_is_better = True
    sums = ("within",)

    def __init__(self, tau: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tau = float(tau)

    def terms(self, pred, reference, true):
        return {"within": ((pred - true).abs() <= self.tau).double()}

    def combine(self):
        return self.within / self.count


class MeanShift(_SumMetric):
    """``|mean(prediction - reference)|``: how far an attack moves the predictions on average (in
    target units), over all samples or over the samples whose target lies in ``[low, high)``."""

    higher_is_better = None  # a shift is a direction, not an error: no side is worse
    sums = ("shift",)

    def __init__(self, low: float = -math.inf, high: float = math.inf, **kwargs) -> None:
        super().__init__(**kwargs)
        if not high > low:
            raise ValueError(f"a band needs high > low, got [{low}, {high})")
        self.low, self.high = float(low), float(high)

    def select(self, true: Tensor) -> Tensor:
        return (true >= self.low) & (true < self.high)

    def terms(self, pred, reference, true):
        return {"shift": pred - reference}

    def combine(self):
        return (self.shift / self.count).abs()


def band_name(low: float, high: float) -> str:
    """``lt15``, ``15-25``, ``gt65``: a band's name in metric keys and file names."""
    if math.isinf(low):
        return f"lt{high:g}"
    if math.isinf(high):
        return f"gt{low:g}"
    return f"{low:g}-{high:g}"


def parse_bands(edges: Sequence[float], key: str = "module.bands") -> list[tuple[float, float]]:
    """Band edges ``[15, 25, 50, 65]`` -> ``[(-inf, 15), (15, 25), (25, 50), (50, 65), (65, inf)]``; no edges,
    no bands. ``key``: the setting named in the error."""
    edges = [float(e) for e in edges]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"{key} must be strictly increasing band edges, got {edges}")
    if not edges:
        return []
    bounds = [-math.inf, *edges, math.inf]
    return list(zip(bounds[:-1], bounds[1:]))


def regression_metrics(tau: float, bands: Sequence[tuple[float, float]], shift_metric: str = "shift"
                       ) -> dict[str, Metric]:
    """``accuracy`` (within ``tau``), ``mae``, ``rmse``, ``r2``, ``<shift_metric>`` and
    ``<shift_metric>_<band>`` per band."""
    metrics: dict[str, Metric] = {
        "accuracy": WithinTolerance(tau),
        "mae": MeanAbsoluteError(),
        "rmse": RootMeanSquaredError(),
        "r2": R2Score(),
        shift_metric: MeanShift(),
    }
    for low, high in bands:
        metrics[f"{shift_metric}_{band_name(low, high)}"] = MeanShift(low, high)
    return metrics
