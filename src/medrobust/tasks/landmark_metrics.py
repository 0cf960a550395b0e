"""Landmark metrics for clean and adversarial evaluation: the is-correct rate, mean radial error (MRE), successful
detection rates (SDR), per-landmark errors, the landmark shift under attack, and seed 004's loss threshold.

Every metric is updated with the same ``(preds, target)`` pair that :meth:`LandmarkTask.metric_inputs` builds:

- ``preds``: ``(B, 2, K, D)`` voxel coordinates, ``[:, 0]`` the prediction being evaluated, ``[:, 1]`` the
  *reference* prediction for the same images (the clean one when the evaluated prediction is adversarial; the
  prediction itself on clean images, so the shift there is 0);
- ``target``: a :class:`LandmarkTarget`: true landmarks ``(B, K, D)`` voxels, spacing ``(B, D)`` mm, and per sample
  the task's loss ``(B,)`` and its verdict ``correct`` ``(B,)``.

Errors are Euclidean distances in mm: voxel differences times the spacing of each axis (anisotropic spacing
included). MRE and SDR are means over every (sample, landmark) pair, the challenge convention. States are sums
(``dist_reduce_fx="sum"``) or, for the loss threshold, the gathered losses (``"cat"``): exact across DDP ranks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from medrobust.tasks.sample_mean import SampleMean

SDR_RADII_MM = (2.0, 2.5, 3.0, 4.0)
HUBER_C = 1.5  # Huber's proposal 2 tuning constant (statsmodels' default): 1.5 robust scales count as inliers
TAU_SCALES = 3.0  # seed 004: tau = robust mean + 3 robust scales of the clean validation losses


class LandmarkTarget(NamedTuple):
    landmarks: Tensor
    spacing: Tensor
    loss: Tensor
    correct: Tensor


def radial_errors(pred: Tensor, true: Tensor, spacing: Tensor) -> Tensor:
    """Euclidean distance ``(B, K)`` in mm between voxel coordinates ``(B, K, D)``, with ``spacing`` ``(B, D)`` mm."""
    return ((pred.double() - true.double()) * spacing.double()[:, None, :]).norm(dim=-1)


def sdr_key(radius_mm: float) -> str:
    """``sdr_2mm``, ``sdr_2p5mm``: metric keys without dots (W&B and file names)."""
    return f"sdr_{radius_mm:g}mm".replace(".", "p")


def huber_location_scale(values: Tensor, c: float = HUBER_C, tol: float = 1e-10, max_iter: int = 200
                         ) -> tuple[float, float]:
    """Huber's proposal 2: joint M-estimates of location and scale of ``values`` (1-D), as statsmodels'
    ``robust.scale.Huber`` computes them: from the median and the normalised MAD, iterate

    ``mu = mean(clip(x, mu - c s, mu + c s))``, ``s^2 = sum_{|x - mu| <= c s} (x - mu)^2 / (n gamma - n_out c^2)``

    with ``gamma = E[min(z^2, c^2)]`` for a standard normal ``z`` (so ``s`` is the standard deviation for normal
    data). A scale of 0 (all values equal, or more than half of them) gives ``(median, 0)``."""
    x = values.detach().double().flatten().cpu()
    if x.numel() == 0:
        return math.nan, math.nan
    mu = float(x.median())
    scale = 1.482602218505602 * float((x - mu).abs().median())
    if scale == 0.0:
        return mu, 0.0
    inside_normal = math.erf(c / math.sqrt(2.0))  # P(|z| <= c)
    gamma = inside_normal + c**2 * (1 - inside_normal) - 2 * c * math.exp(-c**2 / 2) / math.sqrt(2 * math.pi)
    n = x.numel()
    for _ in range(max_iter):
        new_mu = float(x.clamp(mu - c * scale, mu + c * scale).mean())
        inside = (x - mu).abs() <= c * scale
        denominator = n * gamma - (n - int(inside.sum())) * c**2
        if denominator <= 0:  # more outliers than the model allows: keep the last estimate
            break
        new_scale = math.sqrt(float(((x - new_mu)[inside]).square().sum()) / denominator)
        done = abs(scale - new_scale) <= new_scale * tol and abs(mu - new_mu) <= new_scale * tol
        mu, scale = new_mu, new_scale
        if done:
            break
    return mu, scale


def loss_threshold(losses: Tensor) -> float:
    """Seed 004's tau: Huber robust mean plus 3 robust scales of per-sample clean losses."""
    mu, scale = huber_location_scale(losses)
    return mu + TAU_SCALES * scale


def _check(preds: Tensor, target: LandmarkTarget) -> tuple[Tensor, Tensor]:
    if not isinstance(target, LandmarkTarget):
        raise TypeError(f"landmark metrics take target as a LandmarkTarget(landmarks, spacing, loss, correct), "
                        f"got {type(target).__name__}")
    if preds.ndim != 4 or preds.shape[1] != 2 or preds[:, 0].shape != target.landmarks.shape:
        raise ValueError(f"landmark metrics take preds (B, 2, K, D) [prediction, reference] and landmarks "
                         f"(B, K, D), got {tuple(preds.shape)} and {tuple(target.landmarks.shape)}")
    return preds[:, 0], preds[:, 1]


class _LandmarkMean(SampleMean):
    """Mean of per-sample or per-(sample, landmark) values; subclasses say which."""

    def sample_values(self, preds: Tensor, target: LandmarkTarget) -> Tensor:
        return self.values(*_check(preds, target), target)

    def values(self, pred: Tensor, reference: Tensor, target: LandmarkTarget) -> Tensor:
        raise NotImplementedError


class CorrectRate(_LandmarkMean):
    """Fraction of samples the task calls correct (``target.correct``): the task's ``is_correct`` rate."""

    higher_is_better = True

    def values(self, pred, reference, target):
        return target.correct.float()


class RadialError(_LandmarkMean):
    """Mean radial error in mm over every landmark (MRE), or of landmark ``index`` alone."""

    higher_is_better = False

    def __init__(self, index: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index = index

    def values(self, pred, reference, target):
        errors = radial_errors(pred, target.landmarks, target.spacing)
        return errors if self.index is None else errors[:, self.index]


class DetectionRate(_LandmarkMean):
    """Successful detection rate: fraction of (sample, landmark) pairs within ``radius_mm`` of the truth."""

    higher_is_better = True

    def __init__(self, radius_mm: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.radius_mm = float(radius_mm)

    def values(self, pred, reference, target):
        return (radial_errors(pred, target.landmarks, target.spacing) <= self.radius_mm).double()


class LandmarkShift(_LandmarkMean):
    """Mean displacement in mm between the evaluated and the reference prediction (the clean one under attack): how
    far an attack moves the landmarks, right or wrong, so no side is worse (the worst-case checks skip it)."""

    higher_is_better = None

    def values(self, pred, reference, target):
        return radial_errors(pred, reference, target.spacing)


class LossThreshold(Metric):
    """Seed 004's tau from the per-sample losses seen (``target.loss``), gathered over DDP ranks before the robust
    estimate (a median is no sum). On the clean validation set it is the task's next loss threshold."""

    full_state_update = False
    higher_is_better = None
    skip_when_empty = True  # see medrobust.tasks.base.compute_metrics

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("losses", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: LandmarkTarget) -> None:
        _check(preds, target)
        self.losses.append(target.loss.detach().double().flatten())

    def is_empty(self) -> bool:
        return dim_zero_cat(self.losses).numel() == 0 if not isinstance(self.losses, list) or self.losses else True

    def compute(self) -> Tensor:
        if self.is_empty():
            return torch.tensor(math.nan)
        return torch.tensor(loss_threshold(dim_zero_cat(self.losses)), dtype=torch.float32)


def landmark_metrics(shift_metric: str = "landmark_shift") -> dict[str, Metric]:
    """``accuracy``, ``mre``, ``sdr_<r>mm`` for r in 2, 2.5, 3, 4 mm and ``<shift_metric>``."""
    metrics: dict[str, Metric] = {"accuracy": CorrectRate(), "mre": RadialError()}
    metrics.update({sdr_key(r): DetectionRate(r) for r in SDR_RADII_MM})
    metrics[shift_metric] = LandmarkShift()
    return metrics


def per_landmark_errors(landmark_keys: list[str]) -> dict[str, Metric]:
    """``error_<key>``: the mean radial error of each landmark (``landmark_keys``: one per landmark, usable in keys)."""
    return {f"error_{key}": RadialError(index) for index, key in enumerate(landmark_keys)}
