"""What a defence is: the training objective :class:`~medrobust.callbacks.AdversarialTraining` installs.

The callback owns everything generic (the eps schedule and its warm-up, eps units, installing and removing
``module.train_objective``, the catastrophic-overfitting guard, its own checkpoint state); a defence owns the
loss. One defence is one file in this package plus one ``conf/adv`` yaml that sets ``adv.defense`` (and the
attack that makes its training points).

Each training step the callback calls::

    loss = defense(module, batch, adversary)     # scalar, differentiable w.r.t. the parameters

with the task module (``pl_module``, never ``trainer.model``: the attack runs inside ``training_step``, inside
the one DDP forward) and an :class:`Adversary`: the configured attack bound to ``module`` at this epoch's eps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lightning.pytorch import LightningModule
from torch import Tensor

from medrobust.evaluation.eps_units import resolve_eps


@dataclass(frozen=True)
class Adversary:
    """The configured attack on ``module`` at this epoch's eps: what a defence crafts its points with.

    The module is bound here, so a defence cannot attack the DDP wrapper by mistake; eps is resolved per call,
    on the images actually attacked (``eps_unit="range"`` gives one eps per sample of *that* subset).

    Args:
        attack: ``attack(model, x, batch, objective, eps=, bounds=) -> x_adv`` (any ``medrobust.attacks`` class).
        module: the task module; the model, and the default objective (its ``attack_loss`` / ``is_correct``).
        eps: this epoch's eps, in ``eps_unit`` units (after the warm-up).
        eps_unit: ``model``, ``native`` or ``range`` (:func:`~medrobust.evaluation.eps_units.resolve_eps`).
    """

    attack: Callable
    module: LightningModule
    eps: float
    eps_unit: str = "model"

    def __call__(self, x: Tensor, batch: dict, objective: Any = None) -> Tensor:
        """Adversarial images ``(b, C, *spatial)`` for ``x`` ``(b, C, *spatial)`` and its per-sample ``batch``.

        ``objective`` (default: the module) is what the attack maximizes, for defences whose inner maximization
        is not the task loss (TRADES: the KL between clean and adversarial outputs).
        """
        module = self.module
        eps = resolve_eps(self.eps, self.eps_unit, intensity=module.intensity, x=x)
        return self.attack(module, x, batch, module if objective is None else objective, eps=eps,
                           bounds=module.input_bounds)


class Defense:
    """Base class of training objectives (PGD-AT / FGSM-RS, TRADES, MART, margin-based, ...).

    A subclass sets ``name`` and implements :meth:`__call__`; the rest has working defaults:

    - ``requires`` (()): task-module members it needs beyond ``attack_loss`` / ``is_correct``, checked when
      the callback is set up (before the first step, not in it);
    - :meth:`state_dict` / :meth:`load_state_dict`: what must survive a resume (per-sample margins, ...); the
      callback stores it in its own checkpoint state. Plain types and tensors only (checkpoints are read back
      with ``weights_only``). ``load_state_dict({})`` must give a fresh defence: checkpoints written before a
      defence had state hold none. State is per rank (each rank sees its own shard) and the checkpoint holds
      rank 0's: a defence whose state must cover every sample gathers it itself;
    - :meth:`log`: a per-epoch value under ``train/<name>/<key>``, through the module;
    - :meth:`end_epoch`: work at the end of each training epoch (every rank calls it, so it may synchronise).

    Randomness: draw only through the attack or torch's global generator, in a fixed order, so a seed gives
    the same run.
    """

    name: str = "defense"
    requires: tuple[str, ...] = ()

    def __call__(self, module: LightningModule, batch: dict, adversary: Adversary) -> Tensor:
        """The training loss for one batch: a scalar tensor with a graph to the parameters.

        Args:
            module: the task module, in train mode (restore any mode you change: ``attacks.core.session.eval_mode``).
            batch: ``{"image": Tensor[B, C, *spatial], <per-sample targets>, ...}``.
            adversary: the configured attack on ``module`` at this epoch's eps.
        """
        raise NotImplementedError

    def end_epoch(self, trainer, module: LightningModule) -> None:
        """Called by the callback at the end of every training epoch, on every rank (e.g. to merge per-sample
        state across ranks or to report it); nothing by default."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def log(self, module: LightningModule, key: str, value: Tensor | float, batch_size: int) -> None:
        """``train/<name>/<key>``, averaged over the epoch on this rank (like the other training logs)."""
        module.log(f"train/{self.name}/{key}", value, on_step=False, on_epoch=True, batch_size=batch_size,
                   sync_dist=False)
