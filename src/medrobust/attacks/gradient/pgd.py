"""PGD (Madry et al., 2018), Linf, L2 and L1, with restarts and per-sample early stopping.

L1 steps are sparse and box-aware: each moves the coordinates of largest gradient (as SLIDE, Tramer & Boneh
2019), none further than the bounds let it, passing what a coordinate cannot take to the next (the point of
Croce & Hein's "Mind the box", 2021), and the number of coordinates shrinks geometrically from
``l1_sparsity`` of the input to one three quarters of the way; each step is projected exactly onto the L1
ball inside the bounds. Equal steps on a fixed set of coordinates stall, projected onto the L1 ball, at the
mean gradient of that set (on a linear model with 4096 inputs, 76 % of the optimum with a fixed 1 %); the
shrinking set ends on the largest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, check_fraction, check_positive, without_early_stop
from medrobust.attacks.core.batch import index_batch, prepare
from medrobust.attacks.core.objectives import StepLoss
from medrobust.attacks.core.options import at_least, flag, hyperparameters
from medrobust.attacks.core.session import attack_session, loss_and_grad, objective_values
from medrobust.attacks.core.steps import ascent_step, per_sample_step, start_point
from medrobust.attacks.core.threat import ThreatModel, batch_view, constrain, linf_box
from medrobust.attacks.core.tracking import AttackResult, BestTracker, WorkingSet

L1_SPARSITY = 0.01  # the first L1 step moves 1 % of the coordinates (SLIDE's 99th percentile)
REL_STEP = 2.5  # default step: 2.5 eps / steps (Madry et al.), enough to cross the ball and come back


@hyperparameters(steps=at_least(1), rel_step_size=check_positive, random_start=flag, restarts=at_least(1),
                 early_stop=flag, l1_sparsity=check_fraction)
def pgd_attack(
    model: Callable,
    x: Tensor,
    batch: Mapping,
    objective: Any,
    *,
    threat: ThreatModel,
    steps: int = 10,
    step_size: float | Tensor | None = None,
    rel_step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    early_stop: bool = True,
    bn_eval: bool = True,
    dropout_eval: bool = True,
    return_result: bool = False,
    start: Tensor | None = None,
    l1_sparsity: float = L1_SPARSITY,
) -> Tensor | AttackResult:
    """Projected gradient ascent on ``objective.attack_loss`` inside the threat model.

    Args:
        model: the forward, ``(B, C, *spatial) -> output``.
        x: clean images ``(B, C, *spatial)``, inside ``threat.bounds``.
        batch: the batch dict (labels etc.) the objective reads; its ``"image"`` is not used.
        objective: has ``attack_loss(output, batch) -> (B,)`` and ``is_correct(output, batch) -> (B,)``. A
            :class:`~medrobust.attacks.core.objectives.StepLoss` climbs ``objective.at_step(t, steps)`` at
            step ``t`` (1-based) of each run, its points ranked by its ``attack_loss`` (SegPGD).
        threat: norm (``linf``, ``l2`` or ``l1``), eps (float or ``(B,)``, model units) and bounds.
        steps: gradient steps per run.
        step_size: absolute step, float or ``(B,)``; default ``2.5 * eps / steps``.
        rel_step_size: the step as a multiple of eps instead (not both).
        random_start: start each run from a uniform point of the ball (else from ``x``; one run only, since
            restarts from ``x`` would repeat it).
        restarts: runs from fresh random starts; the best point per sample is kept across runs.
        early_stop: a sample is done as soon as ``is_correct`` is false at a visited point (samples already
            wrong at ``x`` are done at once and return ``x``); done samples leave the working batch, so the
            forwards shrink with the survivors. Returns the first fooling point per sample, else the
            highest-loss point. ``False`` (adversarial training): every sample runs every step of every
            restart and the highest-loss point visited is returned, fooling or not.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.
        return_result: return an :class:`AttackResult` (``x_adv``, per-sample ``success``, ``loss``).
        start: where the first run starts ``(B, C, *spatial)`` (e.g. a minimum-norm attack's point), moved
            into the threat model; later restarts start as ``random_start`` says. The clean point is then
            not checked: the caller starting there knows its samples.
        l1_sparsity: L1 only: the fraction of coordinates the first step moves, in (0, 1]; later steps move
            geometrically fewer, one from three quarters of the way.

    Points are judged (loss, correctness) on the forward each gradient step makes anyway. The last iterate,
    one step past the last judged point, costs a forward of its own only where that matters: with
    ``return_result``, before another restart, and for samples whose loss already fell below an earlier
    point's. A sample whose loss was still rising at the last step returns the last iterate unjudged, as
    plain PGD does: no sample ends below its run's last iterate, and whoever evaluates the output (a suite,
    a curve) still counts a sample that point fools.

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)`` like ``x``, in the ball and the bounds (or an AttackResult).
    """
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval):
        x, batch = prepare(x, batch)
        eps = threat.eps_for(x)
        step = per_sample_step(step_size, rel_step_size, eps, REL_STEP / steps)
        tracker = BestTracker(x, prefer_success=early_stop)
        work = WorkingSet.full(x, batch, eps, step)
        if threat.max_eps() == 0:
            return _finish(tracker, model, objective, work, return_result)
        if start is not None:
            start, _ = prepare(start.to(x), {})
            start = constrain(x, start, threat.norm, eps, threat.bounds)
        if early_stop and random_start and start is None:  # from x, the first step judges the clean point
            work = _drop_fooled_at_clean(tracker, model, objective, work)
        runs = restarts if random_start else 1
        for run in range(runs):
            if len(work) == 0:
                break
            first = start if start is not None and run == 0 else start_point(work.x, threat, work.eps, random_start)
            _run(model, objective, work, threat, tracker, first, steps=steps, early_stop=early_stop,
                 judge_last=return_result or run + 1 < runs, l1_sparsity=l1_sparsity)
            if early_stop:
                work = work.keep(~tracker.success[work.idx])
    result = tracker.result()
    return result if return_result else result.x_adv


def _drop_fooled_at_clean(tracker: BestTracker, model, objective, work: WorkingSet) -> WorkingSet:
    """Record the clean point; samples the model already gets wrong need no attack."""
    with torch.no_grad():
        loss, correct = objective_values(model, objective, work.x, work.batch)
    tracker.update(work.idx, work.x, loss, correct)
    return work.keep(correct)


def _finish(tracker: BestTracker, model, objective, work: WorkingSet, return_result: bool):
    """eps == 0 everywhere: the answer is ``x``; only an :class:`AttackResult` needs a (clean) forward."""
    if return_result:
        _drop_fooled_at_clean(tracker, model, objective, work)
        return tracker.result()
    return tracker.x_adv


def _run(model, objective, work: WorkingSet, threat: ThreatModel, tracker: BestTracker, x_adv: Tensor, *,
         steps: int, early_stop: bool, judge_last: bool, l1_sparsity: float) -> None:
    """One PGD run over the working set from ``x_adv``, offering every judged point to ``tracker``."""
    box = linf_box(work.x, work.eps, threat.bounds) if threat.norm == "linf" else None
    widths = l1_widths(x_adv[0].numel(), l1_sparsity, steps)
    scheduled = objective if isinstance(objective, StepLoss) else None  # a loss per step (SegPGD's schedule)
    for i in range(steps):
        climbed = objective if scheduled is None else scheduled.at_step(i + 1, steps)
        loss, grad, correct = loss_and_grad(model, climbed, x_adv, work.batch)
        rising = tracker.update(work.idx, x_adv, loss, correct)
        if box is None:  # L2, L1: step, then back into ball and bounds
            x_adv = constrain(work.x, ascent_step(x_adv, grad, threat.norm, work.step, l1_width=widths[i],
                                                  bounds=threat.bounds), threat.norm, work.eps, threat.bounds)
        else:  # Linf: the sign step and the precomputed box, one clamp
            x_adv = torch.clamp(torch.addcmul(x_adv, batch_view(work.step, x_adv), grad.sign()), *box)
        if early_stop and not bool(correct.all()):
            rows = correct.nonzero().flatten()
            work, x_adv, rising = work.keep(rows), x_adv[rows], rising[rows]
            box = None if box is None else (box[0][rows], box[1][rows])
            if len(work) == 0:
                return
    _offer_last_iterate(model, objective, work, tracker, x_adv, judge=torch.ones_like(rising) if judge_last
                        else ~rising)


def l1_widths(size: int, sparsity: float, steps: int) -> list[int]:
    """Coordinates each L1 step moves: ``sparsity * size`` at the first, shrinking geometrically to 1 three
    quarters of the way, so that the last steps have the time to move budget onto the best coordinates."""
    first, half = max(1.0, sparsity * size), max(1, (3 * steps) // 4)
    return [max(1, round(first ** max(0.0, 1 - i / half))) for i in range(steps)]


def _offer_last_iterate(model, objective, work: WorkingSet, tracker: BestTracker, x_last: Tensor,
                        judge: Tensor) -> None:
    """Judge the last iterate with one forward on the samples ``judge`` marks; the others take it unjudged
    (their recorded loss and success stay the previous point's, which only an AttackResult would show)."""
    trusted = ~judge
    if bool(trusted.any()):
        tracker.x_adv[work.idx[trusted]] = x_last[trusted]
    if bool(judge.any()):
        batch = work.batch if bool(judge.all()) else index_batch(work.batch, judge, batch_size=len(work))
        with torch.no_grad():
            loss, correct = objective_values(model, objective, x_last[judge], batch)
        tracker.update(work.idx[judge], x_last[judge], loss, correct)


class PGD(Attack):
    """PGD with the step relative to eps, for configs (Hydra) and callbacks.

    Args (those of :func:`pgd_attack`, checked the same way, less the per-call ones):
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (sparse, box-aware steps; see the module docstring).
        steps: gradient steps per run (>= 1).
        rel_step_size: step as a multiple of eps; default ``2.5 / steps``.
        random_start: start from a uniform point of the ball.
        restarts: random restarts (>= 1), best point per sample kept.
        early_stop: per-sample early stopping (evaluation); ``False`` returns the max-loss point of every
            sample after all steps (adversarial training).
        bn_eval / dropout_eval: normalization / dropout layers in eval mode during the attack.
        l1_sparsity: L1 only: the fraction of coordinates the first step moves (see :func:`pgd_attack`).

    Call: ``PGD(steps=10)(model, x, batch, objective, eps=..., bounds=...)``; ``name`` is ``"pgd10"``
    (``"pgd10x5"`` with 5 restarts).
    """

    survivors_had_full_budget = True  # its full-budget form only drops the early stop

    functional = staticmethod(pgd_attack)

    @property
    def name(self) -> str:
        return f"pgd{self.steps}" + (f"x{self.restarts}" if self.restarts > 1 else "")

    def full_budget(self) -> "PGD":
        return without_early_stop(self)

    def attack_from(self, start: Tensor, model, x, batch, objective, *, eps, bounds) -> Tensor:
        """As a call, with the first run started from ``start`` ``(B, C, *spatial)`` (moved into the ball)."""
        return self.attack(model, x, batch, objective, threat=ThreatModel(self.norm, eps, bounds), start=start)
