"""Classification: nodule, mammogram, brain-metastasis and skin-lesion malignancy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryRecall,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassRecall,
    MulticlassSpecificity,
)

from medrobust.losses.classification import classification_margin
from medrobust.tasks.base import RobustTask, softmax_kl


class ClassificationTask(RobustTask):
    """Logits ``(B, num_classes)`` against integer labels ``(B,)``.

    attack_loss: per-sample cross-entropy (optionally label-smoothed); is_correct: argmax == label;
    output_divergence: the KL between the clean and the adversarial class distributions.
    Metrics: accuracy, AUROC, sensitivity and specificity (binary: of the positive class ``1``;
    multi-class: macro averages).
    """

    bounded_metrics = ("accuracy", "auroc", "sensitivity", "specificity")

    def __init__(self, net, num_classes: int = 2, label_smoothing: float = 0.0, class_names: list[str] | None = None,
                 **kwargs) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"module.class_names must name each of the {num_classes} classes, got {class_names!r}")
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        super().__init__(net, **kwargs)

    def attack_loss(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(
            output.float(), batch[self.label_key], reduction="none", label_smoothing=self.label_smoothing
        )

    def is_correct(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        return output.argmax(dim=1) == batch[self.label_key]

    def correct_margin(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        return classification_margin(output.float(), batch[self.label_key])

    def output_divergence(self, clean_output: torch.Tensor, adversarial_output: torch.Tensor, batch: dict
                          ) -> torch.Tensor:
        """``KL(softmax(clean) || softmax(adversarial))`` per sample, summed over the classes (TRADES' term)."""
        return softmax_kl(clean_output, adversarial_output)

    def example_captions(self, output: torch.Tensor, batch: dict, adversarial_output: torch.Tensor) -> list[str]:
        """``true <class>``, then the clean and adversarial prediction with its probability, per sample."""
        names = self.class_names or [str(k) for k in range(self.num_classes)]
        clean, adversarial = output.float().softmax(dim=1), adversarial_output.float().softmax(dim=1)
        lines = []
        for label, p_clean, p_adv in zip(batch[self.label_key].tolist(), clean, adversarial):
            (c_prob, c_class), (a_prob, a_class) = (p.max(dim=0) for p in (p_clean, p_adv))
            lines.append(f"true {names[label]}\nclean {names[int(c_class)]} {float(c_prob):.2f}\n"
                         f"adv {names[int(a_class)]} {float(a_prob):.2f}")
        return lines

    def robust_metrics(self) -> dict:
        if self.num_classes == 2:
            return {
                "accuracy": BinaryAccuracy(),
                "auroc": BinaryAUROC(),
                "sensitivity": BinaryRecall(),
                "specificity": BinarySpecificity(),
            }
        n = self.num_classes
        return {
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "auroc": MulticlassAUROC(n),
            "sensitivity": MulticlassRecall(n, average="macro"),
            "specificity": MulticlassSpecificity(n, average="macro"),
        }

    def metric_inputs(self, output: torch.Tensor, batch: dict, reference=None) -> tuple[torch.Tensor, torch.Tensor]:
        probs = output.float().softmax(dim=1)
        preds = probs[:, 1] if self.num_classes == 2 else probs
        return preds, batch[self.label_key]
