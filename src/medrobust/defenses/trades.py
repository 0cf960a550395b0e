"""TRADES (Zhang et al., ICML 2019): the clean loss plus ``beta`` times how far the output moves within the ball.

``loss = mean_i L(f(x_i), y_i) + beta * mean_i D(f(x_i), f(x'_i))`` where ``x'`` maximizes ``D``, the task's
``output_divergence`` (the KL between class distributions for classification, per voxel for segmentation, the
squared change of the prediction for regression and landmarks), instead of the task loss: the trade-off between
accuracy (first term) and the smoothness of the model around its training points (second term) is ``beta``.

The inner maximization is the callback's configured attack (PGD in ``conf/adv/trades.yaml``) on an objective
whose loss is ``D`` to the clean output and whose correctness is still the task's. ``D`` and its gradient are 0
at ``x' = x``, so the attack starts, as the reference implementation does, from ``x + start_std * N(0, 1)``.
"""

from __future__ import annotations

import dataclasses

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from medrobust.attacks.core.batch import attack_key, float_output, index_output
from medrobust.attacks.core.objectives import WithLoss, with_loss
from medrobust.attacks.core.session import attack_session
from medrobust.defenses.base import Adversary, Defense

# the clean output rides in the batch, so it follows every subset the attack takes
CLEAN_OUTPUT_KEY = attack_key("trades_clean_output")


class TRADES(Defense):
    """``clean loss + beta * divergence at the max-divergence point`` (see the module docstring).

    Clean and adversarial images go through one training forward together (``cat([x, x_adv])``), so BatchNorm
    sees one batch of statistics, and the divergence has gradients through both outputs, as in the paper.
    The attack sees the model as every attack does (normalization and dropout in eval mode), and so does the
    clean output it climbs away from: its divergence at ``x`` itself is 0.

    Args:
        beta: weight of the divergence term, >= 0 (6.0: the paper's CIFAR-10 / MNIST value; 0 is clean training
            at the cost of an attack).
        start_std: std of the Gaussian start around ``x`` in model units (0.001 as in the reference code), moved
            into the ball and the bounds; ``None``: the attack's own start (PGD's uniform random start). An attack
            that cannot warm-start (``attack_from``) uses its own start either way; one starting at ``x`` finds no
            gradient of the divergence there.
    """

    name = "trades"
    requires = ("output_divergence",)

    def __init__(self, beta: float = 6.0, start_std: float | None = 0.001) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"adv.defense.beta must be a number >= 0, got {beta!r}")
        if start_std is not None and (isinstance(start_std, bool) or not isinstance(start_std, (int, float))
                                      or not start_std > 0):
            raise ValueError(f"adv.defense.start_std must be a number > 0 (model units) or null (the attack's own "
                             f"start), got {start_std!r}")
        self.beta = float(beta)
        self.start_std = None if start_std is None else float(start_std)

    def __call__(self, module: LightningModule, batch: dict, adversary: Adversary) -> Tensor:
        x = batch["image"]
        x_adv = self.adversarial_images(module, batch, adversary)
        output = module(torch.cat([x, x_adv]))  # one forward: one pass of BatchNorm statistics
        n = len(x)
        clean, adversarial = index_output(output, slice(0, n), 2 * n), index_output(output, slice(n, 2 * n), 2 * n)
        clean_loss = module.attack_loss(clean, batch).mean()
        divergence = module.output_divergence(clean, adversarial, batch).mean()
        self.log(module, "clean_loss", clean_loss.detach(), batch_size=len(x))
        self.log(module, "divergence", divergence.detach(), batch_size=len(x))
        return clean_loss + self.beta * divergence

    def adversarial_images(self, module: LightningModule, batch: dict, adversary: Adversary) -> Tensor:
        """The attack's max-divergence points ``(B, C, *spatial)`` for ``batch["image"]`` (detached)."""
        x, attack = batch["image"], adversary.attack
        modes = {"bn_eval": getattr(attack, "bn_eval", True), "dropout_eval": getattr(attack, "dropout_eval", True)}
        with attack_session(module, **modes), torch.no_grad():  # the model as the attack's own forwards see it
            clean = float_output(module(x))
        carried = {**batch, CLEAN_OUTPUT_KEY: clean}
        return self._started(adversary, x)(x, carried, objective=divergence_objective(module))

    def _started(self, adversary: Adversary, x: Tensor) -> Adversary:
        """``adversary`` whose attack starts at ``x + start_std * N(0, 1)`` (drawn from torch's global generator,
        which the callback seeds per batch); itself with ``start_std=None``."""
        if self.start_std is None or not hasattr(adversary.attack, "attack_from"):
            return adversary
        start, attack = x + self.start_std * torch.randn_like(x), adversary.attack

        def started(model, x, batch, objective, *, eps, bounds) -> Tensor:
            return attack.attack_from(start, model, x, batch, objective, eps=eps, bounds=bounds)

        return dataclasses.replace(adversary, attack=started)


def divergence_objective(module: LightningModule) -> WithLoss:
    """``module`` climbing ``output_divergence`` from the clean output the batch carries (under
    ``CLEAN_OUTPUT_KEY``), judged by the task's own ``is_correct`` / ``correct_margin``."""
    return with_loss(module, lambda output, batch: module.output_divergence(batch[CLEAN_OUTPUT_KEY], output, batch))
