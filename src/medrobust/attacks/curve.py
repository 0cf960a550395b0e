"""A whole robustness curve from one attack: adversarial points at every eps, cheapest first.

A point found at a smaller eps lies inside every larger ball, so a sample fooled at eps_i keeps that point
for all eps_j > eps_i and is not attacked again: the curve is monotone by construction and the cost of each
further eps scales with the samples still standing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks._engine import index_batch, objective_values


def _eps_size(eps: float | Tensor) -> float:
    return float(eps.max()) if isinstance(eps, Tensor) else float(eps)


def attack_curve(
    attack: Callable,
    model: Callable,
    x: Tensor,
    batch: Mapping,
    objective: Any,
    *,
    eps_values: Sequence[float | Tensor],
    bounds: tuple[float, float] | None,
    known: tuple[Tensor, Tensor] | None = None,
) -> list[Tensor]:
    """Adversarial images ``(B, C, *spatial)`` for each of ``eps_values`` (same order as given).

    Args:
        attack: an attack object, ``attack(model, x, batch, objective, *, eps, bounds)``; one with its own
            ``curve`` method (e.g. a minimum-norm attack that reads every eps off one run) is asked for that;
            a corruption (``norm == "none"``) is applied at each severity independently.
        eps_values: non-decreasing eps, each a float or a per-sample ``(B,)`` tensor, in model units.
        known: ``(x_min, radii)`` from a minimum-norm attack: a sample takes its known point, unattacked, from
            the first eps its radius fits in.
    """
    if known is None and hasattr(attack, "curve"):
        return attack.curve(model, x, batch, objective, eps_values=eps_values, bounds=bounds)
    if getattr(attack, "norm", None) == "none":  # corruptions: each severity on its own, no worst case to keep
        return [attack(model, x, batch, objective, eps=eps, bounds=bounds) for eps in eps_values]
    sizes = [_eps_size(eps) for eps in eps_values]
    if sizes != sorted(sizes):
        raise ValueError(f"attack_curve needs non-decreasing eps, got {sizes}")
    current = x.detach().clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    points = []
    for eps in eps_values:
        if known is not None:
            fits = ~fooled & (known[1] <= eps)
            current[fits], fooled = known[0][fits], fooled | fits
        if _eps_size(eps) > 0 and not bool(fooled.all()):
            idx = (~fooled).nonzero().flatten()
            sub_batch = index_batch(batch, idx, batch_size=x.shape[0])
            sub_eps = eps[idx] if isinstance(eps, Tensor) else eps
            current[idx] = attack(model, x[idx], sub_batch, objective, eps=sub_eps, bounds=bounds)
            with torch.no_grad():
                _, correct = objective_values(model, objective, current[idx], sub_batch)
            fooled[idx] = ~correct
        points.append(current.clone())
    return points
