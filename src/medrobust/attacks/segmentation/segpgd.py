"""SegPGD (Gu et al., "SegPGD: An Effective and Efficient Adversarial Attack for Evaluating and Boosting
Segmentation Robustness", ECCV 2022): PGD on a loss that moves, step by step, from the voxels still right to
the wrong ones (:func:`~medrobust.attacks.segmentation.losses.segpgd_loss`).

It is the PGD engine with a :class:`~medrobust.attacks.core.objectives.StepLoss`: the same steps, restarts,
projections, per-sample early stopping and full-budget form; only the loss differs, and the points are ranked
by the task's ``attack_loss`` so that a later step's (differently weighted) loss does not hide a worse point.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from torch import Tensor

from medrobust.attacks.core.threat import ThreatModel
from medrobust.attacks.gradient.pgd import PGD, pgd_attack
from medrobust.attacks.segmentation.dense import DENSE_OUTPUT
from medrobust.attacks.segmentation.losses import segpgd_objective


def segpgd_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel,
                  **pgd_options: Any) -> Tensor:
    """SegPGD on segmentation logits ``(B, K, *spatial)``: :func:`~medrobust.attacks.gradient.pgd.pgd_attack`
    (same keywords, ``steps`` = SegPGD's ``T``) climbing SegPGD's loss of each step against the integer masks
    ``batch[objective.label_key]`` ``(B, *spatial)``; ``is_correct`` and the ranking of points are
    ``objective``'s. Returns ``x_adv`` ``(B, C, *spatial)`` (or an AttackResult)."""
    return pgd_attack(model, x, batch, segpgd_objective(objective), threat=threat, **pgd_options)


class SegPGD(PGD):
    """SegPGD for configs (Hydra), suites and callbacks: :class:`~medrobust.attacks.PGD`'s keywords (norm,
    steps, rel_step_size, random_start, restarts, early_stop, ...), on segmentation tasks only.

    Call: ``SegPGD(steps=20)(model, x, batch, task, eps=..., bounds=...)``; ``name`` is ``"segpgd20"``.
    """

    requires = DENSE_OUTPUT

    @property
    def name(self) -> str:
        return "seg" + super().name

    def attack(self, model, x, batch, objective, *, threat: ThreatModel, **per_call: Any) -> Tensor:
        return super().attack(model, x, batch, segpgd_objective(objective), threat=threat, **per_call)
