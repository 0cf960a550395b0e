"""A lowest-Dice ensemble of APGD runs on several segmentation losses, in the spirit of SEA (Croce et al.,
"Towards Reliable Evaluation and Fast Training of Robust Semantic Segmentation Models", ECCV 2024).

SEA showed that a single loss (SegPGD's, CosPGD's) overestimates segmentation robustness, and that the
iterate to keep is the worst one for the *metric*, not the one of highest loss. So each member is APGD
climbing one loss (the task's Dice + CE, SegPGD's, CosPGD's, the Dice margin) while every iterate is ranked by
the task's Dice margin ``-correct_margin`` (:class:`~medrobust.attacks.core.objectives.RankedLoss`: APGD's
best point, restarts and step halving all follow the margin), and the ensemble keeps per sample the point with
the lowest margin over the members (ROG, Malik et al. 2024, also keeps the lowest-Dice iterate).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, without_early_stop
from medrobust.attacks.core.batch import index_batch, prepare
from medrobust.attacks.core.objectives import RankedLoss, require_margin
from medrobust.attacks.core.options import at_least, flag, hyperparameters, norm_in
from medrobust.attacks.core.threat import DENSE_NORMS, ThreatModel
from medrobust.attacks.core.tracking import AttackResult, BestTracker
from medrobust.attacks.gradient.apgd import apgd_attack, check_rho
from medrobust.attacks.segmentation.dense import DENSE_OUTPUT, dense_labels
from medrobust.attacks.segmentation.losses import cospgd_loss, segpgd_loss

# member losses: the task's (Dice + CE), SegPGD's at its first step (the CE of the voxels still right: SEA's
# Mask-CE; APGD has no step schedule), CosPGD's, and the Dice margin itself
ENSEMBLE_LOSSES = ("dice_ce", "segpgd", "cospgd", "margin")


def check_losses(name: str, losses: Any) -> tuple[str, ...]:
    """A non-empty sequence of :data:`ENSEMBLE_LOSSES` names, as a tuple; a ``ValueError`` quoting a bad one."""
    losses = (losses,) if isinstance(losses, str) else tuple(str(loss) for loss in losses)
    unknown = [loss for loss in losses if loss not in ENSEMBLE_LOSSES]
    if not losses or unknown:
        raise ValueError(f"{name} must name some of {ENSEMBLE_LOSSES}, got {losses!r}")
    return losses


def ensemble_member(objective: Any, loss: str) -> RankedLoss:
    """``objective`` climbing ``loss`` (one of :data:`ENSEMBLE_LOSSES`), its points ranked by ``-correct_margin``."""
    key = getattr(objective, "label_key", "label")

    def labels(out: Tensor, b: dict) -> Tensor:
        return dense_labels(b[key], out, "SegEnsemble")

    def margin_loss(out: Tensor, b: dict) -> Tensor:
        return -objective.correct_margin(out, b)

    climbs = {"dice_ce": objective.attack_loss, "margin": margin_loss,
              "segpgd": lambda out, b: segpgd_loss(out, labels(out, b), 0.0),
              "cospgd": lambda out, b: cospgd_loss(out, labels(out, b))}
    return RankedLoss(objective, climbs[loss], margin_loss)


@hyperparameters(threat=norm_in(DENSE_NORMS, "SegEnsemble"), steps=at_least(1), losses=check_losses, rho=check_rho,
                 early_stop=flag)
def seg_ensemble_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel,
                        steps: int = 100, losses: tuple[str, ...] = ENSEMBLE_LOSSES, rho: float = 0.75,
                        early_stop: bool = True, seed: int | None = 0, bn_eval: bool = True,
                        dropout_eval: bool = True, return_result: bool = False) -> Tensor | AttackResult:
    """APGD with each of ``losses`` on segmentation logits ``(B, K, *spatial)``; per sample, the lowest-Dice point.

    Args:
        model: the forward, images ``(B, C, *spatial)`` -> logits ``(B, K, *spatial)``.
        x: clean images ``(B, C, *spatial)``, inside ``threat.bounds``.
        batch: the batch dict; ``batch[objective.label_key]`` integer masks ``(B, *spatial)``.
        objective: the task: ``attack_loss``, ``is_correct`` and ``correct_margin`` (mean foreground Dice
            minus tau: > 0 exactly where correct), which ranks every point.
        threat: ``linf`` or ``l2``, eps (float or ``(B,)``) and bounds.
        steps: APGD steps per member (>= 1).
        losses: the members, in order, among :data:`ENSEMBLE_LOSSES`.
        rho: APGD's step-halving threshold.
        early_stop: a sample is done at its first point with ``is_correct`` false; later members attack only
            the samples no earlier one broke. ``False`` (the full budget): every member runs every step on every
            sample and the lowest-margin point over all members is returned.
        seed: seeds each member's random start (``None``: the global RNG).
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.
        return_result: return an :class:`AttackResult` (its ``loss``: ``-correct_margin`` at the point).

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)`` in the ball and the bounds (or an AttackResult).
    """
    require_margin(objective, "SegEnsemble")
    x, batch = prepare(x, batch)
    eps = threat.eps_for(x)
    tracker = BestTracker(x, prefer_success=early_stop)
    everyone = torch.arange(x.shape[0], device=x.device)
    for loss in losses:  # each APGD run sets the model's modes itself
        idx = (~tracker.success).nonzero().flatten() if early_stop else everyone
        if len(idx) == 0:
            break
        threat_idx = ThreatModel(threat.norm, eps[idx], threat.bounds)
        member = apgd_attack(model, x[idx], index_batch(batch, idx, batch_size=x.shape[0]),
                             ensemble_member(objective, loss), threat=threat_idx, steps=steps, loss="default",
                             rho=rho, early_stop=early_stop, seed=seed, bn_eval=bn_eval, dropout_eval=dropout_eval,
                             return_result=True)
        tracker.update(idx, member.x_adv, member.loss, ~member.success)  # loss: -correct_margin there
    result = tracker.result()
    return result if return_result else result.x_adv


class SegEnsemble(Attack):
    """The lowest-Dice APGD ensemble for configs (Hydra), suites and callbacks; see :func:`seg_ensemble_attack`.

    Args (those of :func:`seg_ensemble_attack`, checked the same way): norm (``"linf"`` / ``"l2"``), steps,
    losses, rho, early_stop, seed, bn_eval, dropout_eval.

    Call: ``SegEnsemble(steps=50)(model, x, batch, task, eps=..., bounds=...)``; ``name`` is ``"seg-ensemble"``.
    """

    survivors_had_full_budget = True  # its full-budget form only drops the early stop

    name = "seg-ensemble"
    functional = staticmethod(seg_ensemble_attack)
    requires = DENSE_OUTPUT

    def full_budget(self) -> "SegEnsemble":
        return without_early_stop(self)
