"""DAG for detection (Xie et al., "Adversarial Examples for Semantic Segmentation and Object Detection", ICCV 2017)
on CenterNet detectors (:class:`~medrobust.tasks.detection.DetectionTask`), 2-D and 3-D.

Xie et al.'s *proposals* are, on a CenterNet, the clean detections' peak cells scoring ``>= score_threshold``. Each
gets an adversarial label ``t``: another class (``"random"``, the paper's; ``"next"``; ``"nearest"``, the runner-up
at the cell) or ``"background"``. A proposal stays *active* while its true class still scores ``>= score_threshold``
at its cell (the detection is still there with its label). Each iteration ascends ``sum_{active p} z_t(p) - z_y(p)``
(heatmap logits), the step normalised by its Linf norm and scaled by ``gamma * eps`` as the segmentation DAG's (the
same iterations: :mod:`medrobust.attacks.segmentation.dag`), kept in the eps ball and the bounds; a sample is done
once no proposal is active.

Background has no logit on a CenterNet (the classes are independent sigmoids): its ``z_t`` is the constant
``logit(score_threshold)``, so ``z_t - z_y`` is the true logit's height above the operating point, which the step
pushes down. A single-class detector has no other class: every target is background there, whatever ``target``
says, and DAG makes its detections vanish.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, check_positive
from medrobust.attacks.core.dag_loop import dag_iterations
from medrobust.attacks.core.batch import attack_key, float_output, prepare
from medrobust.attacks.core.options import at_least, hyperparameters, norm_in
from medrobust.attacks.core.session import attack_session
from medrobust.attacks.core.threat import DENSE_NORMS, ThreatModel
from medrobust.attacks.core.tracking import AttackResult, BestTracker, WorkingSet
from medrobust.attacks.detection.tog import DETECTION_MEMBERS, detection_logits, operating_point, task_of
from medrobust.attacks.segmentation.dense import dense_targets
from medrobust.models.centernet import gather_at

TARGETS = ("random", "next", "nearest", "background")
_KEYS = {name: attack_key(f"proposal_{name}") for name in ("cells", "labels", "targets", "valid")}


def _check_target(name: str, target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"{name} must be one of {TARGETS} (the proposals' adversarial label), got {target!r}")
    return target


def logit_threshold(task: Any) -> float:
    """``logit(task.score_threshold)``: the heatmap logit a detection needs; a ``ValueError`` for a threshold of 0,
    where every cell is a detection and none can be made to vanish."""
    threshold = float(task.score_threshold)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"DetectionDAG needs {type(task).__name__}.score_threshold in (0, 1), got {threshold!r}")
    return math.log(threshold / (1.0 - threshold))


def proposals(task: Any, clean_output: Mapping, target: str, seed: int | None) -> dict[str, Tensor]:
    """The proposals of a clean output as batch entries: flat cells, true labels, adversarial labels (``K`` for
    background) and ``valid`` ``(B, M)``."""
    found = operating_point(task, clean_output)
    logits, cells = detection_logits(task, clean_output, found)
    labels, classes = found["labels"], logits.shape[-1]
    if target == "background" or classes == 1:
        targets = torch.full_like(labels, classes)
    else:
        targets = dense_targets(target, logits.transpose(1, 2), labels, seed).to(labels.device)
    values = {"cells": cells, "labels": labels, "targets": targets, "valid": found["valid"]}
    return {_KEYS[name]: value for name, value in values.items()}


class _ProposalAdversary:
    """DAG's objective on the proposals in the batch: ``attack_loss`` ``sum_{active p} z_t(p) - z_y(p)``;
    ``is_correct``: some proposal still active. After each call ``score`` ``(B,)`` ranks points as the segmentation
    DAG's: the share of proposals defeated, ties broken (within one proposal) towards the active ones closest to
    falling."""

    def __init__(self, threshold_logit: float) -> None:
        self.threshold_logit = threshold_logit
        self.score: Tensor | None = None
        self.standing: Tensor | None = None

    def gaps(self, output: Mapping, batch: Mapping) -> tuple[Tensor, Tensor]:
        """``z_t - z_y`` ``(B, M)`` and which proposals are active ``(B, M)``."""
        logits = gather_at(output["heatmap"].float(), batch[_KEYS["cells"]])  # (B, M, K)
        labels, targets, classes = batch[_KEYS["labels"]], batch[_KEYS["targets"]], logits.shape[-1]
        true = logits.gather(2, labels[..., None])[..., 0]
        adversarial = logits.gather(2, targets.clamp_max(classes - 1)[..., None])[..., 0]
        adversarial = torch.where(targets == classes, torch.full_like(true, self.threshold_logit), adversarial)
        return adversarial - true, batch[_KEYS["valid"]] & (true.detach() >= self.threshold_logit)

    def attack_loss(self, output: Mapping, batch: dict) -> Tensor:
        gap, active = self.gaps(output, batch)
        loss = (gap * active).sum(dim=1)
        with torch.no_grad():
            self.standing = active.sum(dim=1)
            total = batch[_KEYS["valid"]].sum(dim=1).clamp_min(1)
            closeness = torch.sigmoid(loss.detach() / self.standing.clamp_min(1))  # in (0, 1): a tie-breaker
            self.score = (total - self.standing + closeness) / total
        return loss

    def is_correct(self, output: Mapping, batch: dict) -> Tensor:
        return self.standing > 0


@hyperparameters(threat=norm_in(DENSE_NORMS, "DetectionDAG"), steps=at_least(1), gamma=check_positive,
                 target=_check_target)
def detection_dag_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel,
                         steps: int = 50, gamma: float = 0.5, target: str = "random", seed: int | None = None,
                         bn_eval: bool = True, dropout_eval: bool = True,
                         return_result: bool = False) -> Tensor | AttackResult:
    """DAG against a CenterNet detection task inside the threat model (see the module docstring).

    Args:
        model: the forward, images ``(B, C, *spatial)`` -> ``{"heatmap": (B, K, *out) logits, ...}``.
        x: clean images ``(B, C, *spatial)``, inside ``threat.bounds``.
        batch: the batch dict (only carried along: the proposals come from the clean forward).
        objective: the detection task (or an adapter of it): its ``detections``, ``peak_index`` and
            ``score_threshold`` give the proposals; its loss is not used.
        threat: norm (``linf``: steps ``r / ||r||_inf``, the paper's; ``l2``: ``r / ||r||_2``), eps and bounds.
        steps: maximum iterations (>= 1); gamma: the step as a fraction of eps.
        target: the proposals' adversarial label, one of :data:`TARGETS` (background on a single-class task).
        seed: seed of the ``"random"`` labels (drawn on the CPU); ``None``: torch's global RNG.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.
        return_result: return an :class:`AttackResult`; its ``loss`` is the share of proposals defeated (plus a
            tie-breaker below one proposal).

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)``: per sample the first point with no proposal active, else the point
        with the fewest active, the closest to falling among equals (``x`` for samples without a proposal).
    """
    task = task_of(objective)
    adversary = _ProposalAdversary(logit_threshold(task))
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval):
        x, batch = prepare(x, batch)
        eps = threat.eps_for(x)
        tracker = BestTracker(x, prefer_success=True)
        if threat.max_eps() == 0 and not return_result:
            return tracker.x_adv
        with torch.no_grad():
            batch.update(proposals(task, float_output(model(x)), target, seed))
        work = WorkingSet.full(x, batch, eps, gamma * eps)
        dag_iterations(model, adversary, work, threat, tracker, steps if threat.max_eps() > 0 else 0)
    result = tracker.result()
    return result if return_result else result.x_adv


class DetectionDAG(Attack):
    """DAG for detection, for configs (Hydra), suites and callbacks; see :func:`detection_dag_attack`.

    Args (those of :func:`detection_dag_attack`, checked the same way): ``norm`` (``"linf"``, ``"l2"``),
    ``steps``, ``gamma``, ``target`` (``"random"``, ``"next"``, ``"nearest"``, ``"background"``), ``seed``.

    It seeks chosen labels for the clean detections, not the task's errors (``seeks_errors`` false, ``targeted``):
    curves attack every sample at each eps and the masking checks leave it out. Curves report ``dag_success`` (1
    where no proposal is active; NaN, hence left out of the mean, for samples without a proposal) and
    ``proposals_left`` (the active ones), read at the attack's own points. ``name`` is ``"dag-detection"``.
    """

    name = "dag-detection"
    functional = staticmethod(detection_dag_attack)
    requires = DETECTION_MEMBERS  # detection tasks only; RobustnessEvaluation checks them at setup
    seeks_errors = False
    targeted = True
    extra_metrics = ("dag_success", "proposals_left")

    def extra_values(self, task: Any, output: Mapping, clean_output: Mapping, batch: Mapping) -> dict[str, Tensor]:
        """Per sample ``(B,)``: ``dag_success`` (1 / 0, NaN without a proposal) and ``proposals_left`` at ``output``."""
        aimed = proposals(task, float_output(clean_output), "background", None)  # the label aimed at is not read
        _, active = _ProposalAdversary(logit_threshold(task)).gaps(float_output(output), aimed)
        left = active.sum(dim=1)
        some = aimed[_KEYS["valid"]].any(dim=1)
        return {"dag_success": torch.where(some, (left == 0).float(), torch.nan), "proposals_left": left.float()}
