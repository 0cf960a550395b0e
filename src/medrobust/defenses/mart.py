"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training, for classifiers.

At the configured attack's points ``x'`` (PGD on the task's cross-entropy in ``conf/adv/mart.yaml``), with
``p`` and ``p'`` the clean and adversarial class probabilities and ``y`` the label::

    loss = mean_i [ CE(p'_i, y_i) - log(1 - max_{k != y_i} p'_ik) ]                  (boosted CE, "BCE")
         + lambda * mean_i [ KL(p_i || p'_i) * (1 - p_iy) ]                          (misclassification-aware KL)

The boosted CE also pushes the strongest wrong class down; the KL term weighs most the samples the model gets
wrong on clean images (``1 - p_y`` large), which the paper finds matter most for robustness. With two classes the
boost is ``-log p'_y``, the CE again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor

from medrobust.defenses.base import Adversary, Defense


class MART(Defense):
    """MART's loss (see the module docstring) on a classification task's logits ``(B, K)``.

    Clean and adversarial images go through one training forward together (``cat([x, x_adv])``): one batch of
    BatchNorm statistics. The CE is the task's ``attack_loss`` (label smoothing included), the KL its
    ``output_divergence``; every term keeps its gradient, as in the reference code.

    ``requires`` names the declared capability ``outputs_logits`` (per-sample class logits ``(B, K)``), which only
    classification tasks keep True, so setting up ``adv=mart`` on any other task fails with a ``TypeError`` before
    training.

    Args:
        lam: weight of the misclassification-aware KL term, >= 0 (the paper's lambda: 5-6; 6.0 by default).
    """

    name = "mart"
    requires = ("outputs_logits", "output_divergence")

    def __init__(self, lam: float = 6.0) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"adv.defense.lam must be a number >= 0, got {lam!r}")
        self.lam = float(lam)

    def __call__(self, module: LightningModule, batch: dict, adversary: Adversary) -> Tensor:
        x = batch["image"]
        x_adv = adversary(x, batch)  # the task's objective: the attack climbs the CE
        output = module(torch.cat([x, x_adv]))  # one forward: one pass of BatchNorm statistics
        clean, adversarial = output[: len(x)], output[len(x):]
        label = batch[module.label_key]
        adv_loss = (module.attack_loss(adversarial, batch) + wrong_class_boost(adversarial, label)).mean()
        true_prob = F.softmax(clean.float(), dim=1).gather(1, label[:, None]).squeeze(1)
        kl = (module.output_divergence(clean, adversarial, batch) * (1 - true_prob)).mean()
        self.log(module, "adv_loss", adv_loss.detach(), batch_size=len(x))
        self.log(module, "kl", kl.detach(), batch_size=len(x))
        return adv_loss + self.lam * kl


def wrong_class_boost(logits: Tensor, label: Tensor) -> Tensor:
    """``-log(1 - max_{k != y} softmax(logits)_k)`` per sample ``(B,)`` for logits ``(B, K)``, in fp32.

    ``1 - p_k`` is the probability of every other class, so the term is ``logsumexp(z) - logsumexp(z without
    z_k)``: exact where ``p_k`` rounds to 1 (the reference code adds 1e-4 inside the log instead).
    """
    logits = logits.float()
    strongest_wrong = logits.scatter(1, label[:, None], float("-inf")).argmax(dim=1, keepdim=True)
    others = logits.scatter(1, strongest_wrong, float("-inf"))
    return torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)
