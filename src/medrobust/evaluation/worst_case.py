"""Two points per sample and eps: the first failure (for accuracy) and the worst loss (for every other metric).

Accuracy, the fraction of samples still correct, needs only a point that makes each sample wrong: attacks stop
early per sample and :func:`~medrobust.evaluation.curve.attack_curve` keeps that point for larger eps. A
continuous metric (MAE, RMSE, R², Dice, HD95, MRE, AUROC, sensitivity, ...) keeps counting after the task's
threshold, so it must be read where the attack pushed each sample as far as the eps allows: read at the first
failure, an MAE curve goes flat at the threshold while the truth keeps growing.

:func:`robustness_curve` computes both in one pass. For the worst-loss points it runs the attack's full-budget
form (:meth:`~medrobust.attacks.Perturbation.full_budget`: no early stop, highest-loss point returned) at each
eps on every sample, warm-started from the previous eps's worst point (a point found at a smaller eps lies
inside every larger ball, so it also stands as a candidate), and keeps per sample the point of highest task loss
(``objective.attack_loss``) among that run, the previous worst and the first-failure point. A sample the
early-stopped run left correct at an eps already had the whole budget there (for attacks that declare
``survivors_had_full_budget``: PGD, APGD, FGSM, Square, DAG, the segmentation ensemble), so only the samples it
fooled are attacked again: on a robust model that is about half of them. The accuracy points
take the worst point where it fools a sample the early-stopped run left standing, so both agree on who fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Perturbation
from medrobust.attacks.core.batch import index_batch
from medrobust.attacks.core.session import objective_values
from medrobust.attacks.core.threat import batch_view
from medrobust.evaluation.curve import attack_curve, eps_size

# which points a curve's metric was read at: the CSV's ``points`` column, the summary and W&B say it
CLEAN = "clean"  # eps 0: the clean images
FIRST_FAILURE = "first_failure"  # the early-stopped attack's points (what accuracy needs)
WORST_LOSS = "worst_loss"  # the highest-loss point per sample within each eps (what continuous metrics need)
EACH_EPS = "each_eps"  # a perturbation that seeks no errors (corruption, directional shift), applied at each eps
POINT_MEANINGS = {
    CLEAN: "the clean images",
    FIRST_FAILURE: "the attack's first-failure points (early-stopped per sample, as accuracy needs: "
                   "not the worst case for continuous metrics)",
    WORST_LOSS: "the attack's worst-loss points (its whole budget on every sample, the highest task loss "
                "within each eps kept)",
    EACH_EPS: "the perturbation applied at each strength (it seeks no errors: no worst case to keep)",
}


def points_note(attack_points: dict[str, str], success_metric: str) -> str:
    """A sentence per attack saying which points its metrics were read at (for summaries)."""
    lines = [f"Points: {success_metric} is read at each attack's first-failure points; the other metrics at"]
    lines += [f"- {attack}: {POINT_MEANINGS[kind]}" for attack, kind in sorted(attack_points.items())]
    return "\n".join(lines)


@dataclass
class CurvePoints:
    """Per eps, points ``(B, C, *spatial)`` for the success metric (``first_failure``) and for every other metric
    (``worst``), and which kind of point ``worst`` holds (:data:`WORST_LOSS`, :data:`FIRST_FAILURE` where the
    attack has no full-budget form, :data:`EACH_EPS` for perturbations that seek no errors)."""

    first_failure: list[Tensor]
    worst: list[Tensor]
    worst_kind: str


def robustness_curve(attack: Perturbation, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
                     eps_values: Sequence[float | Tensor], bounds: tuple[float, float] | None,
                     worst_case: bool = True) -> CurvePoints:
    """First-failure and worst-loss points of ``attack`` for each of ``eps_values`` (non-decreasing, model units,
    floats or per-sample ``(B,)`` tensors). ``worst_case=False``: the first-failure points serve every metric
    (the cheaper evaluation; its continuous metrics are then labelled :data:`FIRST_FAILURE`)."""
    first = attack_curve(attack, model, x, batch, objective, eps_values=eps_values, bounds=bounds)
    if not attack.seeks_errors:
        return CurvePoints(first, first, EACH_EPS)
    full = attack.full_budget() if worst_case else None
    if full is None:
        return CurvePoints(first, first, FIRST_FAILURE)
    worst, accuracy_points = _worst_points(attack, full, model, x, batch, objective, eps_values, bounds, first)
    return CurvePoints(accuracy_points, worst, WORST_LOSS)


def judge(model: Callable, objective: Any, x_adv: Tensor, batch: Mapping) -> tuple[Tensor, Tensor]:
    """Task loss ``(B,)`` and correctness ``(B,)`` at ``x_adv``, no gradients."""
    with torch.no_grad():
        return objective_values(model, objective, x_adv, dict(batch))


def keep_worse(model: Callable, objective: Any, batch: Mapping, best: Tensor, best_loss: Tensor,
               candidate: Tensor, judged: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per sample, ``candidate`` where its task loss beats ``best_loss``, else ``best``; returns the new best
    point and loss, whether each sample took the candidate, and the candidate's correctness ``(B,)``.
    ``judged``: the candidate's loss and correctness where already known."""
    loss, correct = judged or judge(model, objective, candidate, batch)
    better = loss > best_loss
    return torch.where(batch_view(better, best), candidate, best), torch.where(better, loss, best_loss), better, correct


def _worst_points(attack: Perturbation, full: Perturbation, model, x: Tensor, batch: Mapping, objective,
                  eps_values, bounds, first: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per eps, the highest-loss point per sample among the full-budget run (warm-started from the previous
    worst), the previous worst and the first-failure point (the clean point at eps 0); and the accuracy points.
    Where ``attack`` declares ``survivors_had_full_budget``, the samples its first-failure run left correct at an
    eps are not attacked again there: their first-failure point already is a full-budget point."""
    best = x.detach().clone()
    best_loss, best_correct = judge(model, objective, best, batch)
    worst, accuracy_points = [], []
    fooled = torch.zeros_like(best_correct)
    kept = best.clone()
    for eps, first_point in zip(eps_values, first):
        first_correct = best_correct
        if eps_size(eps) > 0:
            first_loss, first_correct = judge(model, objective, first_point, batch)
            run = ~first_correct if attack.survivors_had_full_budget else torch.ones_like(first_correct)
            if bool(run.any()):  # only the attacked rows are judged: the others keep their known best
                idx = run.nonzero().flatten()
                sub_batch = index_batch(batch, idx, batch_size=len(x))
                found = full.attack_from(best[idx], model, x[idx], sub_batch, objective,
                                         eps=eps[idx] if isinstance(eps, Tensor) else eps, bounds=bounds)
                rows, rows_loss, took, correct = keep_worse(model, objective, sub_batch, best[idx], best_loss[idx], found)
                best[idx], best_loss[idx] = rows, rows_loss
                best_correct[idx] = torch.where(took, correct, best_correct[idx])
            best, best_loss, took, _ = keep_worse(model, objective, batch, best, best_loss, first_point,
                                                  judged=(first_loss, first_correct))
            best_correct = torch.where(took, first_correct, best_correct)
        worst.append(best.clone())
        # accuracy: the first-failure point, or the worst point where only that one fools the sample; a sample
        # fooled at a smaller eps keeps that point (it lies inside this ball too), so the curve stays monotone
        point = torch.where(batch_view(first_correct & ~best_correct, x), best, first_point)
        point = torch.where(batch_view(fooled, x), kept, point)
        fooled = fooled | ~(first_correct & best_correct)
        kept = point
        accuracy_points.append(point)
    return worst, accuracy_points
