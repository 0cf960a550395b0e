"""The L0 threat model of the sparse attacks: budgets counted in changed input values, and the log of a run's
changes, from which the point within any budget is read off.

An L0 budget is a count of input *values* (elements of a sample, ``C x prod(spatial)``: pixels x channels, so a
single-channel image's pixels), a whole number: it has no model, native or range units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

UNCHANGED = torch.iinfo(torch.long).max  # ``changed_at`` of a value no step changed
DEFAULT_FRACTION, DEFAULT_CAP = 0.05, 1000  # default max_changes: 5 % of a sample's values, at most 1000


def l0_counts(eps: float | Tensor, x: Tensor) -> Tensor:
    """An L0 budget (a float, or one per sample ``(B,)``) as whole counts ``(B,)`` (long), checked."""
    value = torch.as_tensor(eps.detach() if isinstance(eps, Tensor) else eps, dtype=torch.float64)
    value = value.to(x.device).expand(x.shape[0])
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()) or bool((value != value.round()).any()):
        shown = sorted(set(value.tolist()))[:4]
        raise ValueError(f"an L0 eps is a number of changed input values, a whole number >= 0; got {shown}. L0 "
                         f"budgets have no native or range units: evaluate L0 attacks with eval.eps_unit=model")
    return value.long()


def l0_levels(eps_values: Sequence[float | Tensor], x: Tensor) -> Tensor:
    """The budgets of a curve ``(levels, B)`` (long), checked whole and non-decreasing for every sample."""
    table = torch.stack([l0_counts(eps, x) for eps in eps_values])
    if bool((table[1:] < table[:-1]).any()):
        raise ValueError(f"an L0 curve needs non-decreasing eps, got {list(eps_values)}")
    return table


def change_budget(x: Tensor, max_eps: float | Tensor | None, max_changes: int | None) -> Tensor:
    """Per sample ``(B,)`` the most values a run may change: ``max_eps`` (a call's eps) capped by ``max_changes``;
    without an eps, ``max_changes`` or by default 5 % of a sample's values, at most 1000."""
    if max_eps is not None:
        budget = l0_counts(max_eps, x)
        return budget if max_changes is None else budget.clamp_max(max_changes)
    values = x[0].numel()
    cap = max_changes if max_changes is not None else min(DEFAULT_CAP, max(1, math.ceil(DEFAULT_FRACTION * values)))
    return torch.full((x.shape[0],), cap, dtype=torch.long, device=x.device)


@dataclass
class ChangeLog:
    """What a sparse attack changed, per sample: the values after the run ``(B, N)``, the order of each change
    ``(B, N)`` (0-based; :data:`UNCHANGED` where untouched) and the count of changes at which the model first
    became wrong ``(B,)`` (0 where wrong at ``x``, ``inf`` where not within the budget)."""

    x: Tensor
    values: Tensor
    changed_at: Tensor
    counts: Tensor

    @classmethod
    def start(cls, x: Tensor) -> ChangeLog:
        flat = x.detach().flatten(1)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return cls(x.detach(), flat.clone(), torch.full_like(flat, UNCHANGED, dtype=torch.long),
                   torch.full((x.shape[0],), math.inf, dtype=dtype, device=x.device))

    def changed(self, rows: Tensor) -> Tensor:
        """Which values of samples ``rows`` were changed ``(n, N)``."""
        return self.changed_at[rows] != UNCHANGED

    def within(self, budget: Tensor) -> Tensor:
        """The point ``(B, C, *spatial)`` each sample reached within ``budget`` ``(B,)`` changes: its first changes
        in the run's order (a fooled sample's point for every budget >= its count)."""
        kept = self.changed_at < budget[:, None]
        return torch.where(kept, self.values, self.x.flatten(1)).view_as(self.x)
