"""Madry adversarial training: the loss at the attack's points, optionally mixed with the clean loss.

PGD-AT and FGSM-RS are both this one objective; they differ only in the attack that approximates the inner
maximization (PGD-k, or one FGSM step from a random start with step 1.25 eps) and in FGSM-RS needing the
catastrophic-overfitting guard. Both the attack and the guard are the callback's settings (``adv.attack``,
``adv.guard_attack``), so FGSM-RS is a config of this class (``conf/adv/fgsm.yaml``), not a class of its own:
a second class would repeat the same loss.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from medrobust.attacks.core.base import check_fraction
from medrobust.attacks.core.batch import index_batch
from medrobust.defenses.base import Adversary, Defense


class MadryObjective(Defense):
    """``adv_weight`` * L(batch with its first ``adv_fraction`` adversarial) + ``clean_weight`` * L(clean batch).

    L is the mean of the task's per-sample ``attack_loss``. The defaults (all adversarial, no clean term) are
    Madry et al.'s PGD-AT. With a clean term, adversarial and clean images go through one forward together,
    so BatchNorm sees one batch of statistics.

    Args:
        adv_fraction: fraction of each batch made adversarial (the first ``round(B * adv_fraction)``, at least
            one sample), in (0, 1].
        clean_weight / adv_weight: weights of the clean and adversarial terms, >= 0 and not both 0.
    """

    name = "madry"

    def __init__(self, adv_fraction: float = 1.0, clean_weight: float = 0.0, adv_weight: float = 1.0) -> None:
        self.adv_fraction = check_fraction("adv.adv_fraction", adv_fraction)
        if clean_weight < 0 or adv_weight < 0 or clean_weight + adv_weight == 0:
            raise ValueError(f"adv.clean_weight and adv.adv_weight must be >= 0 and not both 0, "
                             f"got {clean_weight!r}, {adv_weight!r}")
        self.clean_weight = clean_weight
        self.adv_weight = adv_weight

    def __call__(self, module: LightningModule, batch: dict, adversary: Adversary) -> Tensor:
        x = batch["image"]
        n_adv = max(1, round(len(x) * self.adv_fraction))
        x_adv = adversary(x[:n_adv], index_batch(batch, slice(0, n_adv)))
        mixed = torch.cat([x_adv, x[n_adv:]]) if n_adv < len(x) else x_adv
        if self.clean_weight == 0:
            return self.adv_weight * module.attack_loss(module(mixed), batch).mean()
        # one forward over adversarial and clean images together: one pass of BatchNorm statistics
        losses = module.attack_loss(module(torch.cat([mixed, x])), _repeat_batch(batch))
        adv_loss, clean_loss = losses[: len(x)].mean(), losses[len(x):].mean()
        return self.adv_weight * adv_loss + self.clean_weight * clean_loss


def _repeat_batch(batch: dict) -> dict:
    """The batch's per-sample entries twice over, to pair with ``cat([mixed, x])``."""
    image = batch["image"]
    order = torch.arange(len(image), device=image.device)
    return index_batch(batch, torch.cat([order, order]))
