"""The threat model: which perturbations are allowed, and the geometry every attack shares.

A threat model is a norm (``linf``, ``l2`` or ``l1``), a radius ``eps`` (a float, or one value per sample) and the
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

NORMS = ("linf", "l2", "l1")
DENSE_NORMS = ("linf", "l2")  # what attacks without an L1 form (FGSM, APGD, DAG, ...) take
L1_BISECTION_STEPS = 40  # theta of the L1-ball-and-box projection to 2^-40 of the largest coordinate

Bounds = tuple[float, float]


# -- validation --------------------------------------------------------------------------------------
def check_norm(norm: str, supported: tuple[str, ...] = NORMS, attack: str | None = None) -> str:
    """``norm`` if it is one of ``supported`` (by default every norm of :data:`NORMS`), else a ``ValueError``
    quoting it; ``attack`` names who refuses a known norm it has no form for."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    if norm not in supported:
        raise ValueError(f"{attack or 'this attack'} does not define norm {norm!r}; it supports {supported}")
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
    if norm == "l1":
        return flat.abs().sum(dim=1)
    return flat.norm(p=2, dim=1)


def _tiny(t: Tensor) -> float:
    return torch.finfo(t.dtype).tiny


# -- geometry ----------------------------------------------------------------------------------------
def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit norm: ``sign(g)`` for Linf, ``g / ||g||_2`` for L2, and for L1
    ``sign(g_i)`` on one coordinate of largest ``|g_i|`` (see :func:`sparse_l1_step` for wider steps)."""
    if norm == "linf":
        return grad.sign()
    if norm == "l1":
        return sparse_l1_step(grad, torch.ones(grad.shape[0], dtype=grad.dtype, device=grad.device), 1)
    return grad / batch_view(lp_norm(grad, "l2").clamp_min(_tiny(grad)), grad)


def sparse_l1_step(grad: Tensor, size: Tensor, k: int, room: Tensor | None = None) -> Tensor:
    """An ascent step of L1 size ``size`` ``(B,)`` on the coordinates of largest ``|grad|``: ``size / k`` on each of
    the top ``k`` (``k = 1``: the exact steepest L1 ascent; larger ``k`` spreads the step, as SLIDE does).

    ``room`` (like ``grad``, see :func:`room_along`): how far each coordinate can still move the way its
    gradient points. A coordinate takes at most its room, and what it cannot take goes to the next ones in
    gradient order, so no step is spent where the bounds would clip it back (on a linear model inside a box
    this fills coordinates in the order of the exact, greedy optimum).
    """
    score = grad.abs().flatten(1)
    order = score.argsort(dim=1, descending=True)
    cap = (size / max(1, int(k)))[:, None].to(score.dtype).expand_as(score)
    if room is not None:
        cap = torch.minimum(cap, room.flatten(1).gather(1, order))
    cap = torch.where(score.gather(1, order) > 0, cap, torch.zeros_like(cap))
    spent_before = cap.cumsum(dim=1) - cap
    amount = torch.minimum((size[:, None].to(score.dtype) - spent_before).clamp_min(0), cap)
    return torch.zeros_like(score).scatter_(1, order, amount).view_as(grad) * grad.sign()


def room_along(x_adv: Tensor, grad: Tensor, bounds: Bounds | None) -> Tensor | None:
    """How far each coordinate of ``x_adv`` can move the way ``grad`` points before it meets a bound (like
    ``x_adv``, >= 0); ``None`` unbounded."""
    if bounds is None:
        return None
    return torch.where(grad > 0, bounds[1] - x_adv, x_adv - bounds[0]).clamp_min(0)


def project(delta: Tensor, norm: str, eps: Tensor) -> Tensor:
    """Project ``delta`` ``(B, C, *spatial)`` onto the ball of radius ``eps`` ``(B,)`` (Euclidean projection;
    L1 by soft thresholding, Duchi et al. 2008)."""
    e = batch_view(eps, delta)
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, e), -e)
    if norm == "l1":
        wide = _accumulating(delta)  # sorted cumulative sums: half precision would overrun eps
        return _project_l1(delta.to(wide), _rounding_safe(eps, delta)).to(delta.dtype)
    factor = (eps / lp_norm(delta, "l2").clamp_min(_tiny(delta))).clamp(max=1.0)
    return delta * batch_view(factor, delta)


def _accumulating(t: Tensor) -> torch.dtype:
    """float32 for half-precision tensors (sums over many voxels), else their own dtype."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _rounding_safe(eps: float | Tensor, like: Tensor) -> Tensor:
    """Per-sample eps in the accumulating dtype, shrunk by one ulp of a half-precision ``like``: rounding each
    coordinate of a projection computed in float32 back to half precision then cannot push the sum past eps."""
    wide = _accumulating(like)
    eps = torch.as_tensor(eps, dtype=wide, device=like.device).expand(like.shape[0])
    return eps * (1 - torch.finfo(like.dtype).eps) if wide != like.dtype else eps


def _project_l1(delta: Tensor, eps: Tensor) -> Tensor:
    """Soft-threshold each sample's ``|delta|`` by the ``theta >= 0`` that brings its L1 norm down to ``eps``."""
    flat = delta.flatten(1)
    size = flat.abs()
    outside = size.sum(dim=1) > eps
    if not bool(outside.any()):
        return delta
    desc = size.sort(dim=1, descending=True).values
    excess = desc.cumsum(dim=1) - eps[:, None]
    count = torch.arange(1, flat.shape[1] + 1, dtype=flat.dtype, device=flat.device)
    rho = (desc * count > excess).sum(dim=1).clamp_min(1)  # how many coordinates stay nonzero
    theta = excess.gather(1, (rho - 1)[:, None]).clamp_min(0) / rho[:, None].to(flat.dtype)
    theta = torch.where(outside[:, None], theta, torch.zeros_like(theta))
    return (flat.sign() * (size - theta).clamp_min(0)).view_as(delta)


def _project_l1_box(delta: Tensor, eps: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """The Euclidean projection of ``delta`` onto ``{||z||_1 <= eps, low <= z <= high}`` (``low <= 0 <= high``).

    Per coordinate it is ``sign(delta) * min((|delta| - theta)+, room)``, ``room`` the box's room on that side,
    with the ``theta >= 0`` that spends exactly ``eps`` (or 0 when clipping alone stays inside the ball);
    ``theta`` by bisection. Projecting onto the ball and then clipping would spend budget on coordinates the
    clip takes back, which is what makes plain L1 attacks weak inside a box (Croce & Hein, 2021).
    """
    size, room = delta.abs(), torch.where(delta > 0, high, -low).clamp_min(0)

    def spent(theta: Tensor) -> Tensor:  # the L1 norm the threshold theta (B,) leaves
        return torch.minimum((size - batch_view(theta, delta)).clamp_min(0), room).flatten(1).sum(dim=1)

    lo = torch.zeros_like(eps)
    hi = torch.where(spent(lo) > eps, size.flatten(1).amax(dim=1), lo)
    for _ in range(L1_BISECTION_STEPS):
        mid = (lo + hi) / 2
        over = spent(mid) > eps
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    return delta.sign() * torch.minimum((size - batch_view(hi, delta)).clamp_min(0), room)


def clamp_bounds(x_adv: Tensor, bounds: Bounds | None) -> Tensor:
    """Clamp into ``bounds``; ``None`` is unbounded."""
    return x_adv if bounds is None else x_adv.clamp(bounds[0], bounds[1])


def constrain(x: Tensor, x_adv: Tensor, norm: str, eps: Tensor, bounds: Bounds | None) -> Tensor:
    """An allowed point near ``x_adv``: project ``x_adv - x`` onto the ball, then clamp into bounds.

    Clamping after projecting never leaves the ball when ``x`` is inside the bounds: it moves every
    coordinate towards ``x``. Linf: that is the projection onto the allowed set. L1 with bounds: the exact
    projection onto ball and box together instead (:func:`_project_l1_box`), so no budget is lost to clamping.
    """
    if norm == "l1" and bounds is not None:
        wide = _accumulating(x)
        low, high = bounds[0] - x, bounds[1] - x
        delta = _project_l1_box((x_adv - x).to(wide), _rounding_safe(eps, x), low.to(wide), high.to(wide)).to(x.dtype)
        # coordinates given all their room land exactly on the bound (x + (high - x) can round below it), so
        # attacks see them as blocked there
        return torch.where(delta >= high, bounds[1], torch.where(delta <= low, bounds[0], x + delta))
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

    Linf: uniform in the box. L2 and L1: a uniform point of the unit sphere times ``eps * U^(1/d)`` (uniform in
    the ball; for large ``d`` most of the volume is near the surface). On the L1 sphere that point is i.i.d.
    exponentials with random signs, divided by their sum.
    """
    e = batch_view(eps, like)
    if norm == "linf":
        return (torch.rand_like(like) * 2 - 1) * e
    if norm == "l1":
        direction = torch.empty_like(like).exponential_() * (torch.randint_like(like, 2) * 2 - 1)
    else:
        direction = torch.randn_like(like)
    direction = direction / batch_view(lp_norm(direction, norm).clamp_min(_tiny(like)), like)
    d = like[0].numel()
    radius = torch.rand(like.shape[0], dtype=like.dtype, device=like.device) ** (1.0 / d)
    return direction * batch_view(radius, like) * e


def per_sample_eps(eps: float | Tensor, x: Tensor) -> Tensor:
    """A checked eps (float, or ``(B,)``) as one value per sample of ``x`` ``(B, ...)``, in its dtype and device."""
    batch = x.shape[0]
    if isinstance(eps, Tensor):
        if eps.shape[0] != batch:
            raise ValueError(f"per-sample eps has {eps.shape[0]} values for a batch of {batch}")
        eps = eps.detach()
        if eps.is_inference():  # resolve_eps may have run under inference mode
            with torch.inference_mode(False):
                eps = eps.clone()
        return eps.to(dtype=x.dtype, device=x.device)
    return torch.full((batch,), eps, dtype=x.dtype, device=x.device)


# -- the threat model --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThreatModel:
    """Allowed perturbations: ``||x_adv - x||_norm <= eps`` and ``x_adv`` inside ``bounds``.

    Args:
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (each attack says which it defines).
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
        return per_sample_eps(self.eps, x)

    def max_eps(self) -> float:
        return float(self.eps.max()) if isinstance(self.eps, Tensor) and self.eps.numel() else float(self.eps)
