"""Carlini & Wagner L2 ("Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import check_positive
from medrobust.attacks.core.batch import prepare
from medrobust.attacks.core.objectives import MarginObjective
from medrobust.attacks.core.options import at_least, hyperparameters, non_negative
from medrobust.attacks.core.session import attack_session, loss_and_grad, objective_values
from medrobust.attacks.core.threat import Bounds, batch_view, lp_norm
from medrobust.attacks.core.tracking import BestTracker, WorkingSet
from medrobust.attacks.minimum_norm.base import CHECKS, MinimumNormAttack, offer_smallest

BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as the original code
TANH_MARGIN = 1e-6  # keep atanh finite for clean pixels on the bounds
NO_UPPER = 1e10  # "no successful c yet" in the binary search


@hyperparameters(**CHECKS, binary_search_steps=at_least(1), lr=check_positive, kappa=non_negative,
                 initial_const=check_positive)
def cw_l2_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, bounds: Bounds | None,
                 binary_search_steps: int = 5, steps: int = 100, lr: float = 0.01, kappa: float = 0.0,
                 initial_const: float = 1e-2, return_norms: bool = False, bn_eval: bool = True,
                 dropout_eval: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """C&W L2: minimize ``||x_adv - x||_2^2 + c * max(margin(x_adv), -kappa)`` with Adam, binary search on ``c``.

    With ``bounds`` the optimization variable is ``w``, ``x_adv = low + (high - low) (tanh(w) + 1) / 2`` (the
    box constraint for free); with ``bounds=None`` it is the perturbation itself. Per sample, ``c`` starts at
    ``initial_const`` and is bisected between the largest failing and the smallest succeeding value (times
    10 while none succeeded). ``margin`` is ``objective.correct_margin``; gradients w.r.t. the input come
    from the engine and are chained through the tanh by hand (a per-sample Adam, so samples can leave).

    Args:
        model: the forward, ``(B, C, *spatial) -> output``.
        x: clean images ``(B, C, *spatial)``, inside ``bounds``.
        batch: the batch dict the objective reads; its ``"image"`` is not used.
        objective: has ``correct_margin(output, batch) -> (B,)`` and ``is_correct(output, batch) -> (B,)``.
        bounds: ``(low, high)`` or ``None`` (required: never assumed).
        binary_search_steps: rounds of the search on ``c``, each a fresh optimization from ``x``.
        steps: Adam steps per round (one forward + backward each).
        lr: Adam's learning rate, in units of ``w`` (tanh space: ``(high - low) / 2`` per unit near the
            centre) or of the input (``bounds=None``).
        kappa: confidence: a round succeeds where ``margin <= -kappa`` was reached.
        initial_const: the first ``c``.
        return_norms: also return the L2 norms ``(B,)``.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)``: per sample the smallest-L2 fooling point seen over all rounds,
        ``x`` where the clean point is wrong (norm 0) or none was found (norm ``inf``); with
        ``return_norms``, ``(x_adv, norms)`` (float32; float64 for float64 images).
    """
    margin = MarginObjective(objective)
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval):
        x, batch = prepare(x, batch)
        tracker = BestTracker(x, prefer_success=False)  # scored by -norm: keeps the smallest fooling point
        const = torch.full((x.shape[0],), initial_const, dtype=x.dtype, device=x.device)
        work = WorkingSet.full(x, batch, eps=const, step=const)  # eps: c; step unused
        with torch.no_grad():  # wrong at x: norm 0, nothing to search
            _, correct = objective_values(model, margin, x, batch)
        offer_smallest(tracker, work.idx, x, torch.zeros_like(const), ~correct)
        work = work.keep(correct)
        lower, upper = torch.zeros_like(work.eps), torch.full_like(work.eps, NO_UPPER)
        for _ in range(binary_search_steps if len(work) else 0):
            w = _to_w(work.x, bounds)
            moment, second = torch.zeros_like(w), torch.zeros_like(w)
            succeeded = torch.zeros_like(work.eps, dtype=torch.bool)
            for t in range(1, steps + 1):
                x_adv, dx_dw = _to_x(work.x, w, bounds)
                value, grad, correct = loss_and_grad(model, margin, x_adv, work.batch)
                offer_smallest(tracker, work.idx, x_adv, lp_norm(x_adv - work.x, "l2"), ~correct)
                value = value.to(x.dtype)
                succeeded |= ~correct & (value <= -kappa)
                # d/dx of ||x_adv - x||^2 + c * max(margin, -kappa), chained to w
                active = batch_view((value > -kappa).to(x.dtype), grad)
                g = (2 * (x_adv - work.x) + batch_view(work.eps, grad) * active * grad) * dx_dw
                moment = BETAS[0] * moment + (1 - BETAS[0]) * g
                second = BETAS[1] * second + (1 - BETAS[1]) * g * g
                step = lr * math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)
                w = w - step * moment / (second.sqrt() + ADAM_EPS)
            # bisect c: down where this round succeeded, up (x10 until a success) where it did not
            upper = torch.where(succeeded, torch.minimum(upper, work.eps), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, work.eps))
            work.eps = torch.where(upper < NO_UPPER, (lower + upper) / 2, work.eps * 10)
    x_adv = tracker.x_adv
    return (x_adv, -tracker.loss) if return_norms else x_adv


def _to_w(x: Tensor, bounds: Bounds | None) -> Tensor:
    """The optimization variable at ``x``: ``atanh`` of ``x`` scaled to ``(-1, 1)``, or a zero perturbation."""
    if bounds is None:
        return torch.zeros_like(x)
    low, high = bounds
    return torch.atanh(((x - low) / (high - low) * 2 - 1).clamp(-1 + TANH_MARGIN, 1 - TANH_MARGIN))


def _to_x(x: Tensor, w: Tensor, bounds: Bounds | None) -> tuple[Tensor, Tensor]:
    """The point ``x_adv`` for ``w`` and ``d x_adv / d w`` (elementwise)."""
    if bounds is None:
        return x + w, torch.ones_like(w)
    low, high = bounds
    tanh = torch.tanh(w)
    half = (high - low) / 2
    return low + half * (tanh + 1), half * (1 - tanh * tanh)


class CWL2(MinimumNormAttack):
    """C&W L2 for configs (Hydra), callbacks and suites; ``name`` ``"cw-l2"``, ``norm`` ``"l2"``.

    Args: as :func:`cw_l2_attack`. ``minimal`` / ``radii`` / fixed-eps call: see
    :class:`~medrobust.attacks.minimum_norm.base.MinimumNormAttack`.
    """

    name = "cw-l2"
    norm = "l2"
    functional = staticmethod(cw_l2_attack)
    first = "binary_search_steps"
