"""Per-sample attack losses on segmentation logits ``(B, K, *spatial)`` and integer masks ``(B, *spatial)``,
and the task objective seen through each (:mod:`medrobust.attacks.core.objectives` adapters).

- SegPGD (Gu et al., ECCV 2022, eq. 4): ``L_t = (1 - l_t) / N sum_{correct v} CE_v + l_t / N sum_{wrong v} CE_v``
  with ``l_t = (t - 1) / (2T)`` at step ``t`` (1-based) of ``T`` and ``N`` all voxels: early steps push the
  voxels still right, later ones keep the wrong ones wrong. (Ports that weight by ``t / 2T``, or normalize each
  sum by its own count, compute another loss.)
- CosPGD (Agnihotri et al., ICML 2024): ``1 / N sum_v cos(softmax(z_v), onehot(y_v)) CE_v`` with the cosine
  detached: voxels the model already gets wrong (small cosine) weigh less. Targeted, towards a map ``t``
  (the authors' code): ``1 / N sum_v (1 - cos(softmax(z_v), onehot(t_v))) CE(z_v, t_v)``, minimized: voxels
  already at their target weigh less.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medrobust.attacks.core.objectives import RankedLoss, StepLoss
from medrobust.attacks.segmentation.dense import DENSE_TARGET_KEY, dense_labels, predicted_right


def _voxel_mean(values: Tensor) -> Tensor:
    """``(B, *spatial)`` -> ``(B,)``: the mean over every voxel of each sample."""
    return values.flatten(1).mean(dim=1)


def segpgd_weight(step: int, steps: int) -> float:
    """SegPGD's ``l_t = (t - 1) / (2T)`` for step ``t`` (1-based) of ``T``: 0 at the first step, < 1/2 at the last."""
    if not 1 <= step <= steps:
        raise ValueError(f"SegPGD's step must be in [1, {steps}], got {step}")
    return (step - 1) / (2 * steps)


def segpgd_loss(logits: Tensor, labels: Tensor, weight: float) -> Tensor:
    """SegPGD's loss ``(B,)`` with ``weight = l_t``: ``(1 - l_t) / N`` times the CE summed over the voxels
    predicted right plus ``l_t / N`` times the CE summed over the wrong ones (``N`` all voxels of a sample).
    ``weight = 0`` is the CE of the voxels still right alone (SEA's Mask-CE, up to the normalization)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    right = predicted_right(logits.detach(), labels)
    return _voxel_mean(torch.where(right, 1.0 - weight, weight) * ce)


def softmax_cosine(logits: Tensor, classes: Tensor) -> Tensor:
    """Cosine similarity ``(B, *spatial)`` between ``softmax(logits)`` and the one-hot map of ``classes``
    ``(B, *spatial)``: ``p_c / ||p||_2`` (the one-hot vector has norm 1)."""
    p = logits.softmax(dim=1)
    return p.gather(1, classes.unsqueeze(1))[:, 0] / p.norm(dim=1)


def cospgd_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """CosPGD's loss ``(B,)``: per-voxel CE times the detached cosine between softmax and one-hot label, averaged."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    return _voxel_mean(softmax_cosine(logits.detach(), labels) * ce)


def cospgd_targeted_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Targeted CosPGD's loss ``(B,)``, to be *minimized*: per-voxel CE to the target map ``(B, *spatial)``
    times the detached ``1 - cos(softmax, onehot(target))``, averaged."""
    ce = F.cross_entropy(logits, target, reduction="none")
    return _voxel_mean((1.0 - softmax_cosine(logits.detach(), target)) * ce)


# -- the task objective seen through them (labels from batch[objective.label_key]) ------------------------------
def _labels(objective: Any, output: Tensor, batch: dict, who: str) -> Tensor:
    return dense_labels(batch[getattr(objective, "label_key", "label")], output, who)


def segpgd_objective(objective: Any) -> StepLoss:
    """``objective`` climbing SegPGD's loss of each step; points ranked by its ``attack_loss``."""
    return StepLoss(objective, lambda out, b, t, steps: segpgd_loss(out, _labels(objective, out, b, "SegPGD"),
                                                                    segpgd_weight(t, steps)))


def cospgd_objective(objective: Any, targeted: bool = False) -> RankedLoss:
    """``objective`` climbing CosPGD's loss (its points ranked by the task's ``attack_loss``) or, ``targeted``,
    descending the targeted CosPGD loss towards ``batch[DENSE_TARGET_KEY]`` (points ranked by closeness to the
    target map: minus the plain mean CE to it)."""
    if not targeted:
        return RankedLoss(objective, lambda out, b: cospgd_loss(out, _labels(objective, out, b, "CosPGD")),
                          objective.attack_loss)
    return RankedLoss(objective, lambda out, b: -cospgd_targeted_loss(out, b[DENSE_TARGET_KEY]),
                      lambda out, b: -_voxel_mean(F.cross_entropy(out, b[DENSE_TARGET_KEY], reduction="none")))
