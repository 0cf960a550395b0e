"""The threat model: which perturbations are allowed, and the geometry every attack shares.

A threat model is a norm (``linf`` or ``l2``), a radius ``eps`` (a float, or one value per sample) and the
valid input range ``bounds`` (``None`` when unbounded, e.g. z-scored MRI). Nothing here assumes ``[0, 1]``
or a 4-D batch: per-sample values ``(B,)`` are broadcast with :func:`batch_view`.

The free functions take per-sample ``eps`` tensors so that attacks working on a shrinking subset of the
batch (early stopping) just index them along with the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

NORMS = ("linf", "l2")
EPS_UNITS = ("model", "native", "range")

Bounds = tuple[float, float]


# -- validation --------------------------------------------------------------------------------------
def check_norm(norm: str) -> str:
    """``norm`` if it is one of :data:`NORMS`, else a ``ValueError`` quoting it."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    return norm


def check_eps(eps: float | Tensor) -> float | Tensor:
    """A float (or a ``(B,)`` / 0-d tensor) of finite values >= 0; floats come back as ``float``."""
    if isinstance(eps, Tensor):
        eps = eps.detach()
        if eps.ndim > 1:
            raise ValueError(f"eps must be a float or a per-sample tensor of shape (B,), got shape {tuple(eps.shape)}")
        if not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
            raise ValueError(f"eps must be finite and >= 0, got {eps.tolist()}")
        return eps.item() if eps.ndim == 0 else eps
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return value


def check_bounds(bounds: Any) -> Bounds | None:
    """``None`` or a ``(low, high)`` pair of floats with ``low < high`` (lists, e.g. from Hydra, are fine)."""
    if bounds is None:
        return None
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be None or a (low, high) pair of numbers, got {bounds!r}") from None
    if not low < high:
        raise ValueError(f"bounds must satisfy low < high, got {bounds!r}")
    return low, high


# -- shapes ------------------------------------------------------------------------------------------
def batch_view(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample ``(B,)`` tensor to ``(B, 1, ..., 1)`` with ``like.ndim`` dims (0-d passes)."""
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[:1] + (1,) * (like.ndim - 1))


def lp_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-sample norm ``(B,)`` of ``delta`` ``(B, C, *spatial)``."""
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    return flat.norm(p=2, dim=1)


def _tiny(t: Tensor) -> float:
    return torch.finfo(t.dtype).tiny


# -- geometry ----------------------------------------------------------------------------------------
def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit norm: ``sign(g)`` for Linf, ``g / ||g||_2`` for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / batch_view(lp_norm(grad, "l2").clamp_min(_tiny(grad)), grad)


def project(delta: Tensor, norm: str, eps: Tensor) -> Tensor:
    """Project ``delta`` ``(B, C, *spatial)`` onto the ball of radius ``eps`` ``(B,)``."""
    e = batch_view(eps, delta)
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, e), -e)
    factor = (eps / lp_norm(delta, "l2").clamp_min(_tiny(delta))).clamp(max=1.0)
    return delta * batch_view(factor, delta)


def clamp_bounds(x_adv: Tensor, bounds: Bounds | None) -> Tensor:
    """Clamp into ``bounds``; ``None`` is unbounded."""
    return x_adv if bounds is None else x_adv.clamp(bounds[0], bounds[1])


def constrain(x: Tensor, x_adv: Tensor, norm: str, eps: Tensor, bounds: Bounds | None) -> Tensor:
    """The allowed point nearest to ``x_adv``: project ``x_adv - x`` onto the ball, then clamp into bounds.

    Clamping after projecting never leaves the ball when ``x`` is inside the bounds: it moves every
    coordinate towards ``x``.
    """
    return clamp_bounds(x + project(x_adv - x, norm, eps), bounds)


def linf_box(x: Tensor, eps: Tensor, bounds: Bounds | None) -> tuple[Tensor, Tensor]:
    """The Linf threat model as per-element limits ``(low, high)``, each like ``x`` ``(B, C, *spatial)``.

    The allowed set is the box ``[max(x - eps, low_bound), min(x + eps, high_bound)]``, so an attack that
    computes it once constrains every step with one clamp (the same point :func:`constrain` gives).
    """
    e = batch_view(eps, x)
    low, high = x - e, x + e
    if bounds is not None:
        low, high = low.clamp_min(bounds[0]), high.clamp_max(bounds[1])
    return low, high


def random_in_ball(like: Tensor, norm: str, eps: Tensor) -> Tensor:
    """A uniform sample from the ball of radius ``eps`` ``(B,)``, shaped like ``like`` ``(B, C, *spatial)``.

    Linf: uniform in the box. L2: a uniform direction times ``eps * U^(1/d)`` (uniform in the ball; for
    large ``d`` most of the volume is near the surface).
    """
    e = batch_view(eps, like)
    if norm == "linf":
        return (torch.rand_like(like) * 2 - 1) * e
    direction = torch.randn_like(like)
    direction = direction / batch_view(lp_norm(direction, "l2").clamp_min(_tiny(like)), like)
    d = like[0].numel()
    radius = torch.rand(like.shape[0], dtype=like.dtype, device=like.device) ** (1.0 / d)
    return direction * batch_view(radius, like) * e


# -- the threat model --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThreatModel:
    """Allowed perturbations: ``||x_adv - x||_norm <= eps`` and ``x_adv`` inside ``bounds``.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: radius in model units; a float or a per-sample tensor ``(B,)``.
        bounds: ``(low, high)`` of valid inputs, or ``None`` when unbounded.
    """

    norm: str
    eps: float | Tensor
    bounds: Bounds | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", check_norm(self.norm))
        object.__setattr__(self, "eps", check_eps(self.eps))
        object.__setattr__(self, "bounds", check_bounds(self.bounds))

    def eps_for(self, x: Tensor) -> Tensor:
        """Per-sample radius ``(B,)`` in ``x``'s dtype and device."""
        batch = x.shape[0]
        if isinstance(self.eps, Tensor):
            if self.eps.shape[0] != batch:
                raise ValueError(f"per-sample eps has {self.eps.shape[0]} values for a batch of {batch}")
            eps = self.eps.detach()
            if eps.is_inference():  # resolve_eps may have run under inference mode
                with torch.inference_mode(False):
                    eps = eps.clone()
            return eps.to(dtype=x.dtype, device=x.device)
        return torch.full((batch,), self.eps, dtype=x.dtype, device=x.device)

    def max_eps(self) -> float:
        return float(self.eps.max()) if isinstance(self.eps, Tensor) and self.eps.numel() else float(self.eps)


# -- eps units ---------------------------------------------------------------------------------------
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
