"""Step sizes, ascent steps and starting points shared by the gradient attacks."""

from __future__ import annotations

import torch
from torch import Tensor

from medrobust.attacks.core.base import check_positive
from medrobust.attacks.core.threat import (
    ThreatModel,
    ascent_direction,
    batch_view,
    constrain,
    random_in_ball,
    room_along,
    sparse_l1_step,
)


# -- steps -------------------------------------------------------------------------------------------
def per_sample_step(step_size: float | Tensor | None, rel_step_size: float | None, eps: Tensor,
                    rel_default: float) -> Tensor:
    """Step size ``(B,)``: absolute ``step_size`` (float or ``(B,)``), else ``rel_step_size * eps``, else
    ``rel_default * eps``. A relative step keeps its ratio to eps under eps schedules and per-sample eps."""
    if step_size is not None and rel_step_size is not None:
        raise ValueError(f"give step_size or rel_step_size, not both; got {step_size!r} and {rel_step_size!r}")
    if step_size is None:
        return check_positive("rel_step_size", rel_default if rel_step_size is None else rel_step_size) * eps
    if isinstance(step_size, Tensor):
        if bool((step_size <= 0).any()):
            raise ValueError(f"step_size must be > 0, got {step_size.tolist()}")
        return step_size.detach().to(eps).expand_as(eps).clone()
    return torch.full_like(eps, check_positive("step_size", step_size))


def ascent_step(x_adv: Tensor, grad: Tensor, norm: str, step: Tensor, *, l1_width: int = 1,
                bounds: tuple[float, float] | None = None) -> Tensor:
    """One steepest-ascent step of size ``step`` ``(B,)`` in the geometry of ``norm`` (not yet projected).

    L1: spread over the ``l1_width`` coordinates of largest gradient, none moved past ``bounds``
    (:func:`~medrobust.attacks.core.threat.sparse_l1_step`)."""
    if norm == "l1":
        return x_adv + sparse_l1_step(grad, step, l1_width, room_along(x_adv, grad, bounds))
    return x_adv + batch_view(step, x_adv) * ascent_direction(grad, norm)


def start_point(x: Tensor, threat: ThreatModel, eps: Tensor, random_start: bool) -> Tensor:
    """``x`` itself, or a uniform random point of the ball (clamped into bounds)."""
    if not random_start:
        return x
    return constrain(x, x + random_in_ball(x, threat.norm, eps), threat.norm, eps, threat.bounds)
