"""Directional attacks on regressors: push the predicted value (e.g. brain age) up or down.

Li et al. ("Anatomical context protects deep learning from adversarial perturbations in medical imaging",
Neurocomputing 2020) attack brain-age regressors by following the sign of the gradient of the *predicted age*
w.r.t. the image: ``x_adv = x + eps * sign(d pred / d x)`` (one step; eps a fraction of each image's intensity
range) to make subjects look older, or minus that to make them look younger.

Here that is an objective wrapper, :class:`ShiftObjective` (``attack_loss = direction * prediction``), run
through the existing FGSM / PGD machinery by :func:`directional_attack` and the configurable
:class:`Directional`. The predicted value always comes from ``objective.prediction(output, batch)``, never
from ``output`` itself: a hybrid network's output is an image embedding that ``prediction`` fuses with the
clean anatomical features ``batch["features"]``, which attacks never perturb.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, check_positive
from medrobust.attacks.core.batch import attack_key, prepare
from medrobust.attacks.core.options import at_least, flag, hyperparameters, norm_in
from medrobust.attacks.core.session import attack_session, objective_values
from medrobust.attacks.core.threat import DENSE_NORMS, ThreatModel
from medrobust.attacks.gradient.fgsm import fgsm_attack
from medrobust.attacks.gradient.pgd import pgd_attack

DIRECTIONS = {"up": 1, "down": -1}
CLEAN_KEY = attack_key("clean_prediction")  # where the clean predictions ride along in the batch (indexed with it)


def check_direction(direction: str) -> int:
    """``+1`` for ``"up"``, ``-1`` for ``"down"``; anything else is a ``ValueError`` quoting it."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    return DIRECTIONS[direction]


def _direction(name: str, direction: str) -> str:
    check_direction(direction)
    return direction


class ShiftObjective:
    """``objective`` seen as "move the predicted value in one direction".

    - ``attack_loss(output, batch) -> (B,)``: ``±objective.prediction(output, batch)``, so ascending it
      shifts the prediction up (``"up"``) or down (``"down"``);
    - ``is_correct(output, batch) -> (B,)``: with ``tau=None`` always true (nothing stops early: the largest
      shift is wanted); with ``tau``, true until the prediction has moved ``tau`` (target units, e.g.
      years) in ``direction`` from the clean prediction ``batch[CLEAN_KEY]`` (see :func:`with_clean_prediction`);
    - ``correct_margin(output, batch) -> (B,)``: ``tau - shift`` (> 0 exactly where ``is_correct``), so the
      minimum-norm attacks (FMN, C&W) find the smallest perturbation that shifts the prediction by ``tau``.

    Args:
        objective: a regression objective with ``prediction(output, batch) -> (B,)``.
        direction: ``"up"`` or ``"down"``.
        tau: the shift after which a sample counts as fooled, > 0; ``None``: never.
    """

    def __init__(self, objective: Any, direction: str = "up", tau: float | None = None) -> None:
        if not callable(getattr(objective, "prediction", None)):
            raise TypeError("directional attacks need a regression task: the objective must provide "
                            f"prediction(output, batch) -> (B,); {type(objective).__name__} has none")
        self.objective = objective
        self.direction = direction
        self.sign = check_direction(direction)
        self.tau = check_positive("tau", tau)

    def attack_loss(self, output: Any, batch: dict) -> Tensor:
        return self.sign * self.objective.prediction(output, batch)

    def is_correct(self, output: Any, batch: dict) -> Tensor:
        if self.tau is None:  # shaped like the prediction, whatever the output's structure
            return torch.ones_like(self.objective.prediction(output, batch), dtype=torch.bool)
        return self.correct_margin(output, batch) > 0

    def correct_margin(self, output: Any, batch: dict) -> Tensor:
        if self.tau is None:
            raise ValueError("ShiftObjective has no margin without a target shift: give tau")
        if CLEAN_KEY not in batch:
            raise KeyError(f"ShiftObjective(tau={self.tau}) measures the shift from the clean predictions in "
                           f"batch[{CLEAN_KEY!r}]; add them with with_clean_prediction(model, x, batch, objective)")
        shift = self.attack_loss(output, batch) - self.sign * batch[CLEAN_KEY]
        return self.tau - shift


def with_clean_prediction(model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
                          bn_eval: bool = True, dropout_eval: bool = True) -> dict:
    """A copy of ``batch`` with the clean predictions ``(B,)`` of ``x`` under :data:`CLEAN_KEY`.

    Computed in the same session the attacks use (eval-mode BatchNorm / dropout), so the reference is the
    prediction the attack starts from. ``batch`` itself is not modified.
    """
    predict = ShiftObjective(objective, "up")  # attack_loss is the prediction itself
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval), torch.no_grad():
        x, prepared = prepare(x, batch)
        clean, _ = objective_values(model, predict, x, prepared)
    return {**batch, CLEAN_KEY: clean}


@hyperparameters(threat=norm_in(DENSE_NORMS, "directional_attack"), direction=_direction, steps=at_least(1),
                 rel_step_size=check_positive, random_start=flag, restarts=at_least(1), tau=check_positive)
def directional_attack(
    model: Callable,
    x: Tensor,
    batch: Mapping,
    objective: Any,
    *,
    threat: ThreatModel,
    direction: str = "up",
    steps: int = 1,
    step_size: float | Tensor | None = None,
    rel_step_size: float | None = None,
    random_start: bool = False,
    restarts: int = 1,
    tau: float | None = None,
    bn_eval: bool = True,
    dropout_eval: bool = True,
) -> Tensor:
    """Shift ``objective.prediction`` up or down inside the threat model.

    ``steps=1`` is the one-step attack of Li et al. (FGSM on the prediction: ``x + eps * sign(g)`` for Linf,
    ``x + eps * g / ||g||_2`` for L2, then clamped into bounds); ``steps > 1`` is PGD on the prediction,
    returning per sample the visited point with the largest shift (or, with ``tau``, the first point that
    shifts it by ``tau``: per-sample early stopping).

    Args:
        model: the forward, ``(B, C, *spatial) -> output``.
        x: clean images ``(B, C, *spatial)``, inside ``threat.bounds``.
        batch: the batch dict the objective reads (labels, anatomical features); passed through untouched.
        objective: a regression objective with ``prediction(output, batch) -> (B,)``.
        threat: norm, eps (float or ``(B,)``, model units; ``resolve_eps(eps, "range", x=x)`` for a fraction
            of each image's intensity range) and bounds.
        direction: ``"up"`` (older) or ``"down"`` (younger).
        steps: 1 for the one-step attack, more for the iterative one.
        step_size / rel_step_size: absolute or eps-relative step (not both); default ``eps`` for one step
            (``1.25 eps`` with ``random_start``), ``2.5 eps / steps`` for PGD.
        random_start: start from a uniform point of the ball (FGSM-RS for one step).
        restarts: PGD runs from fresh random starts (``steps > 1`` with ``random_start`` only).
        tau: target shift (target units) after which a sample is done (PGD's early stopping; the one-step
            attack always takes its one step); ``None``: the largest shift.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)`` like ``x``, in the ball and the bounds.
    """
    shift = ShiftObjective(objective, direction, tau)
    session = {"bn_eval": bn_eval, "dropout_eval": dropout_eval}
    if steps == 1 and restarts == 1:
        return fgsm_attack(model, x, batch, shift, threat=threat, random_start=random_start,
                           step_size=step_size, rel_step_size=rel_step_size, **session)
    if tau is not None:
        batch = with_clean_prediction(model, x, batch, objective, **session)
    return pgd_attack(model, x, batch, shift, threat=threat, steps=steps, step_size=step_size,
                      rel_step_size=rel_step_size, random_start=random_start, restarts=restarts,
                      early_stop=tau is not None, **session)


class Directional(Attack):
    """The directional (age-shifting) attack for configs (Hydra), suites and callbacks.

    Args (those of :func:`directional_attack`, checked the same way; only ``direction`` by position):
        direction: ``"up"`` or ``"down"``.
        norm: ``"linf"`` (the paper's) or ``"l2"``.
        steps: 1 for Li et al.'s one-step attack, more for PGD on the prediction.
        rel_step_size: step as a multiple of eps; default 1 for one step, ``2.5 / steps`` for PGD.
        random_start: start from a uniform point of the ball.
        restarts: PGD random restarts (>= 1), the largest shift per sample kept.
        tau: target shift (target units, e.g. years) after which a sample is done; ``None``: largest shift.
        bn_eval / dropout_eval: normalization / dropout layers in eval mode during the attack.

    Call: ``Directional("down")(model, x, batch, task, eps=..., bounds=...)``; ``name`` is
    ``"directional_down"`` (one step) or ``"directional_down_pgd10"`` (10 steps; ``x5`` with 5 restarts).
    """

    requires = ("prediction",)  # the task members it reads; RobustnessEvaluation checks them at setup
    # it shifts predictions, not toward errors: every sample is attacked at every eps (a sample the task already
    # gets wrong still has its prediction moved), and the masking checks leave its curves out
    seeks_errors = False

    functional = staticmethod(directional_attack)
    first = "direction"

    @property
    def name(self) -> str:
        iterative = self.steps > 1 or self.restarts > 1
        return f"directional_{self.direction}" + (f"_pgd{self.steps}" if iterative else "") + (
            f"x{self.restarts}" if self.restarts > 1 else "")
