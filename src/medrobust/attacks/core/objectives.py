"""Objective adapters: a task's objective seen through another loss, its margin, or its prediction.

Every attack that climbs something other than ``objective.attack_loss`` wraps the objective with one of these
(the one module for them); correctness (``is_correct``) always stays the task's own, so success is judged
exactly as the task judges it whatever the attacker climbs.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor


def require_margin(objective: Any, who: str) -> Any:
    """``objective`` if it has ``correct_margin(output, batch) -> (B,)``, else a ``TypeError`` naming ``who`` needs it."""
    if not callable(getattr(objective, "correct_margin", None)):
        raise TypeError(f"{who} needs an objective with correct_margin(output, batch) -> (B,) "
                        f"(> 0 exactly where is_correct); {type(objective).__name__} has none")
    return objective


class WithLoss:
    """An objective whose ``attack_loss`` is ``loss_fn(output, batch)``; correctness comes from ``base``.

    ``is_correct`` and ``correct_margin`` are the base objective's, so early stopping and success are judged
    exactly as the task judges them whatever loss the attacker climbs. ``label_key`` is the base's (default
    ``"label"``).
    """

    def __init__(self, base: Any, loss_fn: Callable[[Any, dict], Tensor]) -> None:
        self.base = base
        self.loss_fn = loss_fn
        self.label_key = getattr(base, "label_key", "label")

    def attack_loss(self, output: Any, batch: dict) -> Tensor:
        return self.loss_fn(output, batch)

    def is_correct(self, output: Any, batch: dict) -> Tensor:
        return self.base.is_correct(output, batch)

    def correct_margin(self, output: Any, batch: dict) -> Tensor:
        return self.base.correct_margin(output, batch)

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
