"""AdversarialTraining: replaces the task's clean training objective with a defence's adversarial one.

The callback owns what every defence shares: the eps schedule (warm-up) and units, installing the objective
in ``setup`` and removing it in ``teardown``, the catastrophic-overfitting guard and the checkpoint state.
The loss itself is the defence's (:mod:`medrobust.defenses`). The attack runs inside ``training_step`` (so
inside autocast and inside the single DDP forward) on ``pl_module`` itself, never on ``trainer.model`` (the
DDP wrapper).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from medrobust.attacks.core.seeding import derived_seed, run_seed, seeded
from medrobust.attacks.core.session import eval_mode
from medrobust.defenses import Adversary, Defense, MadryObjective
from medrobust.evaluation.eps_units import EPS_UNITS
from medrobust.tasks.base import clean_objective, lacking

GUARD_ACTIONS = ("warn", "stop")


class AdversarialTraining(Callback):
    """Adversarial training with any defence (PGD-AT, FGSM-RS, TRADES, ...) and any attack object.

    Without ``defense``, the defence is :class:`~medrobust.defenses.MadryObjective` built from
    ``adv_fraction`` / ``clean_weight`` / ``adv_weight``: ``adv_weight`` * L(batch with its first
    ``adv_fraction`` adversarial) + ``clean_weight`` * L(clean batch); its defaults are Madry PGD-AT.

    Args:
        attack: the attack that makes training examples (e.g. ``medrobust.attacks.PGD``).
        eps: target perturbation size, in ``eps_unit`` units.
        eps_unit: ``model``, ``native`` (e.g. HU) or ``range``.
        warmup_epochs: eps grows linearly, reaching ``eps`` at the start of epoch ``warmup_epochs`` (counted after the
            clean epochs).
        clean_epochs: epochs of clean training (eps 0) before the warm-up or the schedule: a model that learns
            nothing under attack from its first step (MONAI's RetinaNet, whose focal loss starts every anchor at
            1 %, in 3-D) learns its features clean first. The catastrophic-overfitting guard rests in those epochs.
        schedule: seed 000's iterative protocol instead of the warm-up: rounds of ``[epochs, eps]`` run in order
            (``[[150, 0.001], [50, 0.002]]``: 150 epochs at 0.001, then 50 at 0.002), the last eps kept after the
            last round; ``eps`` must be the last round's (it names the run's state).
        adv_fraction / clean_weight / adv_weight: the default Madry defence's settings (``None``: its
            defaults). Given with ``defense``, they must equal the defence's own (the shipped configs
            interpolate ``adv.defense.*`` from them, so ``adv.adv_fraction=...`` overrides as it always did).
        guard_attack: an attack (e.g. PGD-10) checked on a training batch at the end of every epoch; robust
            accuracy collapsing by more than ``guard_drop`` below its best flags catastrophic overfitting
            (FGSM training); ``guard_action`` then warns or stops training.
        method: the run's training method in its ``state_key`` (default: the attack's name).
        defense: the training objective (:class:`~medrobust.defenses.Defense`).
        seed: seeds the attacks' random starts, per (epoch, batch, rank), so a resumed run draws what the
            uninterrupted one drew; ``None``: the run's seed (``seed_everything``'s).
    """

    def __init__(
        self,
        attack,
        eps: float,
        eps_unit: str = "model",
        warmup_epochs: int = 0,
        clean_epochs: int = 0,
        adv_fraction: float | None = None,
        clean_weight: float | None = None,
        adv_weight: float | None = None,
        guard_attack=None,
        guard_drop: float = 0.2,
        guard_action: str = "stop",
        method: str | None = None,
        defense: Defense | None = None,
        seed: int | None = None,
        schedule: list | None = None,
    ) -> None:
        if eps is None or float(eps) < 0:
            raise ValueError(f"adv.eps must be >= 0, got {eps!r}")
        self.schedule = _check_schedule(schedule, float(eps), warmup_epochs)
        if eps_unit not in EPS_UNITS:
            raise ValueError(f"adv.eps_unit must be one of {EPS_UNITS}, got {eps_unit!r}")
        if warmup_epochs < 0:
            raise ValueError(f"adv.warmup_epochs must be >= 0, got {warmup_epochs!r}")
        if isinstance(clean_epochs, bool) or not isinstance(clean_epochs, int) or clean_epochs < 0:
            raise ValueError(f"adv.clean_epochs must be an integer >= 0, got {clean_epochs!r}")
        if not 0.0 < guard_drop <= 1.0:
            raise ValueError(f"adv.guard_drop must be in (0, 1], got {guard_drop!r}")
        if guard_action not in GUARD_ACTIONS:
            raise ValueError(f"adv.guard_action must be one of {GUARD_ACTIONS}, got {guard_action!r}")
        if getattr(attack, "norm", None) == "l0":  # JSMA: a count of changed values, minutes per batch
            raise ValueError(f"adv.attack: {attack.label} is an L0 attack (its eps counts changed input values); "
                             f"adversarial training takes Linf, L2 or L1 attacks (e.g. adv=pgd)")
        self.defense = _defense_from(defense, adv_fraction=adv_fraction, clean_weight=clean_weight,
                                     adv_weight=adv_weight)
        self.attack = attack
        self.eps = float(eps)
        self.eps_unit = eps_unit
        self.warmup_epochs = warmup_epochs
        self.clean_epochs = clean_epochs
        self.guard_attack = guard_attack
        self.guard_drop = guard_drop
        self.guard_action = guard_action
        self.method = method or attack.name
        self.seed = seed
        # state that must survive a resume
        self.eps_history: list[tuple[int, float]] = []
        self.guard_history: list[tuple[int, float]] = []
        self.guard_best: float | None = None
        self._epoch = 0
        self._batch_idx = 0
        self._rank = 0
        self._guard_batch: dict | None = None

    @property
    def state_key(self) -> str:
        # unchanged by the defence slot, so checkpoints written before it still find their state
        return self._generate_state_key(method=self.method, attack=self.attack.name, eps=self.eps, eps_unit=self.eps_unit)

    def state_dict(self) -> dict:
        # plain values only: checkpoints are read back with torch.load(weights_only=True)
        return {"eps_history": list(self.eps_history), "guard_history": list(self.guard_history),
                "guard_best": self.guard_best, "defense": self.defense.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.eps_history = [tuple(item) for item in state_dict.get("eps_history", [])]
        self.guard_history = [tuple(item) for item in state_dict.get("guard_history", [])]
        self.guard_best = state_dict.get("guard_best")
        self.defense.load_state_dict(state_dict.get("defense", {}))

    # -- schedule -------------------------------------------------------------------------------
    def eps_at(self, epoch: int) -> float:
        """0 in the clean epochs; then, counting epochs ``k`` from the first after them, the ``schedule``'s eps of
        the round ``k`` falls in, else the linear warm-up ``eps * (k + 1) / (warmup_epochs + 1)`` until it reaches
        ``eps``."""
        if epoch < self.clean_epochs:
            return 0.0
        epoch -= self.clean_epochs
        if self.schedule:
            end = 0
            for epochs, eps in self.schedule:
                end += epochs
                if epoch < end:
                    return eps
            return self.schedule[-1][1]
        return self.eps * min(1.0, (epoch + 1) / (self.warmup_epochs + 1))

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for member in lacking(pl_module, ("attack_loss", "is_correct", "train_objective", *self.defense.requires)):
            raise TypeError(f"AdversarialTraining ({self.defense.name}) needs a task module with `{member}`; "
                            f"{type(pl_module).__name__} " + ("declares it False" if hasattr(pl_module, member)
                                                                 else "has none"))
        if stage == "fit":
            pl_module.train_objective = self.objective

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.train_objective = clean_objective

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch, self._rank = trainer.current_epoch, trainer.global_rank
        eps = self.eps_at(self._epoch)
        self.eps_history = [item for item in self.eps_history if item[0] != self._epoch] + [(self._epoch, eps)]
        pl_module.log("train/adv_eps", eps, on_step=False, on_epoch=True, sync_dist=False)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def objective(self, module: LightningModule, batch: dict) -> torch.Tensor:
        """The defence's training loss for one batch (installed as ``module.train_objective``)."""
        if self.guard_attack is not None:
            self._guard_batch = batch  # the epoch's last batch is what the guard checks
        # random starts from (seed, epoch, batch, rank), not from the running RNG a resume would not restore
        seed = derived_seed("adversarial_training", run_seed(self.seed), self._epoch, self._batch_idx, self._rank)
        with seeded(seed, batch["image"].device):
            return self.defense(module, batch, self._adversary(self.attack, module))

    def _adversary(self, attack, module: LightningModule) -> Adversary:
        return Adversary(attack, module, self.eps_at(self._epoch), self.eps_unit)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.defense.end_epoch(trainer, pl_module)
        if self.guard_attack is None or self._guard_batch is None or self.eps_at(self._epoch) == 0:
            return  # nothing attacked this epoch (a clean one): nothing to guard
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
        seed = derived_seed("guard", run_seed(self.seed), self._epoch, self._rank)
        with eval_mode(pl_module), seeded(seed, batch["image"].device):  # eval: BatchNorm statistics stay
            x_adv = self._adversary(self.guard_attack, pl_module)(batch["image"], batch)
            with torch.no_grad():
                return pl_module.is_correct(pl_module(x_adv), batch).float().mean().item()


def _check_schedule(schedule, eps: float, warmup_epochs: int) -> list[tuple[int, float]] | None:
    """``adv.schedule`` as ``[(epochs, eps), ...]``: rounds of >= 1 epoch at eps >= 0, the last at ``adv.eps``."""
    if schedule is None:
        return None
    try:
        rounds = [(item[0], float(item[1])) for item in schedule if len(item) == 2]
    except (TypeError, ValueError, IndexError):
        rounds = []
    if not rounds or len(rounds) != len(schedule) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 or e < 0 for n, e in rounds):
        raise ValueError(f"adv.schedule must be a list of [epochs, eps] rounds (epochs an integer >= 1, eps >= 0), "
                         f"e.g. [[150, 0.001], [50, 0.002]]; got {schedule!r}")
    if rounds[-1][1] != eps:
        raise ValueError(f"adv.eps={eps} must be the last round's eps of adv.schedule ({rounds[-1][1]}): it names "
                         f"the run's adversarial-training state")
    if warmup_epochs:
        raise ValueError(f"adv.schedule replaces the warm-up: set adv.warmup_epochs=0 (got {warmup_epochs})")
    return rounds


def _defense_from(defense: Defense | None, **madry) -> Defense:
    """``defense``, or the default Madry objective from its settings; given both, the settings must agree."""
    given = {key: value for key, value in madry.items() if value is not None}
    if defense is None:
        return MadryObjective(**given)
    if not isinstance(defense, Defense):
        raise TypeError(f"adv.defense must be a medrobust.defenses.Defense, got {defense!r}")
    for key, value in given.items():
        if getattr(defense, key, None) != value:
            raise ValueError(f"adv.{key}={value!r} disagrees with adv.defense ({type(defense).__name__}, "
                             f"{key}={getattr(defense, key, None)!r}): set it in one place")
    return defense
