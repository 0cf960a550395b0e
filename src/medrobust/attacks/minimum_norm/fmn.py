"""FMN (Pintor et al., "Fast Minimum-norm Adversarial Attacks through Adaptive Norm Constraints", NeurIPS 2021)
in Linf, L2 and L1."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import check_positive
from medrobust.attacks.core.batch import prepare
from medrobust.attacks.core.objectives import MarginObjective
from medrobust.attacks.core.options import hyperparameters, norm_in
from medrobust.attacks.core.session import attack_session, loss_and_grad, objective_values
from medrobust.attacks.core.threat import (
    Bounds,
    ascent_direction,
    batch_view,
    constrain,
    lp_norm,
)
from medrobust.attacks.core.tracking import BestTracker, WorkingSet
from medrobust.attacks.minimum_norm.base import CHECKS, MinimumNormAttack, dual_norm, norm_cap, offer_smallest
from medrobust.attacks.minimum_norm.deepfool import deepfool_attack

LINE_SEARCH_STEPS = 4  # regula falsi steps shrinking a given starting point towards x (adv_lib bisects 10 times)


def _check_gamma(name: str, gamma: float) -> float:
    if not 0 < float(gamma) < 1:
        raise ValueError(f"{name} must be in (0, 1), got {gamma!r}")
    return float(gamma)


def _check_init(name: str, init: str | Tensor | None) -> str | Tensor | None:
    if isinstance(init, str) and init != "deepfool":  # starting points are checked against the images
        raise ValueError(f"{name} must be 'deepfool', None or starting points (B, C, *spatial); got {init!r}")
    return init


# -- FMN -----------------------------------------------------------------------------------------------
@hyperparameters(**CHECKS, norm=norm_in(), alpha_init=check_positive, alpha_final=check_positive,
                 gamma_init=_check_gamma, gamma_final=_check_gamma, init=_check_init)
def fmn_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, bounds: Bounds | None,
               norm: str = "linf", steps: int = 100, alpha_init: float = 1.0, alpha_final: float | None = None,
               gamma_init: float = 0.05, gamma_final: float = 0.001, max_eps: float | Tensor | None = None,
               init: str | Tensor | None = "deepfool", return_norms: bool = False, bn_eval: bool = True,
               dropout_eval: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """Fast Minimum-Norm attack: the smallest perturbation per sample that makes the model wrong.

    Each step descends ``objective.correct_margin`` with a unit-L2 gradient step of length ``alpha`` inside
    an eps-ball whose radius adapts per sample: it shrinks by ``(1 - gamma)`` (and to the best norm so far)
    while the iterate fools the model, grows by ``(1 + gamma)`` after a first success, and before any
    success jumps to the linearized boundary, ``||delta|| + |margin| / ||grad margin||_dual``. ``alpha``
    and ``gamma`` follow cosine annealing from their initial to their final values, as in the paper.

    Args:
        model: the forward, ``(B, C, *spatial) -> output``.
        x: clean images ``(B, C, *spatial)``, inside ``bounds``.
        batch: the batch dict the objective reads (labels, targets, ...); its ``"image"`` is not used.
        objective: has ``correct_margin(output, batch) -> (B,)`` (> 0 exactly where ``is_correct``) and
            ``is_correct(output, batch) -> (B,)``, which decides success.
        bounds: ``(low, high)`` of valid inputs, or ``None`` when unbounded (required: never assumed).
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (the ball's projection: clipping, scaling, soft thresholding).
        steps: gradient steps (one forward + backward each, on the samples still under attack).
        alpha_init / alpha_final: step length in model units (L2 length of the step, for both norms, as the
            paper); ``alpha_final`` defaults to ``alpha_init / 100``. The paper's 1.0 suits ``[0, 1]``-scaled
            images; scale it with the input range.
        gamma_init / gamma_final: relative eps-ball update, in (0, 1).
        max_eps: search no farther than this norm (float or ``(B,)``); samples not fooled within it get
            norm ``inf``. Bounds cap the search too.
        init: where the search starts. ``"deepfool"`` (default): from :func:`deepfool_attack`'s point in the
            same norm, for the samples it fools. FMN is local: from ``x`` it descends the margin of the
            runner-up class and can settle on that class's boundary when another one is nearer (10-30 % too
            far on multi-class linear models); DeepFool's multi-class step picks the nearest class. ``None``:
            the paper's start, ``x``. A tensor ``(B, C, *spatial)``: given starting points (adv_lib's
            ``starting_points``); those that fool the model are used, first shrunk towards ``x`` by a line
            search (6 forwards). A used start sets the initial eps; DeepFool's norms also tell which samples
            are wrong at ``x``, so those never enter FMN's loop.
        return_norms: also return the norms ``(B,)``.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)``: per sample the smallest fooling point found, ``x`` itself
        where the clean point is already wrong (norm 0) or where none was found (norm ``inf``); with
        ``return_norms``, ``(x_adv, norms)``, norms in float32 (float64 for float64 images).
    """
    alpha_final = alpha_init / 100 if alpha_final is None else alpha_final
    margin = MarginObjective(objective)
    start, start_norms = init, None
    if isinstance(init, str):  # "deepfool" (the checks let no other string through)
        # its norms say which points fool (finite) and which samples are wrong at x (0): no forward to re-check
        start, start_norms = deepfool_attack(model, x, batch, objective, bounds=bounds, norm=norm,
                                             return_norms=True, bn_eval=bn_eval, dropout_eval=dropout_eval)
    elif init is not None and (not isinstance(init, Tensor) or init.shape != x.shape):
        raise ValueError(f"starting points must have the images' shape {tuple(x.shape)}, got "
                         f"{tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__}")
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval):
        x, batch = prepare(x, batch)
        # the tracker's "loss" is -norm of fooling points: it keeps the smallest (x, norm inf, while none)
        tracker = BestTracker(x, prefer_success=False)
        cap = norm_cap(x, norm, bounds, max_eps)
        # FMN's step is common to all samples; WorkingSet.step is unused
        work = WorkingSet.full(x, batch, eps=cap, step=torch.zeros_like(cap))
        work, delta, epsilon, found = _start(model, margin, work, start, start_norms, norm, tracker)
        for i in range(steps if len(work) else 0):
            cosine = (1 + math.cos(math.pi * i / steps)) / 2
            alpha = alpha_final + (alpha_init - alpha_final) * cosine
            gamma = gamma_final + (gamma_init - gamma_final) * cosine
            x_adv = work.x + delta
            value, grad, correct = loss_and_grad(model, margin, x_adv, work.batch)
            delta_norm = lp_norm(delta, norm)
            offer_smallest(tracker, work.idx, x_adv, delta_norm, ~correct)
            if i == 0 and bool(((delta_norm == 0) & ~correct).any()):  # wrong at x: norm 0, nothing to search
                keep = (delta_norm > 0) | correct
                work, x_adv, delta, value, grad = work.keep(keep), x_adv[keep], delta[keep], value[keep], grad[keep]
                correct, epsilon, found, delta_norm = correct[keep], epsilon[keep], found[keep], delta_norm[keep]
                if len(work) == 0:
                    break
            found |= ~correct
            best = -tracker.loss[work.idx].to(delta.dtype)
            # a little past the linearized boundary: landing exactly on it (a linear model) ties the margin
            # at 0, and without a success the ball would never grow
            distance = value.abs().to(delta.dtype) / dual_norm(grad, norm).clamp_min(1e-12)
            boundary = delta_norm + (1 + gamma) * distance
            epsilon = torch.where(~correct, torch.minimum(epsilon * (1 - gamma), best),
                                  torch.where(found, epsilon * (1 + gamma), boundary))
            epsilon = torch.minimum(epsilon, work.eps)
            # descend the margin: the paper's unit-L2 step for every norm, then back into ball and bounds
            x_adv = x_adv + alpha * ascent_direction(-grad, "l2")
            delta = constrain(work.x, x_adv, norm, epsilon, bounds) - work.x
        if len(work):
            with torch.no_grad():  # the last iterate has not been looked at yet
                _, correct = objective_values(model, margin, work.x + delta, work.batch)
            offer_smallest(tracker, work.idx, work.x + delta, lp_norm(delta, norm), ~correct)
    x_adv = tracker.x_adv
    return (x_adv, -tracker.loss) if return_norms else x_adv


def _start(model, margin, work: WorkingSet, start: Tensor | None, start_norms: Tensor | None, norm: str,
           tracker: BestTracker):
    """FMN's working set and initial ``(delta, epsilon, found)`` per sample.

    Without ``start``: every sample, ``(0, inf, False)``. From DeepFool (``start_norms`` given: finite where its
    point fools, 0 where the model is wrong at ``x``): samples wrong at ``x`` are recorded at norm 0 and leave;
    a fooling point within the norm cap is used as it is (DeepFool stops just past its boundary estimate) and
    sets ``(delta, its norm, True)``; elsewhere ``(0, inf, False)``. Given points: one forward finds which fool,
    and those are first shrunk towards ``x`` (:func:`_line_search`, still fooling).
    """
    delta = torch.zeros_like(work.x)
    epsilon = torch.full_like(work.eps, math.inf)
    if start is None:
        return work, delta, epsilon, torch.zeros_like(epsilon, dtype=torch.bool)
    start, _ = prepare(start.to(work.x), {})
    direction = start - work.x
    given = start_norms is None
    if given:
        with torch.no_grad():
            _, correct = objective_values(model, margin, start, work.batch)
        start_norms = torch.where(correct, math.inf, lp_norm(direction, norm))
    fools = torch.isfinite(start_norms) & (lp_norm(direction, norm) <= work.eps)
    wrong_at_x = fools & (start_norms == 0)
    offer_smallest(tracker, work.idx, work.x, torch.zeros_like(work.eps), wrong_at_x)
    usable = fools & ~wrong_at_x
    scale = usable.to(work.eps.dtype)
    if given and bool(usable.any()):
        scale[usable] = _line_search(model, margin, work.keep(usable), direction[usable])
    delta = batch_view(scale, direction) * direction
    norms = lp_norm(delta, norm)
    offer_smallest(tracker, work.idx, work.x + delta, norms, usable)
    keep = ~wrong_at_x
    return work.keep(keep), delta[keep], torch.where(usable, norms, epsilon)[keep], usable[keep]


def _line_search(model, margin, sub: WorkingSet, direction: Tensor) -> Tensor:
    """Per sample, a ``t`` in (0, 1] with ``x + t * direction`` still fooling, as small as a few forwards find.

    Regula falsi on the margin along the segment (``t = 0`` right, ``t = 1`` fooling), Illinois-style: an end
    kept twice running has its margin halved, so both ends close in. Each point is aimed a hair past the
    chord's zero, so on a linear margin the first one already fools at the boundary. Returns the fooling end.
    """
    low, high = torch.zeros_like(sub.eps), torch.ones_like(sub.eps)
    with torch.no_grad():
        m_low = objective_values(model, margin, sub.x, sub.batch)[0].to(low).clamp_min(0)
        m_high = objective_values(model, margin, sub.x + direction, sub.batch)[0].to(low).clamp_max(0)
        kept_high = torch.zeros_like(low, dtype=torch.bool)  # whether the last step kept the fooling end
        for i in range(LINE_SEARCH_STEPS):
            zero = low + (high - low) * m_low / (m_low - m_high).clamp_min(torch.finfo(low.dtype).tiny)
            t = torch.minimum(zero + 1e-3 * (high - low), high)
            m, correct = objective_values(model, margin, sub.x + batch_view(t, sub.x) * direction, sub.batch)
            m = m.to(low)
            if i > 0:  # Illinois: halve the margin of an end kept twice running
                m_high = torch.where(correct & kept_high, m_high / 2, m_high)
                m_low = torch.where(~correct & ~kept_high, m_low / 2, m_low)
            low, m_low = torch.where(correct, t, low), torch.where(correct, m.clamp_min(0), m_low)
            high, m_high = torch.where(correct, high, t), torch.where(correct, m_high, m.clamp_max(0))
            kept_high = correct
    return high


class FMN(MinimumNormAttack):
    """FMN for configs (Hydra), callbacks and suites; ``name`` ``"fmn"``.

    Args: as :func:`fmn_attack` (``norm``, ``steps``, ``alpha_init``, ``alpha_final``, ``gamma_init``,
    ``gamma_final``, ``init`` (``"deepfool"`` or ``None``), ``bn_eval``, ``dropout_eval``).

    ``minimal(model, x, batch, objective, bounds=...) -> (x_min, norms)``, ``radii(...) -> norms`` and, as
    a fixed-eps attack, ``FMN()(model, x, batch, objective, eps=..., bounds=...)``: the minimal point where
    its norm <= eps, else that point projected onto the eps-ball (see :class:`MinimumNormAttack`).
    """

    name = "fmn"
    functional = staticmethod(fmn_attack)
