"""Classification objectives: plain logits against labels, and a classifier pushed towards target classes."""

from __future__ import annotations

import torch
from torch import Tensor

from medrobust.losses.classification import classification_margin, cross_entropy_loss, is_single_logit


class ClassifierObjective:
    """Objective for logits against integer labels ``batch["label"]`` ``(B,)``.

    Logits ``(B, K)`` with ``K >= 2``: per-sample cross-entropy, correct when ``argmax == label``.
    A single logit ``(B,)`` or ``(B, 1)`` (binary, positive class when > 0): per-sample BCE-with-logits against
    ``label`` in {0, 1}, correct when ``(logit > 0) == (label > 0.5)``.
    """

    def __init__(self, label_key: str = "label") -> None:
        self.label_key = label_key

    def attack_loss(self, output: Tensor, batch: dict) -> Tensor:
        return cross_entropy_loss(output, batch[self.label_key])

    def is_correct(self, output: Tensor, batch: dict) -> Tensor:
        labels = batch[self.label_key]
        if is_single_logit(output):
            return (output.reshape(-1) > 0) == (labels.reshape(-1) > 0.5)
        return output.argmax(dim=1) == labels

    def correct_margin(self, output: Tensor, batch: dict) -> Tensor:
        """``(B,)``, > 0 exactly where :meth:`is_correct` (for minimum-norm attacks)."""
        return classification_margin(output, batch[self.label_key])


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
