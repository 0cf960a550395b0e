"""FGSM (Goodfellow et al., 2015) and FGSM with random start (Wong et al., "Fast is better than free", 2020)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from torch import Tensor

from medrobust.attacks.core.base import Attack, check_positive
from medrobust.attacks.core.batch import prepare
from medrobust.attacks.core.options import flag, hyperparameters, norm_in
from medrobust.attacks.core.session import attack_session, loss_and_grad
from medrobust.attacks.core.steps import ascent_step, per_sample_step, start_point
from medrobust.attacks.core.threat import DENSE_NORMS, ThreatModel, constrain

RS_STEP = 1.25  # Wong et al.: step 1.25 eps from a uniform random start


@hyperparameters(threat=norm_in(DENSE_NORMS, "FGSM"), random_start=flag, rel_step_size=check_positive)
def fgsm_attack(
    model: Callable,
    x: Tensor,
    batch: Mapping,
    objective: Any,
    *,
    threat: ThreatModel,
    random_start: bool = False,
    step_size: float | Tensor | None = None,
    rel_step_size: float | None = None,
    bn_eval: bool = True,
    dropout_eval: bool = True,
) -> Tensor:
    """One steepest-ascent step on ``objective.attack_loss``: ``sign(g)`` for Linf, ``g / ||g||_2`` for L2.

    Args:
        model: the forward, ``(B, C, *spatial) -> output``.
        x: clean images ``(B, C, *spatial)``, inside ``threat.bounds``.
        batch: the batch dict (labels etc.) the objective reads; its ``"image"`` is not used.
        objective: has ``attack_loss(output, batch) -> (B,)`` and ``is_correct(output, batch) -> (B,)``.
        threat: norm, eps (float or ``(B,)``, model units) and bounds.
        random_start: start from a uniform point of the ball (FGSM-RS).
        step_size: absolute step, float or ``(B,)``; default ``eps`` (``1.25 eps`` with ``random_start``).
        rel_step_size: the step as a multiple of eps instead (not both).
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)`` like ``x``, in the ball and the bounds. No extra forward is
        spent checking it: FGSM costs one forward and one backward.
    """
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval):
        x, batch = prepare(x, batch)
        eps = threat.eps_for(x)
        if threat.max_eps() == 0:
            return x.clone()
        step = per_sample_step(step_size, rel_step_size, eps, RS_STEP if random_start else 1.0)
        x_adv = start_point(x, threat, eps, random_start)
        _, grad, _ = loss_and_grad(model, objective, x_adv, batch)
        x_adv = ascent_step(x_adv, grad, threat.norm, step)
        return constrain(x, x_adv, threat.norm, eps, threat.bounds).detach()


class FGSM(Attack):
    """FGSM / FGSM-RS with the step relative to eps, for configs (Hydra) and callbacks.

    Args (those of :func:`fgsm_attack`, checked the same way):
        norm: ``"linf"`` or ``"l2"``.
        random_start: FGSM-RS (uniform start in the ball).
        rel_step_size: step as a multiple of eps; default 1 (1.25 with ``random_start``).
        bn_eval / dropout_eval: normalization / dropout layers in eval mode during the attack.

    Call: ``FGSM()(model, x, batch, objective, eps=..., bounds=...)``.
    """

    survivors_had_full_budget = True  # one step: every sample it attacks gets its whole budget

    functional = staticmethod(fgsm_attack)

    @property
    def name(self) -> str:
        return "fgsm_rs" if self.random_start else "fgsm"

    def full_budget(self) -> "FGSM":
        return self  # one step from each sample: its one point is its whole budget
