"""JSMA (Papernot et al., "The limitations of deep learning in adversarial settings", EuroS&P 2016): the
saliency-map L0 attack, task-generic, and a minimum-L0 curve attack (every budget of a curve from one run)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from medrobust.attacks.classification.targeted import TARGET_RULES
from medrobust.attacks.core.base import CurveAttack
from medrobust.attacks.core.batch import index_batch, prepare
from medrobust.attacks.core.options import at_least, hyperparameters, optional
from medrobust.attacks.core.session import attack_session, objective_values
from medrobust.attacks.core.threat import Bounds, check_bounds
from medrobust.attacks.core.tracking import WorkingSet
from medrobust.attacks.sparse.budget import (
    UNCHANGED,
    ChangeLog,
    change_budget,
    l0_levels,
)
from medrobust.attacks.sparse.gradients import saliency_for
from medrobust.attacks.sparse.saliency import move_room


def _bounds(name: str, bounds: Any) -> Bounds:
    if bounds is None:
        raise ValueError("JSMA sends each changed value to an input bound and needs bounds=(low, high); got None "
                         "(an unbounded task: give the task or datamodule input_bounds)")
    return check_bounds(bounds)


def _per_step(name: str, value: Any) -> int:
    if value not in (1, 2) or isinstance(value, bool):
        raise ValueError(f"{name} must be 1 (single values) or 2 (the paper's pairs), got {value!r}")
    return int(value)


def _target(name: str, value: Any) -> int | str:
    if isinstance(value, str) and value in TARGET_RULES:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a class index >= 0 or one of {TARGET_RULES}, got {value!r}")
    return value


@hyperparameters(bounds=_bounds, max_changes=optional(at_least(1)), features_per_step=_per_step,
                 candidates=at_least(2), target=_target)
def jsma_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, bounds: Bounds,
                max_eps: float | Tensor | None = None, max_changes: int | None = None, features_per_step: int = 2,
                candidates: int = 64, target: int | str = "runner_up", return_norms: bool = False,
                return_result: bool = False, bn_eval: bool = True,
                dropout_eval: bool = True) -> Tensor | tuple[Tensor, Tensor] | ChangeLog:
    """JSMA: change input values one step at a time, each to a bound, until ``objective.is_correct`` turns false.

    Each step changes ``features_per_step`` values (one forward and, for classifiers, two backwards), chosen by
    the saliency map (:mod:`medrobust.attacks.sparse.saliency`): the paper's pair map on the logits for
    classifiers (towards ``target``), the effect on ``objective.attack_loss`` for any other task. A sample leaves
    the batch as soon as the model is wrong. When a pair made it wrong, the pair's first value alone is tried
    (one forward, on those samples): if that is enough, the second change is undone, so counts are not one too
    high. The count at first failure is the sample's L0 radius.

    Args:
        model: the forward, ``(B, C, *spatial) -> output``.
        x: clean images ``(B, C, *spatial)``, inside ``bounds``.
        batch: the batch dict the objective reads; its ``"image"`` is not used.
        objective: has ``attack_loss(output, batch) -> (B,)`` and ``is_correct(output, batch) -> (B,)``; a task
            declaring ``outputs_logits`` with logits ``(B, K)`` and integer labels gets the logit map.
        bounds: ``(low, high)``, required: every changed value goes to one of them.
        max_eps: the most values to change in this call (a whole number, or one per sample ``(B,)``).
        max_changes: a cap on every call's budget; ``None``: the eps alone, and without one (``minimal``,
            ``radii``) 5 % of a sample's values, at most 1000.
        features_per_step: 2 (the paper's pairs) or 1 (single values: one forward per change).
        candidates: pairs are searched among this many moves of largest effect on the target's logit (the
            paper's all-pairs search is O(N^2): 64 moves give 2016 pairs, whatever the image size).
        target: classifiers: ``"runner_up"`` (the likeliest wrong class of the clean logits: seed 001's untargeted
            use), ``"least_likely"`` or a class index; samples labelled with that class go to their runner-up.
            Success is still the task's ``is_correct`` turning false.
        return_norms: also return the counts ``(B,)`` (0: wrong at ``x``; ``inf``: not within the budget).
        return_result: return the :class:`~medrobust.attacks.sparse.budget.ChangeLog` instead.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)``: the first fooling point, or the point after the whole budget.
    """
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval):
        x, batch = prepare(x, batch)
        budget = change_budget(x, max_eps, max_changes)
        log = _run(model, x, batch, objective, bounds, budget, features_per_step, candidates, target)
    if return_result:
        return log
    x_adv = log.within(budget)
    return (x_adv, log.counts) if return_norms else x_adv


def _run(model, x: Tensor, batch: dict, objective, bounds: Bounds, budget: Tensor, per_step: int, candidates: int,
         target: int | str) -> ChangeLog:
    """JSMA's loop over the samples still correct and within their budget; the log of its changes."""
    low, high = bounds
    log = ChangeLog.start(x)
    saliency, batch = saliency_for(model, objective, x, batch, target)
    work = WorkingSet.full(x, batch, eps=budget, step=budget)  # eps: the budget per sample; step unused
    spent = torch.zeros_like(budget)
    last = torch.full_like(budget, -1)  # per sample, the value a pair changed second in its last step (-1: none)
    while len(work):
        rows = work.idx
        correct, grads = saliency.gradients(model, log.values[rows].view_as(work.x), work.batch)
        if not bool(correct.all()):
            _settle(model, saliency.objective, log, work, ~correct, spent, last)
        room = move_room(log.values[rows], low, high, log.changed(rows))
        moves, taken = saliency.moves(grads, room, per_step, candidates)
        left = work.eps - spent[rows]
        taken = taken & (correct & (left > 0))[:, None]
        if per_step == 2:
            taken[:, 1] &= left >= 2
        _apply(log, rows, moves, taken, spent, last, bounds)
        work = work.keep(taken[:, 0])  # done: wrong, out of budget, or stuck (no move helps)
    return log


def _settle(model, objective, log: ChangeLog, work: WorkingSet, wrong: Tensor, spent: Tensor, last: Tensor) -> None:
    """Record the counts of the samples now wrong; where a pair did it, keep only its first change if that alone
    is enough."""
    halves = wrong & (last[work.idx] >= 0)
    if bool(halves.any()):
        rows, x_flat = work.idx[halves], log.x.flatten(1)
        value = last[rows]
        point = log.values[rows].clone()
        point[torch.arange(len(rows), device=rows.device), value] = x_flat[rows, value]
        with torch.no_grad():
            _, correct = objective_values(model, objective, point.view((len(rows),) + work.x.shape[1:]),
                                          index_batch(work.batch, halves, batch_size=len(work)))
        undo, value = rows[~correct], value[~correct]
        log.values[undo, value] = x_flat[undo, value]
        log.changed_at[undo, value] = UNCHANGED
        spent[undo] -= 1
    rows = work.idx[wrong]
    log.counts[rows] = spent[rows].to(log.counts.dtype)


def _apply(log: ChangeLog, rows: Tensor, moves: Tensor, taken: Tensor, spent: Tensor, last: Tensor,
           bounds: Bounds) -> None:
    """Send the taken moves' values to their bounds, in order, logging when each changed."""
    values = log.values.shape[1]
    ends = torch.tensor(bounds, dtype=log.values.dtype, device=log.values.device)  # exactly the bounds, any dtype
    for j in range(moves.shape[1]):
        pick = taken[:, j]
        r, move = rows[pick], moves[pick, j]
        feature = move % values
        log.values[r, feature] = ends[(move < values).long()]  # moves below N go up
        log.changed_at[r, feature] = spent[r]
        spent[r] += 1
    last[rows] = torch.where(taken[:, -1], moves[:, -1] % values, -1) if moves.shape[1] == 2 else -1


class JSMA(CurveAttack):
    """JSMA for configs (Hydra), callbacks and suites; ``name`` ``"jsma"``, ``norm`` ``"l0"``: eps is the number of
    input values (pixels x channels) changed, in no other unit than a count.

    Args: as :func:`jsma_attack` (``max_changes``, ``features_per_step``, ``candidates``, ``target``, ``bn_eval``,
    ``dropout_eval``). A curve attack: :meth:`curve` reads every budget off one run (the run stops at the largest),
    ``last_radii`` then holds each sample's count at first failure; a call at one ``eps`` is a one-point curve.
    """

    name = "jsma"
    norm = "l0"
    first = "max_changes"
    functional = staticmethod(jsma_attack)

    @property
    def targeted(self) -> bool:
        """Aimed at chosen classes (a class index, the least likely): out of the masking checks' strength order."""
        return self.target != "runner_up"

    def curve(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
              eps_values: Sequence[float | Tensor], bounds: Bounds | None) -> list[Tensor]:
        """Points ``(B, C, *spatial)`` within each L0 budget of ``eps_values`` (whole, non-decreasing)."""
        if not len(eps_values):
            self.last_radii = None
            return []
        levels = l0_levels(eps_values, x)
        log = self.functional(model, x, batch, objective, bounds=bounds, max_eps=levels[-1], return_result=True,
                              **self.options)
        self.last_radii = log.counts
        return [log.within(level) for level in levels]

    def __call__(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *, eps: float | Tensor,
                 bounds: Bounds | None) -> Tensor:
        return self.curve(model, x, batch, objective, eps_values=[eps], bounds=bounds)[0]

    def attack(self, model, x, batch, objective, *, threat) -> Tensor:
        raise TypeError("JSMA's threat model is L0, which ThreatModel does not define: call it with eps= (a count)")

    def minimal(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
                bounds: Bounds | None) -> tuple[Tensor, Tensor]:
        """``(x_adv, counts)``: per sample the first fooling point and its count of changed values (``inf``: none
        within ``max_changes``)."""
        return self.functional(model, x, batch, objective, bounds=bounds, return_norms=True, **self.options)

    def radii(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *, bounds: Bounds | None) -> Tensor:
        """Per-sample L0 radius ``(B,)``: 0 if wrong at ``x``, ``inf`` if not fooled within ``max_changes``."""
        return self.minimal(model, x, batch, objective, bounds=bounds)[1]
