"""Classification losses and margins, pure torch: shared by the classification task and the attacks on it."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample margin ``(B,)``: > 0 exactly when the prediction is right.

    Logits ``(B, K)``, ``K >= 2``: ``z_y - max_{j != y} z_j``. A single logit ``(B,)`` / ``(B, 1)`` (positive
    class when > 0): the logit signed by the label, ``+z`` for label 1 and ``-z`` for label 0.
    """
    if is_single_logit(logits):
        logit = logits.reshape(-1)
        return torch.where(labels.reshape(-1) > 0.5, logit, -logit)
    labels = labels.long().reshape(-1, 1)
    true = logits.gather(1, labels).squeeze(1)
    others = logits.scatter(1, labels, float("-inf"))
    return true - others.max(dim=1).values


# -- attack losses (Croce & Hein, ICML 2020) ---------------------------------------------------------
class LossFallbackWarning(UserWarning):
    """A loss that is undefined for this output (DLR with < 3 classes, ...) was replaced by the margin loss."""


def is_single_logit(logits: Tensor) -> bool:
    """A binary classifier's single logit ``(B,)`` / ``(B, 1)`` (positive class when > 0)."""
    return logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1)


def check_logits(logits: Tensor, what: str) -> int:
    """Number of classes ``K`` of logits ``(B, K)`` (1 for a single logit ``(B,)`` / ``(B, 1)``)."""
    if not isinstance(logits, Tensor) or logits.ndim not in (1, 2):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{what} needs classification logits (B, K) or a single logit (B,); got {shape}")
    return 1 if is_single_logit(logits) else logits.shape[1]


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
