"""A whole robustness curve from one attack: adversarial points at every eps, cheapest first.

A point found at a smaller eps lies inside every larger ball, so a sample fooled at eps_i keeps that point
for all eps_j > eps_i and is not attacked again (a sample wrong on its clean image keeps the clean image): the curve is monotone by construction and the cost of each
further eps scales with the samples still standing (:func:`attack_curve`).

From a minimum-norm attack's points the order turns around (:func:`verified_curve`): a sample is checked at the
largest eps its radius calls robust, and a failed attack there stands for every smaller ball inside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, CurveAttack, Perturbation
from medrobust.attacks.core.batch import index_batch
from medrobust.attacks.core.session import objective_values
from medrobust.attacks.core.threat import batch_view, constrain, lp_norm


def eps_size(eps: float | Tensor) -> float:
    return float(eps.max()) if isinstance(eps, Tensor) else float(eps)


def attack_curve(
    attack: Perturbation,
    model: Callable,
    x: Tensor,
    batch: Mapping,
    objective: Any,
    *,
    eps_values: Sequence[float | Tensor],
    bounds: tuple[float, float] | None,
) -> list[Tensor]:
    """Adversarial images ``(B, C, *spatial)`` for each of ``eps_values`` (same order as given).

    Args:
        attack: an attack object, ``attack(model, x, batch, objective, *, eps, bounds)``; one with its own
            ``curve`` method (e.g. a minimum-norm attack that reads every eps off one run) is asked for that;
            one that does not seek errors (``attack.seeks_errors`` false: corruptions, prediction shifts) is
            applied at each eps on every sample independently, since there is no worst case to keep.
        eps_values: non-decreasing eps, each a float or a per-sample ``(B,)`` tensor, in model units.
    """
    if isinstance(attack, CurveAttack):
        return attack.curve(model, x, batch, objective, eps_values=eps_values, bounds=bounds)
    if not attack.seeks_errors:
        return [attack(model, x, batch, objective, eps=eps, bounds=bounds) for eps in eps_values]
    sizes = [eps_size(eps) for eps in eps_values]
    if sizes != sorted(sizes):
        raise ValueError(f"attack_curve needs non-decreasing eps, got {sizes}")
    current = x.detach().clone()
    # a sample the model gets wrong on its clean image has failed at eps 0 already: it keeps that image, so no
    # attack point can count it correct (one that stops nowhere, FGSM, or moves a loss-defined verdict, a
    # detector's per-term rule, could otherwise land it back inside every tau)
    with torch.no_grad():
        _, clean_correct = objective_values(model, objective, current, batch)
    fooled = ~clean_correct
    points = []
    for eps in eps_values:
        if eps_size(eps) > 0 and not bool(fooled.all()):
            idx = (~fooled).nonzero().flatten()
            sub_batch = index_batch(batch, idx, batch_size=x.shape[0])
            sub_eps = eps[idx] if isinstance(eps, Tensor) else eps
            current[idx] = attack(model, x[idx], sub_batch, objective, eps=sub_eps, bounds=bounds)
            with torch.no_grad():
                _, correct = objective_values(model, objective, current[idx], sub_batch)
            fooled[idx] = ~correct
        points.append(current.clone())
    return points


def verified_curve(
    verify: Attack | None,
    model: Callable,
    x: Tensor,
    batch: Mapping,
    objective: Any,
    *,
    eps_values: Sequence[float | Tensor],
    bounds: tuple[float, float] | None,
    known: tuple[Tensor, Tensor],
    norm: str,
) -> tuple[list[Tensor], Tensor]:
    """Adversarial images ``(B, C, *spatial)`` for each of ``eps_values`` from minimum-norm points, the radii's
    verdicts checked by ``verify`` from the largest eps down; and the radii ``(B,)``, lowered to the norm of
    any fooling point the verification found inside one.

    A sample is fooled at every eps >= its radius by its minimum-norm point. Below the radius it is robust by the
    radius, an upper bound only: ``verify`` attacks it at the largest such eps, started from the minimum-norm
    point moved into that ball (``verify.attack_from``, where the attack has it). If that fools, the point found
    stands for that eps and the next smaller eps is tried from it; if not, the sample stands at that eps and at
    every smaller one, each a ball inside the one searched (its point there: the last attacked point moved into
    the smaller ball). One verification per sample, plus one per eps its radius was too large for.

    Args:
        verify: a fixed-eps attack, ``verify(model, x, batch, objective, *, eps, bounds)``; ``None``: the radii
            alone, samples they call robust stay at ``x``.
        eps_values: non-decreasing eps (per sample, for ``(B,)`` tensors), in model units.
        known: ``(x_min, radii)`` from a minimum-norm attack in ``norm``.
    """
    x_min, radii = known[0].detach(), known[1].detach().clone()
    table = _eps_table(eps_values, x)  # (levels, B)
    levels, samples = table.shape
    rows = torch.arange(samples, device=x.device)
    found_level = (radii.to(table)[None] > table).sum(0)  # the first eps the minimum-norm point fits in
    found_point = x_min.clone()  # per sample, the fooling point for found_level and above
    last_point = x.detach().clone() if verify is None else x_min.clone()  # the point the levels below move into
    level = found_level - 1  # the eps to verify next
    pending = (level >= 0) & (table[level.clamp_min(0), rows] > 0) & (verify is not None)
    while bool(pending.any()):
        idx = pending.nonzero().flatten()
        sub_batch = index_batch(batch, idx, batch_size=samples)
        x_adv = verify.attack_from(found_point[idx], model, x[idx], sub_batch, objective,
                             eps=table[level[idx], idx], bounds=bounds)
        with torch.no_grad():
            _, correct = objective_values(model, objective, x_adv, sub_batch)
        fooled, held = idx[~correct], idx[correct]
        found_level[fooled], found_point[fooled] = level[fooled], x_adv[~correct]
        # the point lies in the ball of its eps by construction; its computed norm can round just above that eps,
        # which would call the sample robust there by its radius while the curve counts it fooled
        norms = lp_norm(x_adv[~correct] - x[fooled], norm).to(radii)
        radii[fooled] = torch.minimum(radii[fooled], torch.minimum(norms, table[level[fooled], fooled].to(radii)))
        last_point[held], level[held] = x_adv[correct], -1
        level[fooled] -= 1
        pending = (level >= 0) & (table[level.clamp_min(0), rows] > 0)
    return [torch.where(batch_view(found_level <= j, x), found_point, constrain(x, last_point, norm, table[j], bounds))
            for j in range(levels)], radii


def _eps_table(eps_values: Sequence[float | Tensor], x: Tensor) -> Tensor:
    """eps per level and sample ``(levels, B)``, checked non-decreasing for every sample."""
    table = torch.stack([torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0])
                         for eps in eps_values])
    if bool((table[1:] < table[:-1]).any()):
        raise ValueError(f"a verified curve needs eps non-decreasing for every sample, got {list(eps_values)}")
    return table
