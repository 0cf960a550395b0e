"""APGD and APGD-T (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020), Linf and L2, on any objective, with per-sample early stopping.

APGD is PGD without a step size to tune: it starts at ``2 eps``, adds momentum (0.75) and, at checkpoints
that come closer and closer (22 %, then 3 % less each time, at least 6 % of the steps apart), halves the step
of every sample whose loss went up in at most ``rho`` of the steps since the last checkpoint, or whose step
was not halved last time and whose best loss did not improve; such a sample restarts from its best point.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from medrobust.attacks.core.base import Attack, without_early_stop
from medrobust.attacks.core.batch import TARGET_KEY, prepare
from medrobust.attacks.core.objectives import negative_margin, with_loss
from medrobust.attacks.core.options import at_least, flag, hyperparameters, norm_in
from medrobust.attacks.core.seeding import seeded
from medrobust.attacks.core.session import attack_session, loss_and_grad, objective_values
from medrobust.attacks.core.steps import ascent_step, start_point
from medrobust.attacks.core.threat import DENSE_NORMS, ThreatModel, batch_view, constrain
from medrobust.attacks.core.tracking import AttackResult, BestTracker, WorkingSet
from medrobust.losses.classification import (
    LossFallbackWarning,
    check_logits,
    cross_entropy_loss,
    dlr_loss,
    targeted_dlr_loss,
)

LOSSES = ("ce", "dlr", "margin", "default")
TARGETED_LOSSES = ("dlr", "ce")
MOMENTUM = 0.75


def check_loss(loss: str | None, targeted: bool) -> str:
    """The loss name, ``None`` meaning ``"ce"`` (``"dlr"`` when targeted); a ``ValueError`` quotes a bad one."""
    allowed = TARGETED_LOSSES if targeted else LOSSES
    if loss is None:
        return "dlr" if targeted else "ce"
    if loss not in allowed:
        kind = "targeted APGD" if targeted else "APGD"
        raise ValueError(f"unknown loss {loss!r} for {kind}; expected one of {allowed}")
    return loss


def check_rho(name: str, rho: float) -> float:
    if not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {rho!r}")
    return float(rho)


def _check_loss(options: dict) -> None:
    """The loss allowed, and its default, depend on ``targeted``."""
    options["loss"] = check_loss(options["loss"], options["targeted"])


def checkpoints(steps: int) -> tuple[int, int, int]:
    """First checkpoint interval, its decrement and its minimum, as the reference implementation rounds them."""
    return max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)


@hyperparameters(_check_loss, threat=norm_in(DENSE_NORMS, "APGD"), steps=at_least(1), restarts=at_least(1),
                 targeted=flag, n_target_classes=at_least(1), rho=check_rho, early_stop=flag)
def apgd_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel, steps: int = 100,
                loss: str | None = None, restarts: int = 1, targeted: bool = False, n_target_classes: int = 9,
                rho: float = 0.75, early_stop: bool = True, seed: int | None = None, bn_eval: bool = True,
                dropout_eval: bool = True, return_result: bool = False) -> Tensor | AttackResult:
    """APGD (APGD-T with ``targeted``) on ``objective`` inside the threat model.

    Args:
        model: the forward, ``(B, C, *spatial) -> output``.
        x: clean images ``(B, C, *spatial)``, inside ``threat.bounds``.
        batch: the batch dict the objective reads (``batch[objective.label_key or "label"]`` for the
            classification losses); its ``"image"`` is not used.
        objective: ``attack_loss``, ``is_correct`` and ``correct_margin`` ``(output, batch) -> (B,)``.
        threat: norm (``linf`` / ``l2``), eps (float or ``(B,)``, model units) and bounds.
        steps: gradient steps per run (>= 1).
        loss: ``"ce"`` (default), ``"dlr"`` (needs ``K >= 3`` logits; below, the margin loss with a
            :class:`~medrobust.losses.classification.LossFallbackWarning`), ``"margin"`` (``-correct_margin``, which must be
            differentiable: any task, binary classifiers included) or ``"default"`` (the task's own ``attack_loss``: regression,
            segmentation, ...). Targeted: ``"dlr"`` (default, targeted DLR) or ``"ce"`` (``-CE`` to the target).
        restarts: runs from fresh random starts (per target class when targeted); best point per sample kept.
        rho: a sample's step is halved at a checkpoint when its loss went up in at most ``rho`` of the steps.
        early_stop: a sample is done when ``is_correct`` turns false (samples wrong at ``x`` return ``x``);
            done samples leave the working batch, so forwards shrink with the survivors. ``False``: every
            sample runs every step and the highest-loss iterate is returned.
        targeted: APGD-T: for each of the ``n_target_classes`` classes with the highest clean logits
            (label excluded, at most ``K - 1``), ``restarts`` runs on the targeted loss. Needs logits with
            ``K >= 4``; below, one untargeted set of runs on the margin loss (with a warning).
        seed: seeds the random starts inside the call (the caller's RNG is untouched); ``None``: global RNG.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.
        return_result: return an :class:`AttackResult` (``x_adv``, ``success``, ``loss``).

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)`` like ``x``, in the ball and the bounds (or an AttackResult).
        Cost: one forward and one backward per step and run (the last iterate: a forward only), plus one
        clean forward per call.
    """
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval), seeded(seed, x.device):
        x, batch = prepare(x, batch)
        eps = threat.eps_for(x)
        tracker = BestTracker(x, prefer_success=early_stop)
        work = WorkingSet.full(x, batch, eps, 2 * eps)
        seen = {}  # the clean (fp32) output picks the loss and the targets

        def capture(output: Any, b: dict) -> Tensor:
            seen["output"] = output
            return objective.attack_loss(output, b)

        with torch.no_grad():
            clean_loss, correct = objective_values(model, with_loss(objective, capture), x, batch)
        if threat.max_eps() == 0:  # x is the answer
            tracker.update(work.idx, x, clean_loss, correct)
        elif early_stop:  # a point the model already gets wrong needs no attack (its loss is another loss's)
            wrong = ~correct
            tracker.update(work.idx[wrong], x[wrong], clean_loss[wrong], correct[wrong])
            work = work.keep(correct)
        if threat.max_eps() > 0:
            for run_objective, targets in _plan(objective, seen["output"], batch, loss, targeted, n_target_classes):
                for _ in range(restarts):
                    if len(work) == 0:
                        break
                    if targets is not None:
                        work.batch[TARGET_KEY] = targets[work.idx]
                    _run(model, run_objective, work, threat, tracker, steps=steps, rho=rho, early_stop=early_stop)
                    if early_stop:
                        work = work.keep(~tracker.success[work.idx])
    result = tracker.result()
    return result if return_result else result.x_adv


def _plan(objective: Any, output: Any, batch: dict, loss: str, targeted: bool, n_targets: int):
    """``[(objective for the runs, targets (B,) or None), ...]``: what each set of restarts climbs, given the
    clean ``output``. DLR with ``K < 3`` and APGD-T with ``K < 4`` fall back to the margin loss. An objective
    whose outputs are not class logits (``objective.outputs_logits`` false: regression) climbs its own loss,
    and its "targeted" runs climb the margin loss instead (a second, differently shaped objective)."""
    if loss == "default":
        return [(objective, None)]
    if not getattr(objective, "outputs_logits", True):  # regression, ...: CE / DLR have no meaning there
        return [(objective if not targeted else negative_margin(objective), None)]
    key = getattr(objective, "label_key", "label")
    if loss != "margin":
        if key not in batch:
            raise ValueError(f"loss {loss!r} needs integer labels batch[{key!r}]; the batch has {list(batch)}; "
                             f"use loss='default' or 'margin' for tasks without class labels")
        k = check_logits(output, f"loss {loss!r}")
        if k < (4 if targeted else 3 if loss == "dlr" else 0):
            what = "APGD-T needs >= 4 classes" if targeted else "DLR needs >= 3 classes"
            warnings.warn(f"{what}, got {k}; APGD runs untargeted on the margin loss instead", LossFallbackWarning,
                          stacklevel=3)
            loss, targeted = "margin", False
    if loss == "margin":
        return [(negative_margin(objective), None)]
    if not targeted:
        fn = cross_entropy_loss if loss == "ce" else dlr_loss
        return [(with_loss(objective, lambda out, b: fn(out, b[key])), None)]
    others = output.detach().scatter(1, batch[key].long().reshape(-1, 1), float("-inf"))
    ranked = others.topk(min(n_targets, output.shape[1] - 1), dim=1).indices  # (B, n): the closest classes first
    if loss == "dlr":
        run = with_loss(objective, lambda out, b: targeted_dlr_loss(out, b[key], b[TARGET_KEY]))
    else:
        run = with_loss(objective, lambda out, b: -F.cross_entropy(out, b[TARGET_KEY], reduction="none"))
    return [(run, ranked[:, r]) for r in range(ranked.shape[1])]


@dataclass
class _State:
    """Per-sample state of one run, indexed along the working set."""

    x_adv: Tensor
    x_prev: Tensor  # the iterate before, for the momentum term
    grad: Tensor
    x_best: Tensor  # highest-loss point of the run, where a halved step restarts from
    grad_best: Tensor
    loss_prev: Tensor
    loss_best: Tensor
    best_at_check: Tensor  # loss_best at the last checkpoint
    ups: Tensor  # steps since the last checkpoint where the loss went up
    halved: Tensor  # whether the step was halved at the last checkpoint

    def keep(self, mask: Tensor) -> "_State":
        return _State(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})


def _run(model, objective, work: WorkingSet, threat: ThreatModel, tracker: BestTracker, *,
         steps: int, rho: float, early_stop: bool) -> None:
    """One APGD run over the working set from a random start, offering every iterate to ``tracker``."""
    norm, bounds = threat.norm, threat.bounds
    work = replace(work, step=2 * work.eps)  # every run starts from the paper's 2 eps
    x_adv = start_point(work.x, threat, work.eps, True)
    loss, grad, correct = loss_and_grad(model, objective, x_adv, work.batch)
    tracker.update(work.idx, x_adv, loss, correct)
    s = _State(x_adv, x_adv, grad, x_adv, grad, loss, loss, loss.clone(), torch.zeros_like(loss, dtype=torch.long),
               torch.ones_like(correct))
    interval, decrement, minimum = checkpoints(steps)
    since_check = 0
    for i in range(steps):
        if early_stop and not bool(correct.all()):
            work, s = work.keep(correct), s.keep(correct)
            if len(work) == 0:
                return
        a = 1.0 if i == 0 else MOMENTUM  # the first step is a plain projected step (no previous iterate)
        z = constrain(work.x, ascent_step(s.x_adv, s.grad, norm, work.step), norm, work.eps, bounds)
        x_new = s.x_adv + a * (z - s.x_adv) + (1 - a) * (s.x_adv - s.x_prev)
        s.x_prev, s.x_adv = s.x_adv, constrain(work.x, x_new, norm, work.eps, bounds)
        if i == steps - 1:  # nothing will follow the last gradient: a forward is enough
            with torch.no_grad():
                loss, correct = objective_values(model, objective, s.x_adv, work.batch)
            tracker.update(work.idx, s.x_adv, loss, correct)
            return
        loss, s.grad, correct = loss_and_grad(model, objective, s.x_adv, work.batch)
        tracker.update(work.idx, s.x_adv, loss, correct)
        s.ups += (loss > s.loss_prev).long()
        s.loss_prev = loss
        better = loss > s.loss_best
        s.x_best = torch.where(batch_view(better, s.x_adv), s.x_adv, s.x_best)
        s.grad_best = torch.where(batch_view(better, s.x_adv), s.grad, s.grad_best)
        s.loss_best = torch.where(better, loss, s.loss_best)
        since_check += 1
        if since_check == interval:
            halve = (s.ups <= rho * interval) | (~s.halved & (s.loss_best <= s.best_at_check))
            work.step = torch.where(halve, work.step / 2, work.step)
            s.x_adv = torch.where(batch_view(halve, s.x_adv), s.x_best, s.x_adv)
            s.grad = torch.where(batch_view(halve, s.x_adv), s.grad_best, s.grad)
            s.halved, s.best_at_check = halve, s.loss_best.clone()
            s.ups = torch.zeros_like(s.ups)
            interval, since_check = max(interval - decrement, minimum), 0


class APGD(Attack):
    """APGD / APGD-T for configs (Hydra) and callbacks; see :func:`apgd_attack`.

    Args (those of :func:`apgd_attack`, checked the same way):
        norm: ``"linf"`` or ``"l2"``.
        steps: gradient steps per run (>= 1); the paper uses 100.
        loss: ``"ce"``, ``"dlr"``, ``"margin"``, ``"default"`` (the task's ``attack_loss``); targeted:
            ``"dlr"`` or ``"ce"``. ``None``: ``"ce"``, or ``"dlr"`` when targeted.
        restarts: random restarts (per target class when targeted).
        targeted: APGD-T over the ``n_target_classes`` most likely wrong classes.
        rho: the step-halving threshold.
        early_stop: per-sample early stopping (evaluation); ``False``: max-loss point (training).
        seed: seeds the random starts of each call (``None``: the global RNG).
        bn_eval / dropout_eval: normalization / dropout layers in eval mode during the attack.

    ``name``: ``"apgd-ce"``, ``"apgd-dlr"``, ``"apgd-margin"``, ``"apgd"`` (task loss), ``"apgd-t"`` (targeted
    DLR), ``"apgd-t-ce"``.
    """

    survivors_had_full_budget = True  # its full-budget form only drops the early stop

    functional = staticmethod(apgd_attack)

    @property
    def name(self) -> str:
        if self.targeted:
            return "apgd-t" if self.loss == "dlr" else "apgd-t-ce"
        return "apgd" if self.loss == "default" else f"apgd-{self.loss}"

    @property
    def climbs_own_loss(self) -> bool:
        return self.loss != "default"

    def full_budget(self) -> "APGD":
        return without_early_stop(self)
