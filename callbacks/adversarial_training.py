"""AdversarialTraining: replaces the task's clean training objective with an adversarial one.

The attack runs inside ``training_step`` (so inside autocast and inside the single DDP forward) on
``pl_module`` itself, never on ``trainer.model`` (the DDP wrapper).
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from medrobust.attacks import EPS_UNITS, index_batch, resolve_eps
from medrobust.tasks.base import clean_objective

log = logging.getLogger("medrobust")

GUARD_ACTIONS = ("warn", "stop")


class AdversarialTraining(Callback):
    """Adversarial training with any attack object (PGD-AT, FGSM-RS, ...).

    Loss = ``adv_weight`` * L(batch with its first ``adv_fraction`` replaced by adversarial examples)
    + ``clean_weight`` * L(clean batch). Defaults give Madry PGD-AT (all adversarial, no clean term).

    Args:
        attack: the attack that makes training examples (e.g. ``medrobust.attacks.PGD``).
        eps: target perturbation size, in ``eps_unit`` units.
        eps_unit: ``model``, ``native`` (e.g. HU) or ``range``.
        warmup_epochs: eps grows linearly, reaching ``eps`` at the start of epoch ``warmup_epochs``.
        adv_fraction: fraction of each batch made adversarial, in (0, 1].
        clean_weight / adv_weight: weights of the clean and adversarial loss terms.
        guard_attack: an attack (e.g. PGD-10) checked on a training batch at the end of every epoch; robust
            accuracy collapsing by more than ``guard_drop`` below its best flags catastrophic overfitting
            (FGSM training); ``guard_action`` then warns or stops training.
    """

    def __init__(
        self,
        attack,
        eps: float,
        eps_unit: str = "model",
        warmup_epochs: int = 0,
        adv_fraction: float = 1.0,
        clean_weight: float = 0.0,
        adv_weight: float = 1.0,
        guard_attack=None,
        guard_drop: float = 0.2,
        guard_action: str = "stop",
        method: str | None = None,
    ) -> None:
        if eps is None or float(eps) < 0:
            raise ValueError(f"adv.eps must be >= 0, got {eps!r}")
        if eps_unit not in EPS_UNITS:
            raise ValueError(f"adv.eps_unit must be one of {EPS_UNITS}, got {eps_unit!r}")
        if warmup_epochs < 0:
            raise ValueError(f"adv.warmup_epochs must be >= 0, got {warmup_epochs!r}")
        if not 0.0 < adv_fraction <= 1.0:
            raise ValueError(f"adv.adv_fraction must be in (0, 1], got {adv_fraction!r}")
        if clean_weight < 0 or adv_weight < 0 or clean_weight + adv_weight == 0:
            raise ValueError(f"adv.clean_weight and adv.adv_weight must be >= 0 and not both 0, "
                             f"got {clean_weight!r}, {adv_weight!r}")
        if not 0.0 < guard_drop <= 1.0:
            raise ValueError(f"adv.guard_drop must be in (0, 1], got {guard_drop!r}")
        if guard_action not in GUARD_ACTIONS:
            raise ValueError(f"adv.guard_action must be one of {GUARD_ACTIONS}, got {guard_action!r}")
        self.attack = attack
        self.eps = float(eps)
        self.eps_unit = eps_unit
        self.warmup_epochs = warmup_epochs
        self.adv_fraction = adv_fraction
        self.clean_weight = clean_weight
        self.adv_weight = adv_weight
        self.guard_attack = guard_attack
        self.guard_drop = guard_drop
        self.guard_action = guard_action
        self.method = method or attack.name
        # state that must survive a resume
        self.eps_history: list[tuple[int, float]] = []
        self.guard_history: list[tuple[int, float]] = []
        self.guard_best: float | None = None
        self._epoch = 0
        self._guard_batch: dict | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, attack=self.attack.name, eps=self.eps, eps_unit=self.eps_unit)

    def state_dict(self) -> dict:
        return {"eps_history": list(self.eps_history), "guard_history": list(self.guard_history),
                "guard_best": self.guard_best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.eps_history = [tuple(item) for item in state_dict.get("eps_history", [])]
        self.guard_history = [tuple(item) for item in state_dict.get("guard_history", [])]
        self.guard_best = state_dict.get("guard_best")

    # -- schedule -------------------------------------------------------------------------------
    def eps_at(self, epoch: int) -> float:
        """Linear warm-up: ``eps * (epoch + 1) / (warmup_epochs + 1)`` until it reaches ``eps``."""
        return self.eps * min(1.0, (epoch + 1) / (self.warmup_epochs + 1))

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for member in ("attack_loss", "is_correct", "train_objective"):
            if not hasattr(pl_module, member):
                raise TypeError(f"AdversarialTraining needs a task module with `{member}`; "
                                f"{type(pl_module).__name__} has none")
        if stage == "fit":
            pl_module.train_objective = self.objective

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.train_objective = clean_objective

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch = trainer.current_epoch
        eps = self.eps_at(self._epoch)
        self.eps_history = [item for item in self.eps_history if item[0] != self._epoch] + [(self._epoch, eps)]
        pl_module.log("train/adv_eps", eps, on_step=False, on_epoch=True, sync_dist=False)

    def objective(self, module: LightningModule, batch: dict) -> torch.Tensor:
        """The adversarial training loss for one batch (installed as ``module.train_objective``)."""
        x = batch["image"]
        n_adv = max(1, round(len(x) * self.adv_fraction))
        adv_part = index_batch(batch, slice(0, n_adv))
        eps = resolve_eps(self.eps_at(self._epoch), self.eps_unit, intensity=module.intensity, x=x[:n_adv])
        x_adv = self.attack(module, x[:n_adv], adv_part, module, eps=eps, bounds=module.input_bounds)
        mixed = torch.cat([x_adv, x[n_adv:]]) if n_adv < len(x) else x_adv
        if self.guard_attack is not None:
            self._guard_batch = batch  # the epoch's last batch is what the guard checks
        if self.clean_weight == 0:
            return self.adv_weight * module.attack_loss(module(mixed), batch).mean()
        # one forward over adversarial and clean images together: one pass of BatchNorm statistics
        losses = module.attack_loss(module(torch.cat([mixed, x])), _repeat_batch(batch))
        adv_loss, clean_loss = losses[: len(x)].mean(), losses[len(x):].mean()
        return self.adv_weight * adv_loss + self.clean_weight * clean_loss

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.guard_attack is None or self._guard_batch is None:
            return
        accuracy = self._guard_accuracy(pl_module, self._guard_batch)
        self.guard_history.append((trainer.current_epoch, accuracy))
        pl_module.log("train/guard_robust_accuracy", accuracy, sync_dist=False)
        collapsed = self.guard_best is not None and accuracy < self.guard_best - self.guard_drop
        collapsed = trainer.strategy.reduce_boolean_decision(collapsed, all=False)  # every rank decides alike
        self.guard_best = accuracy if self.guard_best is None else max(self.guard_best, accuracy)
        if collapsed:
            message = (f"catastrophic overfitting: {self.guard_attack.name} robust accuracy on a training batch "
                       f"fell to {accuracy:.3f} (best {self.guard_best:.3f}, allowed drop {self.guard_drop}) "
                       f"at epoch {trainer.current_epoch}")
            rank_zero_warn(message)
            if self.guard_action == "stop":
                trainer.should_stop = True

    def _guard_accuracy(self, pl_module: LightningModule, batch: dict) -> float:
        x = batch["image"]
        eps = resolve_eps(self.eps_at(self._epoch), self.eps_unit, intensity=pl_module.intensity, x=x)
        was_training = pl_module.training
        pl_module.eval()  # the check must not move BatchNorm statistics
        x_adv = self.guard_attack(pl_module, x, batch, pl_module, eps=eps, bounds=pl_module.input_bounds)
        with torch.no_grad():
            accuracy = pl_module.is_correct(pl_module(x_adv), batch).float().mean().item()
        pl_module.train(was_training)
        return accuracy


def _repeat_batch(batch: dict) -> dict:
    """The batch's per-sample entries twice over, to pair with ``cat([x_adv, x])``."""
    image = batch["image"]
    order = torch.arange(len(image), device=image.device)
    return index_batch(batch, torch.cat([order, order]))
