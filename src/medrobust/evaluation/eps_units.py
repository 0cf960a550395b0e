"""eps units: an attack strength given in model units, in native units (HU, raw MR) or as a fraction of each
image's intensity range, converted to the model units every attack takes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medrobust.attacks.core.threat import check_eps

EPS_UNITS = ("model", "native", "range")


def resolve_eps(eps: float, unit: str = "model", *, intensity: Any = None, x: Tensor | None = None) -> float | Tensor:
    """Convert an eps given in ``unit`` to model units.

    Args:
        eps: the perturbation size, >= 0.
        unit: ``"model"`` (the network's input scale, as is), ``"native"`` (e.g. HU, through
            ``intensity.eps_to_model``) or ``"range"`` (a fraction of each image's max - min).
        intensity: an object with ``eps_to_model(eps) -> float`` (e.g. ``IntensityWindow``); for ``native``.
        x: the images ``(B, C, *spatial)``; for ``range``.

    Returns:
        a float (``model``, ``native``) or a per-sample tensor ``(B,)`` (``range``).
    """
    if unit not in EPS_UNITS:
        raise ValueError(f"unknown eps unit {unit!r}; expected one of {EPS_UNITS}")
    eps = check_eps(eps)
    if unit == "model":
        return eps
    if unit == "native":
        if intensity is None or not hasattr(intensity, "eps_to_model"):
            raise ValueError(f"eps unit 'native' needs an intensity window with eps_to_model() "
                             f"(e.g. the datamodule's IntensityWindow), got intensity={intensity!r}")
        return float(intensity.eps_to_model(eps))
    if x is None:
        raise ValueError("eps unit 'range' needs the images x to measure each image's intensity range")
    with torch.no_grad():
        flat = x.detach().flatten(1)
        return eps * (flat.amax(dim=1) - flat.amin(dim=1))
