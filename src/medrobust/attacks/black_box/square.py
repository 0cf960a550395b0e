"""Square attack (Andriushchenko et al., "Square Attack: a query-efficient black-box adversarial attack via
random search", ECCV 2020), Linf, on any objective with a margin.

Score-based and gradient-free: it only runs forwards and reads ``objective.correct_margin`` (> 0 exactly where
the model is right), so it sees through gradient masking (quantized or otherwise non-differentiable inputs,
shattered or vanishing gradients) that fools PGD and APGD. A model that resists PGD but not Square has masked
gradients, not robustness.

Random search: start from vertical stripes of ``+-eps``; at each query, set a random window (a square in 2-D,
a cube in 3-D: a sub-window of every spatial dim) of each survivor to ``x +- eps`` with one random sign per
channel, and keep it if the margin went down. The window shrinks on the paper's schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, check_fraction, without_early_stop
from medrobust.attacks.core.batch import prepare
from medrobust.attacks.core.objectives import negative_margin
from medrobust.attacks.core.options import at_least, flag, hyperparameters, norm_in
from medrobust.attacks.core.seeding import seeded
from medrobust.attacks.core.session import attack_session, objective_values
from medrobust.attacks.core.threat import ThreatModel, batch_view, clamp_bounds
from medrobust.attacks.core.tracking import AttackResult, BestTracker, WorkingSet

# the paper's schedule for 10 000 queries: p_init halves after these queries (rescaled to the budget)
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, query: int, queries: int) -> float:
    """Fraction of the spatial size a window covers at ``query`` of ``queries``."""
    it = int(query / queries * 10000)
    return p_init / 2 ** sum(it > step for step in P_SCHEDULE)


def window_sides(spatial: tuple[int, ...], p: float) -> list[int]:
    """Window side per spatial dim so the window covers a fraction ``p`` of the image (``s = sqrt(p h w)`` on
    a square image, as the paper), at least 1 and, where possible, less than the dim (so it can move)."""
    root = p ** (1.0 / len(spatial))
    return [min(max(round(size * root), 1), max(size - 1, 1)) for size in spatial]


def random_windows(n: int, spatial: tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """Bool masks ``(n, 1, *spatial)``: one random window per sample (sides from :func:`window_sides`)."""
    mask = torch.ones((n, 1) + (1,) * len(spatial), dtype=torch.bool, device=device)
    for dim, (size, side) in enumerate(zip(spatial, window_sides(spatial, p))):
        start = torch.randint(0, size - side + 1, (n, 1), device=device)
        pos = torch.arange(size, device=device)
        inside = (pos >= start) & (pos < start + side)  # (n, size)
        shape = [n, 1] + [1] * len(spatial)
        shape[2 + dim] = size
        mask = mask & inside.reshape(shape)
    return mask


def random_signs(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Uniform +-1 of ``shape`` in ``like``'s dtype and device."""
    return torch.randint(0, 2, shape, device=like.device).to(like.dtype) * 2 - 1


@hyperparameters(threat=norm_in(("linf",), "Square (its L2 variant is not implemented)"), queries=at_least(1),
                 p_init=check_fraction, early_stop=flag)
def square_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel,
                  queries: int = 1000, p_init: float = 0.8, seed: int | None = None, early_stop: bool = True,
                  bn_eval: bool = True, dropout_eval: bool = True,
                  return_result: bool = False) -> Tensor | AttackResult:
    """Linf Square attack: random search on ``objective.correct_margin``, forwards only.

    Args:
        model: the forward, ``(B, C, *spatial) -> output`` (any number of spatial dims).
        x: clean images ``(B, C, *spatial)``, inside ``threat.bounds``.
        batch: the batch dict the objective reads; its ``"image"`` is not used.
        objective: ``is_correct`` and ``correct_margin`` ``(output, batch) -> (B,)`` (the margin is minimized).
        threat: ``linf`` only; eps a float or ``(B,)`` (model units); bounds or ``None``.
        queries: random-search iterations (one forward of the survivors each), after the stripes start.
        p_init: initial fraction of the image a window covers (0.8 in the paper); halved on the schedule
            of :data:`P_SCHEDULE`, rescaled to ``queries``.
        seed: seeds the search inside the call (the caller's RNG is untouched); ``None``: global RNG.
        early_stop: a sample is done once ``is_correct`` is false (samples wrong at ``x`` return ``x``) and
            leaves the working batch. ``False``: every sample runs every query; the lowest-margin point is
            returned.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.
        return_result: return an :class:`AttackResult` (``loss`` is ``-correct_margin``).

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)`` like ``x``, in the ball and the bounds (or an AttackResult).
    """
    if x.ndim < 3:
        raise ValueError(f"square_attack needs images (B, C, *spatial), got shape {tuple(x.shape)}")
    margin = negative_margin(objective, "square_attack")  # the tracker maximizes
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval), seeded(seed, x.device), \
            torch.no_grad():
        x, batch = prepare(x, batch)
        eps = threat.eps_for(x)
        tracker = BestTracker(x, prefer_success=early_stop)
        work = WorkingSet.full(x, batch, eps, eps)  # ``step`` is unused: every change is a full +-eps
        if threat.max_eps() == 0 or early_stop:
            loss, correct = objective_values(model, margin, x, batch)
            if threat.max_eps() == 0:  # x is the answer
                tracker.update(work.idx, x, loss, correct)
                result = tracker.result()
                return result if return_result else result.x_adv
            # samples wrong at x need no attack; the others start from the stripes whatever their margin
            tracker.update(work.idx[~correct], x[~correct], loss[~correct], correct[~correct])
            work = work.keep(correct)
        # vertical stripes: one sign per channel and position along the last spatial dim
        stripes = random_signs(x.shape[:2] + (1,) * (x.ndim - 3) + x.shape[-1:], x)
        work = _offer(model, margin, work, tracker, x_new=work.x + batch_view(work.eps, x) * stripes[work.idx],
                      bounds=threat.bounds, early_stop=early_stop)
        spatial = tuple(x.shape[2:])
        for query in range(queries):
            if len(work) == 0:
                break
            n, channels = len(work), x.shape[1]
            window = random_windows(n, spatial, p_selection(p_init, query, queries), x.device)
            corner = work.x + batch_view(work.eps, work.x) * random_signs((n, channels) + (1,) * len(spatial), x)
            x_new = torch.where(window, corner, tracker.x_adv[work.idx])  # current best, window replaced
            work = _offer(model, margin, work, tracker, x_new=x_new, bounds=threat.bounds, early_stop=early_stop)
    result = tracker.result()
    return result if return_result else result.x_adv


def _offer(model, margin, work: WorkingSet, tracker: BestTracker, *, x_new: Tensor, bounds,
           early_stop: bool) -> WorkingSet:
    """Query ``x_new`` (clamped into bounds); the tracker keeps it where the margin went down (or the model
    broke); with ``early_stop`` the broken samples leave the working set."""
    x_new = clamp_bounds(x_new, bounds)
    loss, correct = objective_values(model, margin, x_new, work.batch)
    tracker.update(work.idx, x_new, loss, correct)
    return work.keep(correct) if early_stop and not bool(correct.all()) else work


class Square(Attack):
    """The Linf Square attack for configs (Hydra) and suites; see :func:`square_attack`.

    Args (those of :func:`square_attack`, checked the same way):
        norm: ``"linf"`` (the only one supported).
        queries: random-search queries per call.
        p_init: initial window fraction.
        seed: seeds each call (reproducible evaluations; default 0); ``None``: the global RNG.
        early_stop: per-sample early stopping.
        bn_eval / dropout_eval: normalization / dropout layers in eval mode during the attack.

    ``name``: ``"square"``.
    """

    survivors_had_full_budget = True  # its full-budget form only drops the early stop

    name = "square"
    black_box = True  # gradient-free: the masking checks compare it with the white-box attacks

    functional = staticmethod(square_attack)
    defaults = {"seed": 0}  # reproducible evaluations by default

    def full_budget(self) -> "Square":
        return without_early_stop(self)
