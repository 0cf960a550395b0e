"""Shape-reconstruction metrics for clean and adversarial evaluation: the is-correct rate, the mean point error
(MRSE, in pixels and in mm), the mask's Dice and the shape shift under attack.

Every metric is updated with the ``(preds, target)`` pair that :meth:`ShapeTask.metric_inputs` builds:

- ``preds``: a :class:`ShapePreds`: ``points`` ``(B, 2, K, 2)`` pixel coordinates, ``[:, 0]`` the prediction being
  evaluated and ``[:, 1]`` the reference (the clean prediction under attack; the prediction itself on clean
  images, where the shift is 0), and the predicted ``mask`` ``(B, H, W)`` bool;
- ``target``: a :class:`ShapeTarget`: the true outline ``(B, K, 2)``, mask ``(B, H, W)``, spacing ``(B, 2)`` mm
  and the task's verdict ``correct`` ``(B,)``.

MRSE is the mean over every (sample, point) pair of the Euclidean distance between predicted and true points,
the seed paper's "mean root squared error". Dice is the mean over samples. States are sums: exact across DDP.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric


from medrobust.tasks.landmark_metrics import radial_errors
from medrobust.tasks.sample_mean import SampleMean


class ShapePreds(NamedTuple):
    points: Tensor
    mask: Tensor


class ShapeTarget(NamedTuple):
    points: Tensor
    mask: Tensor
    spacing: Tensor
    correct: Tensor


def mask_dice(pred: Tensor, true: Tensor) -> Tensor:
    """Dice ``(B,)`` of boolean masks ``(B, *spatial)``; 1 where both are empty."""
    pred, true = pred.flatten(1).bool(), true.flatten(1).bool()
    overlap = (pred & true).sum(dim=1).double()
    total = pred.sum(dim=1).double() + true.sum(dim=1).double()
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))


def _check(preds: ShapePreds, target: ShapeTarget) -> None:
    if not isinstance(preds, ShapePreds) or not isinstance(target, ShapeTarget):
        raise TypeError(f"shape metrics take (ShapePreds, ShapeTarget), got ({type(preds).__name__}, "
                        f"{type(target).__name__})")
    if preds.points.ndim != 4 or preds.points.shape[1] != 2 or preds.points[:, 0].shape != target.points.shape:
        raise ValueError(f"shape metrics take points (B, 2, K, 2) [prediction, reference] and true points (B, K, 2), "
                         f"got {tuple(preds.points.shape)} and {tuple(target.points.shape)}")


class _ShapeMean(SampleMean):
    """Mean of per-sample or per-(sample, point) values; subclasses say which."""

    def sample_values(self, preds: ShapePreds, target: ShapeTarget) -> Tensor:
        _check(preds, target)
        return self.values(preds, target)

    def values(self, preds: ShapePreds, target: ShapeTarget) -> Tensor:
        raise NotImplementedError


class CorrectRate(_ShapeMean):
    """Fraction of samples the task calls correct: the task's ``is_correct`` rate."""

    higher_is_better = True

    def values(self, preds, target):
        return target.correct.float()


class PointError(_ShapeMean):
    """MRSE: mean distance between predicted and true points, in pixels or (``in_mm``) in mm."""

    higher_is_better = False

    def __init__(self, in_mm: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.in_mm = in_mm

    def values(self, preds, target):
        spacing = target.spacing if self.in_mm else torch.ones_like(target.spacing)
        return radial_errors(preds.points[:, 0], target.points, spacing)


class MaskDice(_ShapeMean):
    """Dice of the predicted mask with the true one, mean over samples."""

    higher_is_better = True

    def values(self, preds, target):
        return mask_dice(preds.mask, target.mask)


class ShapeShift(_ShapeMean):
    """Mean displacement in pixels of the evaluated outline from the reference (the clean prediction under attack):
    how far an attack moves the shape, right or wrong, so no side is worse."""

    higher_is_better = None

    def values(self, preds, target):
        return radial_errors(preds.points[:, 0], preds.points[:, 1], torch.ones_like(target.spacing))


def shape_metrics() -> dict[str, Metric]:
    """``accuracy``, ``mrse`` (px), ``mrse_mm``, ``dice`` and ``shape_shift`` (px)."""
    return {"accuracy": CorrectRate(), "mrse": PointError(), "mrse_mm": PointError(in_mm=True), "dice": MaskDice(),
            "shape_shift": ShapeShift()}
