"""Where JSMA's saliency comes from: a classifier's logits (the target's and the others'), or any task's loss.

:func:`saliency_for` looks at the clean output once and picks one; each gives, per step, the model's verdict and
the input gradients in one forward, and turns them into moves (:mod:`medrobust.attacks.sparse.saliency`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from medrobust.attacks.classification.targeted import pick_targets
from medrobust.attacks.core.batch import attack_key
from medrobust.attacks.core.objectives import JudgedByBase
from medrobust.attacks.core.session import loss_and_grad, objective_values
from medrobust.attacks.sparse.saliency import logit_moves, loss_moves, move_effects

JSMA_TARGET = attack_key("jsma_target")  # the class each sample is pushed to, carried in the batch


class TargetLogits(JudgedByBase):
    """The task's objective seen through the target's logit ``Z_t`` ``(B,)`` (in fp32, autocast off, as every
    objective); ``others`` keeps ``sum_{j != t} Z_j`` of the same forward. Correctness is the task's."""

    others: Tensor | None = None

    def attack_loss(self, output: Tensor, batch: dict) -> Tensor:
        target = output.gather(1, batch[JSMA_TARGET][:, None])[:, 0]
        self.others = output.sum(dim=1) - target
        return target


def _grad(value: Tensor, leaf: Tensor, retain: bool = False) -> Tensor:
    """``d value.sum() / d leaf`` flattened ``(n, N)``; zeros where ``value`` does not depend on the input."""
    (grad,) = torch.autograd.grad(value.sum(), leaf, retain_graph=retain, allow_unused=True)
    return (torch.zeros_like(leaf) if grad is None else grad).flatten(1)


class LogitSaliency:
    """Classifiers (logits ``(B, K)``): the paper's map on ``alpha = dZ_t/dx`` and ``beta = sum_{j != t} dZ_j/dx``."""

    def __init__(self, objective: Any) -> None:
        self.objective = TargetLogits(objective)

    def gradients(self, model: Callable, x_adv: Tensor, batch: dict) -> tuple[Tensor, tuple[Tensor, ...]]:
        leaf = x_adv.detach().requires_grad_(True)
        target, correct = objective_values(model, self.objective, leaf, batch)
        alpha = _grad(target, leaf, retain=True)
        return correct, (alpha, _grad(self.objective.others, leaf))

    def moves(self, grads: tuple[Tensor, ...], room: Tensor, per_step: int, candidates: int):
        alpha, beta = grads
        return logit_moves(move_effects(alpha, room), move_effects(beta, room), room > 0, per_step, candidates)


class LossSaliency:
    """Any task: the effect of each move on ``objective.attack_loss``."""

    def __init__(self, objective: Any) -> None:
        self.objective = objective

    def gradients(self, model: Callable, x_adv: Tensor, batch: dict) -> tuple[Tensor, tuple[Tensor, ...]]:
        _, grad, correct = loss_and_grad(model, self.objective, x_adv, batch)
        return correct, (grad.flatten(1),)

    def moves(self, grads: tuple[Tensor, ...], room: Tensor, per_step: int, candidates: int):
        return loss_moves(move_effects(grads[0], room), room > 0, per_step)


def saliency_for(model: Callable, objective: Any, x: Tensor, batch: Mapping,
                 target: int | str) -> tuple[LogitSaliency | LossSaliency, dict]:
    """The saliency for this task, from one clean forward, and the batch it reads (with the targets).

    The logit map where the task declares ``outputs_logits`` (default True) and its output is logits ``(B, K)``,
    ``K >= 2``, against integer labels ``(B,)`` (the objective's ``label_key``): each sample pushed towards
    ``target`` (:func:`~medrobust.attacks.classification.targeted.pick_targets`; a sample whose label is that
    class towards its runner-up). Otherwise (regression, segmentation, landmarks, single logits) the loss map.
    """
    labels = batch.get(getattr(objective, "label_key", "label"))
    with torch.no_grad():
        output = model(x)
    logits = (getattr(objective, "outputs_logits", True) and isinstance(output, Tensor) and output.ndim == 2
              and output.shape[1] >= 2 and isinstance(labels, Tensor) and labels.shape == output.shape[:1]
              and not labels.is_floating_point())
    if not logits:
        return LossSaliency(objective), dict(batch)
    output = output.float()
    targets = pick_targets(output, labels, target)
    targets = torch.where(targets == labels.long(), pick_targets(output, labels, "runner_up"), targets)
    return LogitSaliency(objective), {**batch, JSMA_TARGET: targets}
