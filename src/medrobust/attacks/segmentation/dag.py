"""DAG, Dense Adversary Generation (Xie et al., "Adversarial Examples for Semantic Segmentation and Object
Detection", ICCV 2017), for segmentation logits ``(B, K, *spatial)`` against integer masks.

Every pixel / voxel gets an adversarial target label ``t`` (a wrong class). Each iteration, over the set
``T`` of pixels the model still gets right, DAG ascends ``sum_{p in T} z_t(p) - z_y(p)`` with a step
normalized by its Linf norm (``r / ||r||_inf``, scaled by ``gamma``); pixels already fooled drop out of the
sum, so the step concentrates on those still standing. Unlike the paper (unconstrained, ``gamma`` in
0-255 units), the perturbation is kept in the threat model's eps ball and bounds and ``gamma`` is relative
to eps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, check_positive, without_early_stop
from medrobust.attacks.core.batch import attack_key, prepare
from medrobust.attacks.core.options import at_least, flag, hyperparameters, norm_in
from medrobust.attacks.core.session import attack_session, loss_and_grad, objective_values
from medrobust.attacks.core.threat import (
    DENSE_NORMS,
    ThreatModel,
    ascent_direction,
    batch_view,
    constrain,
    lp_norm,
)
from medrobust.attacks.core.tracking import AttackResult, BestTracker, WorkingSet

TARGETS = ("random", "next", "nearest")
_TARGET = attack_key("dense_target")  # the per-pixel targets travel in the batch dict, so WorkingSet indexes them too


def _labels(labels: Tensor, logits: Tensor) -> Tensor:
    """Integer masks ``(B, *spatial)`` from ``(B, *spatial)`` or ``(B, 1, *spatial)``, checked against logits."""
    if labels.ndim == logits.ndim and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"DAG needs masks of shape (B, *spatial) or (B, 1, *spatial) matching the logits "
                         f"{tuple(logits.shape)} (B, K, *spatial); got labels of shape {tuple(labels.shape)}")
    return labels.long()


def _check_target(name: str, target: str | Tensor | None) -> str | Tensor | None:
    if not (target is None or isinstance(target, Tensor) or target in TARGETS):
        raise ValueError(f"unknown DAG {name} {target!r}; expected None, one of {TARGETS} or a (B, *spatial) tensor")
    return target


def _check_stop_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _targets(target: str | Tensor | None, logits: Tensor, labels: Tensor, seed: int | None) -> Tensor:
    """Adversarial target class per pixel ``(B, *spatial)`` (never the label, except for a given tensor)."""
    k = logits.shape[1]
    if isinstance(target, Tensor):
        target = _labels(target.to(labels.device), logits)
        if bool((target < 0).any()) or bool((target >= k).any()):
            raise ValueError(f"target classes must be in [0, {k}), got values in "
                             f"[{int(target.min())}, {int(target.max())}]")
        return target
    target = "random" if target is None else target
    if target == "next":
        return (labels + 1) % k
    if target == "nearest":  # the runner-up class at the clean point: the closest decision boundary
        return logits.scatter(1, labels.unsqueeze(1), float("-inf")).argmax(dim=1)
    # "random": uniform over the K - 1 wrong classes; CPU generator: the same draw on every device
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    shift = torch.randint(1, k, tuple(labels.shape), generator=generator).to(labels.device)
    return (labels + shift) % k


class _DenseAdversary:
    """The DAG objective: ``attack_loss`` is ``sum_{correct p} z_t(p) - z_y(p)``; ``is_correct`` says whether
    the sample is still standing (more than ``stop_fraction`` of its pixels right, and the task objective's
    own ``is_correct`` when ``use_objective``).

    After each call, ``fraction`` ``(B,)`` is the pixel accuracy and ``score`` ``(B,)`` what the best point
    is chosen by: the pixel error rate, ties broken (within ``1 / n_pixels``) towards the point whose
    standing pixels are closest to flipping, so that a run flipping nothing still returns its best effort.
    """

    def __init__(self, objective: Any, label_key: str, stop_fraction: float, use_objective: bool) -> None:
        self.objective = objective if use_objective and hasattr(objective, "is_correct") else None
        self.label_key = label_key
        self.stop_fraction = stop_fraction
        self.fraction: Tensor | None = None
        self.score: Tensor | None = None

    def attack_loss(self, output: Tensor, batch: dict) -> Tensor:
        labels = _labels(batch[self.label_key], output).unsqueeze(1)
        active = output.argmax(dim=1, keepdim=True) == labels  # the set T of pixels still correct
        gap = output.gather(1, batch[_TARGET].unsqueeze(1)) - output.gather(1, labels)
        loss = (gap * active).flatten(1).sum(dim=1)
        with torch.no_grad():
            standing = active.flatten(1).sum(dim=1)
            pixels = active[0].numel()
            self.fraction = standing.float() / pixels
            closeness = torch.sigmoid(loss.detach().float() / standing.clamp_min(1))  # in (0, 1): a tie-breaker
            self.score = (pixels - standing + closeness) / pixels
        return loss

    def is_correct(self, output: Tensor, batch: dict) -> Tensor:
        standing = self.fraction > self.stop_fraction
        if self.objective is not None:
            standing = standing & self.objective.is_correct(output, batch).bool()
        return standing


@hyperparameters(threat=norm_in(DENSE_NORMS, "DAG"), steps=at_least(1), gamma=check_positive, target=_check_target,
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
            clean point, usually the strongest) or a tensor ``(B, *spatial)``.
        stop_fraction: a sample is done once the fraction of its pixels still correct is ``<= stop_fraction``
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
        with torch.no_grad():  # one clean forward for K and the targets
            logits = model(x)
        if not isinstance(logits, Tensor) or logits.ndim != x.ndim or logits.shape[1] < 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"DAG needs segmentation logits (B, K >= 2, *spatial) for images {tuple(x.shape)}, "
                             f"got {shape}")
        logits = logits.float()
        batch[_TARGET] = _targets(target, logits, _labels(batch[label_key], logits), seed)
        work = WorkingSet.full(x, batch, eps, gamma * eps)
        _run(model, dense, work, threat, tracker, steps if threat.max_eps() > 0 else 0)
    result = tracker.result()
    return result if return_result else result.x_adv


def _run(model, dense: _DenseAdversary, work: WorkingSet, threat: ThreatModel, tracker: BestTracker,
         steps: int) -> None:
    """DAG iterations over the working set; done samples leave it, every visited point goes to ``tracker``."""
    x_adv = work.x
    for _ in range(steps):
        _, grad, standing = loss_and_grad(model, dense, x_adv, work.batch)
        tracker.update(work.idx, x_adv, dense.score, standing)
        if not bool(standing.all()):
            work, x_adv, grad = work.keep(standing), x_adv[standing], grad[standing]
            if len(work) == 0:
                return
        if threat.norm == "linf":  # DAG's normalization: the largest coordinate moves by the full step
            direction = grad / batch_view(lp_norm(grad, "linf").clamp_min(torch.finfo(grad.dtype).tiny), grad)
        else:
            direction = ascent_direction(grad, "l2")
        x_adv = constrain(work.x, x_adv + batch_view(work.step, x_adv) * direction, threat.norm, work.eps,
                          threat.bounds)
    with torch.no_grad():  # the last iterate has not been looked at yet
        _, standing = objective_values(model, dense, x_adv, work.batch)
    tracker.update(work.idx, x_adv, dense.score, standing)


class DAG(Attack):
    """DAG for segmentation, for configs (Hydra), suites and callbacks; see :func:`dag_attack`.

    Args (those of :func:`dag_attack`, checked the same way):
        norm: ``"linf"`` or ``"l2"`` (the ball the perturbation stays in, and the step normalization).
        steps: maximum iterations (>= 1).
        gamma: step as a fraction of eps.
        target: ``None`` / ``"random"``, ``"next"`` or ``"nearest"``.
        stop_fraction: done when at most this fraction of a sample's pixels is still correct.
        early_stop: also stop a sample once ``objective.is_correct`` is false.
        label_key: where the integer masks ``(B, *spatial)`` / ``(B, 1, *spatial)`` are in the batch.
        seed: seed of the random targets (``None``: torch's global RNG).

    Call: ``DAG()(model, x, batch, objective, eps=..., bounds=...)`` with ``model(x)`` the logits
    ``(B, K, *spatial)``; ``name`` is ``"dag"``.
    """

    name = "dag"
    functional = staticmethod(dag_attack)

    def full_budget(self) -> "DAG":
        return without_early_stop(self)
