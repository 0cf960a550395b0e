"""Minimum-norm attacks' common interface and the helpers they share.

A minimum-norm attack answers "how far is each sample from being wrong?": per sample, the smallest
perturbation it finds that makes ``objective.is_correct`` false, and that perturbation's norm (its estimate of
the robustness radius; ``0`` where the clean point is already wrong, ``inf`` where nothing was found). It works
on ``objective.correct_margin`` (> 0 exactly where the model is right), so it serves classifiers
(``z_y - max_{j != y} z_j``) and loss-defined tasks (``tau - |error|``) alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack
from medrobust.attacks.core.batch import prepare
from medrobust.attacks.core.options import at_least
from medrobust.attacks.core.threat import Bounds, ThreatModel, check_bounds, constrain, lp_norm
from medrobust.attacks.core.tracking import BestTracker

DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}
# what every minimum-norm functional form checks (``bounds`` is required: never assumed)
CHECKS = {"bounds": lambda name, bounds: check_bounds(bounds), "steps": at_least(1)}


def dual_norm(grad: Tensor, norm: str) -> Tensor:
    """Per-sample dual norm ``(B,)`` of ``grad`` ``(B, C, *spatial)``: L1 for Linf, L2 for L2, Linf for L1.

    The distance from ``x`` to the zero set of a linear ``f`` is ``|f(x)| / ||grad f||_dual``.
    """
    return lp_norm(grad, DUAL[norm])


def norm_cap(x: Tensor, norm: str, bounds: Bounds | None, max_eps: float | Tensor | None) -> Tensor:
    """Largest norm worth searching per sample ``(B,)``: the farthest corner of ``bounds`` and ``max_eps``."""
    cap = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
    if bounds is not None:  # no allowed point is farther from x than the farthest corner of the box
        cap = lp_norm(torch.maximum(x - bounds[0], bounds[1] - x), norm)
    if max_eps is not None:
        limit = torch.as_tensor(max_eps, dtype=x.dtype, device=x.device).expand_as(cap)
        if bool((limit < 0).any()) or bool(limit.isnan().any()):
            raise ValueError(f"max_eps must be >= 0, got {max_eps!r}")
        cap = torch.minimum(cap, limit)
    return cap


def offer_smallest(tracker: BestTracker, idx: Tensor, x_adv: Tensor, norms: Tensor, fooled: Tensor) -> None:
    """Offer the fooling points among ``x_adv`` to a ``prefer_success=False`` tracker scored by ``-norm``.

    The tracker then keeps, per sample, the smallest-norm fooling point seen; ``-tracker.loss`` is that norm
    (``inf`` while none was seen).
    """
    if bool(fooled.any()):
        tracker.update(idx[fooled], x_adv[fooled], -norms[fooled], torch.zeros_like(fooled[fooled]))


class MinimumNormAttack(Attack):
    """Base of the minimum-norm attacks (FMN, DeepFool, C&W).

    Subclasses declare their functional form (``functional``, see :class:`~medrobust.attacks.core.base.Attack`),
    which :meth:`minimal` calls with ``return_norms=True``. Three ways to use one:

    - :meth:`minimal`: the smallest fooling point found per sample and its norm;
    - :meth:`radii`: the norms alone, the per-sample robustness radii (robust accuracy at eps is the fraction
      of radii > eps);
    - as a fixed-eps attack, ``attack(model, x, batch, objective, eps=..., bounds=...)``: per sample, the
      minimal point when its norm <= eps, else that point projected onto the eps-ball (then clamped into
      ``bounds``), which keeps the threat model but rarely fools; ``x`` where no fooling point was found.
    """

    def minimal(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
                bounds: Bounds | None, **per_call: Any) -> tuple[Tensor, Tensor]:
        """``(x_min (B, C, *spatial), norms (B,))``: see :func:`fmn_attack`'s ``return_norms``; ``per_call``:
        keywords of one call (FMN's ``max_eps``)."""
        if self.functional is None:
            raise NotImplementedError
        return self.functional(model, x, batch, objective, bounds=bounds, return_norms=True, **per_call,
                               **self.options)

    def radii(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
              bounds: Bounds | None) -> Tensor:
        """Per-sample robustness radius ``(B,)`` in model units: 0 if wrong at ``x``, ``inf`` if never fooled."""
        return self.minimal(model, x, batch, objective, bounds=bounds)[1]

    def attack(self, model, x, batch, objective, *, threat: ThreatModel) -> Tensor:
        x_min, _ = self.minimal(model, x, batch, objective, bounds=threat.bounds)
        x, _ = prepare(x, {})
        return constrain(x, x_min, self.norm, threat.eps_for(x), threat.bounds).detach()
