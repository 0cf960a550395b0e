"""Classification losses and margins shared by attacks and task modules, and objectives with another loss."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample margin ``(B,)``: > 0 exactly when the prediction is right.

    Logits ``(B, K)``, ``K >= 2``: ``z_y - max_{j != y} z_j``. A single logit ``(B,)`` / ``(B, 1)`` (positive
    class when > 0): the logit signed by the label, ``+z`` for label 1 and ``-z`` for label 0.
    """
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        logit = logits.reshape(-1)
        return torch.where(labels.reshape(-1) > 0.5, logit, -logit)
    labels = labels.long().reshape(-1, 1)
    true = logits.gather(1, labels).squeeze(1)
    others = logits.scatter(1, labels, float("-inf"))
    return true - others.max(dim=1).values


# -- attack losses (Croce & Hein, ICML 2020) ---------------------------------------------------------
class LossFallbackWarning(UserWarning):
    """A loss that is undefined for this output (DLR with < 3 classes, ...) was replaced by the margin loss."""


def _single_logit(logits: Tensor) -> bool:
    return logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1)


def check_logits(logits: Tensor, what: str) -> int:
    """Number of classes ``K`` of logits ``(B, K)`` (1 for a single logit ``(B,)`` / ``(B, 1)``)."""
    if not isinstance(logits, Tensor) or logits.ndim not in (1, 2):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{what} needs classification logits (B, K) or a single logit (B,); got {shape}")
    return 1 if _single_logit(logits) else logits.shape[1]


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample cross-entropy ``(B,)``; BCE-with-logits for a single logit ``(B,)`` / ``(B, 1)``."""
    if check_logits(logits, "cross_entropy_loss") == 1:
        logit = logits.reshape(-1)
        return F.binary_cross_entropy_with_logits(logit, labels.reshape(-1).to(logit.dtype), reduction="none")
    return F.cross_entropy(logits, labels.long(), reduction="none")


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``-classification_margin`` ``(B,)``: > 0 exactly where the prediction is wrong; any ``K``, single logit too."""
    return -classification_margin(logits, labels)


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Difference-of-logits-ratio loss ``(B,)``: ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)``.

    ``z_pi1 >= z_pi2 >= ...`` are the sorted logits of ``(B, K)``. Invariant to shifting and scaling the logits.
    Undefined for ``K < 3`` (there is no third logit): then it is :func:`margin_loss`, with a
    :class:`LossFallbackWarning` (shown once per call site under Python's default warning filter), rather than
    an index error.
    """
    if check_logits(logits, "dlr_loss") < 3:
        warnings.warn("DLR needs >= 3 classes; using the margin loss -(z_y - max_{j!=y} z_j) instead",
                      LossFallbackWarning, stacklevel=2)
        return margin_loss(logits, labels)
    top = logits.topk(3, dim=1).values
    return margin_loss(logits, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR ``(B,)``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``, logits ``(B, K)``, ``K >= 4``.

    ``target`` ``(B,)`` holds the class ``t`` each sample is pushed towards. Raises ``ValueError`` for ``K < 4``
    (``apgd_attack(targeted=True)`` falls back to the untargeted margin loss there instead).
    """
    k = check_logits(logits, "targeted_dlr_loss")
    if k < 4:
        raise ValueError(f"targeted DLR needs logits (B, K) with K >= 4 classes, got K={k}")
    top = logits.topk(4, dim=1).values
    true = logits.gather(1, labels.long().reshape(-1, 1)).squeeze(1)
    goal = logits.gather(1, target.long().reshape(-1, 1)).squeeze(1)
    return -(true - goal) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


# -- objectives with another attack loss -------------------------------------------------------------
class WithLoss:
    """An objective whose ``attack_loss`` is ``loss_fn(output, batch)``; correctness comes from ``base``.

    ``is_correct`` and ``correct_margin`` are the base objective's, so early stopping and success are judged
    exactly as the task judges them whatever loss the attacker climbs. ``label_key`` is the base's (default
    ``"label"``).
    """

    def __init__(self, base: Any, loss_fn: Callable[[Any, dict], Tensor]) -> None:
        self.base = base
        self.loss_fn = loss_fn
        self.label_key = getattr(base, "label_key", "label")

    def attack_loss(self, output: Any, batch: dict) -> Tensor:
        return self.loss_fn(output, batch)

    def is_correct(self, output: Any, batch: dict) -> Tensor:
        return self.base.is_correct(output, batch)

    def correct_margin(self, output: Any, batch: dict) -> Tensor:
        return self.base.correct_margin(output, batch)

    def __repr__(self) -> str:
        name = getattr(self.loss_fn, "__name__", repr(self.loss_fn))
        return f"WithLoss({self.base!r}, {name})"


def with_loss(objective: Any, loss_fn: Callable[[Any, dict], Tensor]) -> WithLoss:
    """``objective`` with ``attack_loss = loss_fn(output, batch) -> (B,)``, e.g.
    ``with_loss(task, lambda out, b: dlr_loss(out, b["label"]))``; see :class:`WithLoss`."""
    return WithLoss(objective, loss_fn)


# -- targeted classification ------------------------------------------------------------------------
class TargetedObjective:
    """A classifier pushed towards ``batch[target_key]`` ``(B,)`` instead of away from its label.

    - ``attack_loss``: ``-CE(logits, target)``, so climbing it raises the target's probability (on a linear
      4-class model, sign steps on it reach every target within 1.1x the exact radius; on the target's margin
      ``z_t - max_{j != t} z_j``, whose active piece keeps switching, they zigzag and reach 70-80 %);
    - ``is_correct``: the model does not predict the target yet (the attack is done for a sample once it does);
    - ``correct_margin``: ``max_{j != t} z_j - z_t``, > 0 exactly where ``is_correct``, so minimum-norm attacks
      (FMN, DeepFool, C&W) find the smallest perturbation that makes the model predict ``t``.

    A sample whose target is already its clean prediction is done at once: attacks return it unchanged. So is
    one whose target is its own label (when the batch has ``label_key``): aiming it there could only *correct* a
    wrong prediction, which no attack may do.
    """

    def __init__(self, target_key: str = "target", label_key: str = "label") -> None:
        self.target_key, self.label_key = target_key, label_key

    def _target(self, batch: dict) -> Tensor:
        if self.target_key not in batch:
            raise KeyError(f"a targeted attack needs the target classes under {self.target_key!r}; "
                           f"batch keys: {list(batch)}")
        return batch[self.target_key]

    def attack_loss(self, output: Tensor, batch: dict) -> Tensor:
        return -cross_entropy_loss(output, self._target(batch))

    def correct_margin(self, output: Tensor, batch: dict) -> Tensor:
        target = self._target(batch)
        margin = -classification_margin(output, target)
        labels = batch.get(self.label_key)
        if isinstance(labels, Tensor) and labels.shape == target.shape:
            margin = torch.where(target.long() == labels.long(), torch.zeros_like(margin), margin)
        return margin

    def is_correct(self, output: Tensor, batch: dict) -> Tensor:
        return self.correct_margin(output, batch) > 0
