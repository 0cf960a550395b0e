"""Accuracy without the samples most sensitive to attack (Joel et al.'s adversarial-sensitivity analysis).

A minimum-norm suite gives each sample its radius: the smallest perturbation found that makes it wrong (``0`` where
the clean sample is already wrong, ``inf`` where none was found within the budget), so it is robust at eps exactly
when its radius exceeds eps. Setting aside the lowest-radius fraction ``drop`` of the samples and reading the
accuracy of the rest at each eps tells whether a model's robustness is broad or carried by a few fragile images
(and, the other way round, whether a few fragile images drag down an otherwise robust model).

Which samples are set aside: the ``round(drop * n)`` lowest radii (halves rounded up), at least one sample kept.
Ties at the cut are broken by the evaluation's one-process order (the earlier sample is set aside), so the choice
does not depend on the number of DDP ranks; the accuracies do not depend on it at all, since samples of equal
radius are robust at the same eps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def check_drop(drop: float | None, key: str = "eval.sensitivity_drop") -> float | None:
    """``drop`` as a float in (0, 1), or ``None`` where it is off (``None`` or 0); anything else is an error."""
    if drop is None:
        return None
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= float(drop) < 1.0:
        raise ValueError(f"{key} must be a fraction in [0, 1) (0 or null: off), got {drop!r}")
    return float(drop) or None


def dropped_count(n: int, drop: float) -> int:
    """How many of ``n`` samples ``drop`` sets aside: the nearest whole number (halves up), at least one kept.
    ``drop * n`` is rounded to 9 places first, so 0.1 x 30 sets aside 3, not 4 (float error)."""
    if n <= 0:
        return 0
    return min(math.floor(round(drop * n, 9) + 0.5), n - 1)


def sensitive_mask(radii: Tensor, drop: float) -> Tensor:
    """``(n,)`` bool, true for the samples set aside: the :func:`dropped_count` lowest radii, ties to the earlier."""
    order = torch.sort(radii, stable=True).indices
    mask = torch.zeros(radii.shape[0], dtype=torch.bool, device=radii.device)
    mask[order[:dropped_count(radii.shape[0], drop)]] = True
    return mask


def accuracy_from_radii(radii: Tensor, eps_values: Sequence[float]) -> list[float]:
    """Per eps, the fraction of samples robust there (radius > eps, compared in the radii's dtype as the curve
    does); ``nan`` for no samples."""
    if radii.numel() == 0:
        return [math.nan] * len(eps_values)
    return [float((radii > torch.tensor(eps, dtype=radii.dtype, device=radii.device)).float().mean())
            for eps in eps_values]


@dataclass
class SensitivityCurve:
    """Accuracy at each eps on all samples and on the samples kept after setting aside the most sensitive."""

    eps: list[float]
    all: list[float]
    kept: list[float]
    samples: int
    samples_kept: int
    drop: float


def sensitivity_curve(radii: Tensor, eps_values: Sequence[float], drop: float,
                      thresholds: Sequence[float] | None = None) -> SensitivityCurve:
    """The curve for per-sample ``radii`` ``(n,)`` (model units, ``inf`` = never fooled) at ``eps_values``, the
    lowest-radius fraction ``drop`` set aside. ``thresholds``: ``eps_values`` in the radii's units where the
    evaluation's eps are in others (HU); ``None``: the same units."""
    drop = check_drop(drop, "drop") or 0.0
    thresholds = list(eps_values if thresholds is None else thresholds)
    if len(thresholds) != len(eps_values):
        raise ValueError(f"thresholds must match eps_values one to one, got {thresholds} for {list(eps_values)}")
    radii = radii.detach().flatten()
    kept = radii[~sensitive_mask(radii, drop)]
    return SensitivityCurve(eps=[float(e) for e in eps_values], all=accuracy_from_radii(radii, thresholds),
                            kept=accuracy_from_radii(kept, thresholds), samples=radii.numel(),
                            samples_kept=kept.numel(), drop=drop)
