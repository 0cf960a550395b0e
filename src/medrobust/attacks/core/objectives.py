"""Objective adapters: a task's objective seen through another loss (fixed, or one per step), its margin, or
its prediction.

Every attack that climbs something other than ``objective.attack_loss`` wraps the objective with one of these
(the one module for them); correctness (``is_correct``) always stays the task's own, so success is judged
exactly as the task judges it whatever the attacker climbs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def require_margin(objective: Any, who: str) -> Any:
    """``objective`` if it has ``correct_margin(output, batch) -> (B,)``, else a ``TypeError`` naming ``who`` needs it."""
    if not callable(getattr(objective, "correct_margin", None)):
        raise TypeError(f"{who} needs an objective with correct_margin(output, batch) -> (B,) "
                        f"(> 0 exactly where is_correct); {type(objective).__name__} has none")
    return objective


class JudgedByBase:
    """Correctness (``is_correct``, ``correct_margin``) delegated to ``self.base``: the task's own, whatever
    loss an adapter climbs. ``label_key`` is the base's (default ``"label"``)."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.label_key = getattr(base, "label_key", "label")

    def is_correct(self, output: Any, batch: dict) -> Tensor:
        return self.base.is_correct(output, batch)

    def correct_margin(self, output: Any, batch: dict) -> Tensor:
        return self.base.correct_margin(output, batch)


class WithLoss(JudgedByBase):
    """An objective whose ``attack_loss`` is ``loss_fn(output, batch)``; correctness comes from ``base``.

    ``is_correct`` and ``correct_margin`` are the base objective's, so early stopping and success are judged
    exactly as the task judges them whatever loss the attacker climbs. ``label_key`` is the base's (default
    ``"label"``).
    """

    def __init__(self, base: Any, loss_fn: Callable[[Any, dict], Tensor]) -> None:
        super().__init__(base)
        self.loss_fn = loss_fn

    def attack_loss(self, output: Any, batch: dict) -> Tensor:
        return self.loss_fn(output, batch)

    def __repr__(self) -> str:
        name = getattr(self.loss_fn, "__name__", repr(self.loss_fn))
        return f"WithLoss({self.base!r}, {name})"


def with_loss(objective: Any, loss_fn: Callable[[Any, dict], Tensor]) -> WithLoss:
    """``objective`` with ``attack_loss = loss_fn(output, batch) -> (B,)``, e.g.
    ``with_loss(task, lambda out, b: dlr_loss(out, b["label"]))``; see :class:`WithLoss`."""
    return WithLoss(objective, loss_fn)


def negative_margin(objective: Any, who: str = "loss 'margin'") -> WithLoss:
    """``objective`` climbing ``-correct_margin`` (> 0 exactly where the model is wrong): the margin loss."""
    require_margin(objective, who)
    return with_loss(objective, lambda out, b: -objective.correct_margin(out, b))


class RankedLoss(JudgedByBase):
    """An objective that climbs one loss and ranks points by another, from the same forward.

    ``attack_loss`` has the *value* of ``rank(output, batch) -> (B,)`` (what best-point tracking, step-size
    control and early-stop bookkeeping compare) and the *gradient* of ``climb(output, batch) -> (B,)`` (what the
    attack steps along): ``rank.detach() + (climb - climb.detach())``. Losses like SegPGD's and CosPGD's fall
    as voxels flip (the flipped ones weigh less), so the highest-climb point would be an early one; ranked by
    the task's loss or the Dice margin, the attack keeps the point that is worst for the task. Correctness is
    ``base``'s.
    """

    def __init__(self, base: Any, climb: Callable[[Any, dict], Tensor], rank: Callable[[Any, dict], Tensor]) -> None:
        super().__init__(base)
        self.climb, self.rank = climb, rank

    def attack_loss(self, output: Any, batch: dict) -> Tensor:
        climbed = self.climb(output, batch)
        with torch.no_grad():
            ranked = self.rank(output, batch)
        return ranked + (climbed - climbed.detach())


class StepLoss(JudgedByBase):
    """An objective whose climbed loss depends on the step: at step ``t`` of ``T`` (1-based) an iterative attack
    climbs ``loss_fn(output, batch, t, T) -> (B,)`` (SegPGD's schedule), through :meth:`at_step`.

    The PGD engine asks every :class:`StepLoss` for :meth:`at_step` each step. Everywhere else (the clean point,
    the last iterate, attacks without steps) the objective is ``base`` seen through ``rank`` (default: its
    ``attack_loss``), which is also what the points are ranked by at every step (see :class:`RankedLoss`), so
    points of different steps compare on one scale. Correctness is ``base``'s.
    """

    def __init__(self, base: Any, loss_fn: Callable[[Any, dict, int, int], Tensor],
                 rank: Callable[[Any, dict], Tensor] | None = None) -> None:
        super().__init__(base)
        self.loss_fn = loss_fn
        self.rank = base.attack_loss if rank is None else rank

    def at_step(self, step: int, steps: int) -> RankedLoss:
        """The objective of step ``step`` (1-based) of ``steps``: climbs ``loss_fn`` there, ranks by ``rank``."""
        return RankedLoss(self.base, lambda out, b: self.loss_fn(out, b, step, steps), self.rank)

    def attack_loss(self, output: Any, batch: dict) -> Tensor:
        return self.rank(output, batch)


class MarginObjective:
    """``objective`` seen through its margin: ``attack_loss`` is ``objective.correct_margin`` ``(B,)``.

    Minimum-norm attacks (FMN, DeepFool, C&W) *descend* the margin (> 0 exactly where ``is_correct``), so they
    get its value and input gradient from :func:`loss_and_grad` / :func:`objective_values` unchanged.
    ``output`` keeps the last fp32 output the margin was computed from (DeepFool linearizes every logit).
    """

    def __init__(self, objective: Any) -> None:
        self.objective = require_margin(objective, "minimum-norm attacks")
        self.output: Any = None

    def attack_loss(self, output: Any, batch: dict) -> Tensor:
        self.output = output
        return self.objective.correct_margin(output, batch)

    def is_correct(self, output: Any, batch: dict) -> Tensor:
        return self.objective.is_correct(output, batch)


class PredictionObjective:
    """A regressor's ``prediction(output, batch) -> (B,)`` as ``attack_loss`` (so the engine evaluates it in
    fp32 with autocast off), its ``is_correct`` as is."""

    def __init__(self, objective: Any) -> None:
        if not callable(getattr(objective, "prediction", None)):
            raise TypeError(f"this attack moves a regressor's predictions and needs an objective with "
                            f"prediction(output, batch) -> (B,); {type(objective).__name__} has none")
        self.objective = objective

    def attack_loss(self, output: Any, batch: dict) -> Tensor:
        return self.objective.prediction(output, batch)

    def is_correct(self, output: Any, batch: dict) -> Tensor:
        return self.objective.is_correct(output, batch)
