"""DAG, Dense Adversary Generation (Xie et al., "Adversarial Examples for Semantic Segmentation and Object
Detection", ICCV 2017), for segmentation logits ``(B, K, *spatial)`` against integer masks.

Every pixel / voxel gets an adversarial target label ``t`` (a wrong class; with the seed-001 structure targets,
``"swap:a,b"`` and ``"dilate:a,b"``, only the two structures' voxels get one and the rest is left alone). Each
iteration, over the set ``T`` of attacked pixels the model still gets right, DAG ascends
``sum_{p in T} z_t(p) - z_y(p)`` with a step normalized by its Linf norm (``r / ||r||_inf``, scaled by
``gamma``); pixels already fooled drop out of the sum, so the step concentrates on those still standing. Unlike
the paper (unconstrained, ``gamma`` in 0-255 units), the perturbation is kept in the threat model's eps ball and
bounds and ``gamma`` is relative to eps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, check_positive, without_early_stop
from medrobust.attacks.core.dag_loop import dag_iterations
from medrobust.attacks.core.batch import prepare
from medrobust.attacks.core.options import at_least, flag, hyperparameters, norm_in
from medrobust.attacks.core.session import attack_session
from medrobust.attacks.core.threat import DENSE_NORMS, ThreatModel
from medrobust.attacks.core.tracking import AttackResult, BestTracker, WorkingSet
from medrobust.attacks.segmentation.dense import (
    DENSE_OUTPUT,
    DENSE_TARGET_KEY,
    check_target,
    dense_labels,
    predicted_right,
    target_map,
)


def _check_stop_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


class _DenseAdversary:
    """The DAG objective: ``attack_loss`` is ``sum_{correct p} z_t(p) - z_y(p)``; ``is_correct`` says whether
    the sample is still standing (more than ``stop_fraction`` of its attacked pixels right, and the task
    objective's own ``is_correct`` when ``use_objective``). Attacked pixels: those whose target is not their
    label (all of them, but for structure targets); a sample with none is done at once.

    After each call, ``fraction`` ``(B,)`` is the attacked pixels' accuracy and ``score`` ``(B,)`` what the best
    point is chosen by: their error rate, ties broken (within ``1 / n_pixels``) towards the point whose
    standing pixels are closest to flipping, so that a run flipping nothing still returns its best effort.
    """

    def __init__(self, objective: Any, label_key: str, stop_fraction: float, use_objective: bool) -> None:
        self.objective = objective if use_objective and hasattr(objective, "is_correct") else None
        self.label_key = label_key
        self.stop_fraction = stop_fraction
        self.fraction: Tensor | None = None
        self.score: Tensor | None = None

    def attack_loss(self, output: Tensor, batch: dict) -> Tensor:
        labels = dense_labels(batch[self.label_key], output, "DAG").unsqueeze(1)
        target = batch[DENSE_TARGET_KEY].unsqueeze(1)
        attacked = target != labels  # a voxel whose target is its label (structure targets) is left alone
        active = predicted_right(output, labels[:, 0]).unsqueeze(1) & attacked  # the set T of pixels still correct
        gap = output.gather(1, target) - output.gather(1, labels)
        loss = (gap * active).flatten(1).sum(dim=1)
        with torch.no_grad():
            standing = active.flatten(1).sum(dim=1)
            pixels = attacked.flatten(1).sum(dim=1).clamp_min(1)
            self.fraction = standing.float() / pixels
            closeness = torch.sigmoid(loss.detach().float() / standing.clamp_min(1))  # in (0, 1): a tie-breaker
            self.score = (pixels - standing + closeness) / pixels
        return loss

    def is_correct(self, output: Tensor, batch: dict) -> Tensor:
        standing = self.fraction > self.stop_fraction
        if self.objective is not None:
            standing = standing & self.objective.is_correct(output, batch).bool()
        return standing


@hyperparameters(threat=norm_in(DENSE_NORMS, "DAG"), steps=at_least(1), gamma=check_positive, target=check_target,
                 stop_fraction=_check_stop_fraction, early_stop=flag)
def dag_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any = None, *, threat: ThreatModel,
               steps: int = 50, gamma: float = 0.5, target: str | Tensor | None = None, stop_fraction: float = 0.0,
               early_stop: bool = True, label_key: str = "label", seed: int | None = None, bn_eval: bool = True,
               dropout_eval: bool = True, return_result: bool = False) -> Tensor | AttackResult:
    """DAG against a segmentation model inside the threat model.

    Args:
        model: the forward, images ``(B, C, *spatial)`` -> logits ``(B, K, *spatial)``, ``K >= 2``
            (2-D ``(B, K, H, W)`` or 3-D ``(B, K, D, H, W)``).
        x: clean images ``(B, C, *spatial)``, inside ``threat.bounds``.
        batch: the batch dict; ``batch[label_key]`` integer masks ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        objective: optional; when it has ``is_correct`` (e.g. Dice >= tau) and ``early_stop``, a sample also
            stops as soon as the objective counts it wrong. Its ``attack_loss`` is not used.
        threat: norm (``linf``: steps ``r / ||r||_inf``; ``l2``: ``r / ||r||_2``), eps (float or ``(B,)``) and
            bounds; every iterate is projected onto the ball and clamped into bounds.
        steps: maximum iterations (>= 1).
        gamma: step size as a fraction of eps (the step's Linf or L2 norm is ``gamma * eps``).
        target: per-pixel adversarial class: ``"random"`` (default, as in the paper; a uniform wrong class,
            drawn with ``seed``), ``"next"`` (``(y + 1) % K``), ``"nearest"`` (the runner-up class at the
            clean point, usually the strongest), the seed-001 structure targets ``"swap:a,b"`` (structures
            ``a`` and ``b`` exchange labels) and ``"dilate:a,b[,r]"`` (``a`` grown ``r`` voxels, default 1, into
            its neighbour ``b``), or a tensor ``(B, *spatial)``; see
            :func:`~medrobust.attacks.segmentation.dense.dense_targets`. Pixels whose target is their label
            are not attacked.
        stop_fraction: a sample is done once the fraction of its attacked pixels still correct is ``<= stop_fraction``
            (0: the paper's "no pixel left").
        early_stop: also stop on ``objective.is_correct`` being false (ignored without an objective).
        seed: seed of the ``"random"`` targets; ``None`` uses torch's global RNG.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.
        return_result: return an :class:`AttackResult`; its ``loss`` ``(B,)`` is the pixel error rate (plus a
            tie-breaker below ``1 / n_pixels``).

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)``: per sample the first point where it is done, else the point
        with the fewest pixels correct, the standing ones closest to flipping among equals (the clean ``x``
        for samples done at the start).
    """
    dense = _DenseAdversary(objective, label_key, stop_fraction, early_stop)
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval):
        x, batch = prepare(x, batch)
        if label_key not in batch:
            raise KeyError(f"DAG needs integer masks under {label_key!r}; batch keys: {list(batch)}")
        eps = threat.eps_for(x)
        tracker = BestTracker(x, prefer_success=True)
        if threat.max_eps() == 0 and not return_result:
            return tracker.x_adv
        batch[DENSE_TARGET_KEY] = target_map(model, x, batch[label_key], target, seed, "DAG")
        work = WorkingSet.full(x, batch, eps, gamma * eps)
        dag_iterations(model, dense, work, threat, tracker, steps if threat.max_eps() > 0 else 0)
    result = tracker.result()
    return result if return_result else result.x_adv


class DAG(Attack):
    """DAG for segmentation, for configs (Hydra), suites and callbacks; see :func:`dag_attack`.

    Args (those of :func:`dag_attack`, checked the same way):
        norm: ``"linf"`` or ``"l2"`` (the ball the perturbation stays in, and the step normalization).
        steps: maximum iterations (>= 1).
        gamma: step as a fraction of eps.
        target: ``None`` / ``"random"``, ``"next"``, ``"nearest"``, ``"swap:a,b"`` or ``"dilate:a,b[,r]"``.
        stop_fraction: done when at most this fraction of a sample's pixels is still correct.
        early_stop: also stop a sample once ``objective.is_correct`` is false.
        label_key: where the integer masks ``(B, *spatial)`` / ``(B, 1, *spatial)`` are in the batch.
        seed: seed of the random targets (``None``: torch's global RNG).

    Call: ``DAG()(model, x, batch, objective, eps=..., bounds=...)`` with ``model(x)`` the logits
    ``(B, K, *spatial)``; ``name`` is ``"dag"``.
    """

    survivors_had_full_budget = True  # its full-budget form only drops the early stop

    name = "dag"
    functional = staticmethod(dag_attack)
    requires = DENSE_OUTPUT  # segmentation tasks only; RobustnessEvaluation checks it at setup

    @property
    def targeted(self) -> bool:
        """Structure targets (swap, dilate) and given target maps push chosen voxels to chosen classes: a Dice they
        leave higher than an untargeted attack's says nothing of masking, so they stay out of the masking checks'
        strength order. Per-voxel wrong classes (random, next, nearest) seek any error: untargeted."""
        if isinstance(self.target, str):
            return self.target.split(":")[0] in ("swap", "dilate")
        return self.target is not None

    def full_budget(self) -> "DAG":
        return without_early_stop(self)
