"""Classification losses and margins shared by attacks and task modules."""

from __future__ import annotations

import torch
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
