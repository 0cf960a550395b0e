"""Defences: Madry's loss by hand, a defence's state through the callback's checkpoint, the guard's modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.attacks import FGSM, PGD
from medrobust.callbacks import AdversarialTraining
from medrobust.defenses import Adversary, Defense, MadryObjective
from medrobust.runner import build_data_and_module
from conftest import compose_config


class TinyTask(nn.Module):
    """The task contract on a 4-pixel, 3-class classifier; BatchNorm so that forward grouping matters."""

    input_bounds = (0.0, 1.0)
    intensity = None
    train_objective = None  # the callback installs its objective here

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        return self.net(x)

    def attack_loss(self, output, batch):
        return F.cross_entropy(output, batch["label"], reduction="none")

    def is_correct(self, output, batch):
        return output.argmax(1) == batch["label"]


class ShiftAttack:
    """A deterministic stand-in attack, ``x + eps`` clipped to the bounds; records what it was given."""

    name = "shift"

    def __call__(self, model, x, batch, objective, *, eps, bounds):
        self.seen = {"model": model, "x": x, "batch": batch, "objective": objective, "eps": eps, "bounds": bounds}
        return (x + eps).clamp(*bounds)


def _batch(size: int = 4) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.rand(size, 1, 2, 2, generator=generator), "label": torch.tensor([0, 1, 2, 1][:size]),
            "nodule_id": [f"n{i}" for i in range(size)]}


@pytest.mark.parametrize(("adv_fraction", "clean_weight", "adv_weight"),
                         [(1.0, 0.0, 1.0), (0.5, 0.5, 1.0), (0.75, 0.3, 0.7)])
def test_madry_loss_equals_the_hand_computed_loss(adv_fraction, clean_weight, adv_weight):
    module, batch, attack, eps = TinyTask().train(), _batch(), ShiftAttack(), 0.1
    x, y = batch["image"], batch["label"]
    loss = MadryObjective(adv_fraction, clean_weight, adv_weight)(module, batch, Adversary(attack, module, eps))

    n_adv = round(4 * adv_fraction)  # the first n_adv samples are attacked, with their own labels
    assert torch.equal(attack.seen["x"], x[:n_adv]) and torch.equal(attack.seen["batch"]["label"], y[:n_adv])
    assert attack.seen["model"] is module and attack.seen["objective"] is module
    assert attack.seen["eps"] == eps and attack.seen["bounds"] == (0.0, 1.0)
    mixed = torch.cat([(x[:n_adv] + eps).clamp(0, 1), x[n_adv:]])
    if clean_weight == 0:
        expected = adv_weight * F.cross_entropy(module(mixed), y)
    else:  # one forward over [mixed, clean]: one set of BatchNorm statistics for both terms
        logits = module(torch.cat([mixed, x]))
        expected = adv_weight * F.cross_entropy(logits[:4], y) + clean_weight * F.cross_entropy(logits[4:], y)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert module.net[1].weight.grad is not None  # a loss to train on


def test_adversary_resolves_range_eps_on_the_attacked_images():
    module, batch, attack = TinyTask(), _batch(), ShiftAttack()
    x = batch["image"][:2]
    Adversary(attack, module, 0.1, "range")(x, batch)
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    assert torch.allclose(attack.seen["eps"], 0.1 * span)


class VisitCounter(Defense):
    """A defence with per-sample state: how often each nodule was trained on adversarially."""

    name = "visits"

    def __init__(self) -> None:
        self.visits: dict[str, int] = {}

    def __call__(self, module, batch, adversary):
        for key in batch["nodule_id"]:
            self.visits[key] = self.visits.get(key, 0) + 1
        self.log(module, "distinct", float(len(self.visits)), batch_size=len(batch["image"]))
        x_adv = adversary(batch["image"], batch)
        return module.attack_loss(module(x_adv), batch).mean()

    def state_dict(self) -> dict:
        return {"visits": dict(self.visits)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.visits = dict(state_dict.get("visits", {}))


def test_defense_state_round_trips_through_the_callbacks_checkpoint(tiny, tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = compose_config("train", [*tiny, "eval=none"], tmp_path)

    def fit(max_epochs, ckpt_path=None):
        adv = AdversarialTraining(FGSM(), eps=0.004, defense=VisitCounter())
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
        datamodule, module = build_data_and_module(cfg)
        trainer = instantiate(cfg.trainer, callbacks=[adv, checkpoint], logger=False, max_epochs=max_epochs)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        return adv, trainer

    first, trainer = fit(1)
    visits = dict(first.defense.visits)
    assert sum(visits.values()) == 2 * cfg.data.batch_size  # limit_train_batches=2
    # logged through the module, averaged over the epoch's two batches (then b and 2b distinct nodules)
    assert trainer.callback_metrics["train/visits/distinct"].item() == 1.5 * cfg.data.batch_size == 0.75 * len(visits)
    resumed, _ = fit(2, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))  # fresh defence: state from the ckpt
    assert sum(resumed.defense.visits.values()) == 4 * cfg.data.batch_size
    assert all(resumed.defense.visits[key] >= count for key, count in visits.items())
    # a checkpoint written before defences had state: the callback's state loads, the defence starts fresh
    resumed.load_state_dict({"eps_history": [(0, 0.004)], "guard_history": [], "guard_best": None})
    assert resumed.eps_history == [(0, 0.004)] and resumed.defense.visits == {}


def test_guard_attack_that_raises_leaves_every_module_mode_as_it_was():
    class Broken:
        name = "broken"

        def __call__(self, model, x, batch, objective, *, eps, bounds):
            assert not any(m.training for m in model.modules())  # the guard runs in eval mode
            raise RuntimeError("attack failed")

    module = TinyTask().train()
    module.net[2].eval()  # a frozen BatchNorm: exact restoration, not a blanket train()
    modes = [m.training for m in module.modules()]
    callback = AdversarialTraining(ShiftAttack(), eps=0.1, guard_attack=Broken())
    callback._guard_batch = _batch()
    with pytest.raises(RuntimeError, match="attack failed"):
        callback.on_train_epoch_end(None, module)  # the attack raises before the trainer is read
    assert [m.training for m in module.modules()] == modes


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"defense": MadryObjective(adv_fraction=0.5), "adv_fraction": 1.0}, ValueError,
         "adv.adv_fraction=1.0 disagrees with adv.defense (MadryObjective, adv_fraction=0.5)"),
        ({"defense": VisitCounter(), "clean_weight": 0.5}, ValueError, "adv.clean_weight=0.5 disagrees"),
        ({"defense": "trades"}, TypeError, "adv.defense must be a medrobust.defenses.Defense, got 'trades'"),
    ],
)
def test_defense_slot_rejects_conflicting_arguments(kwargs, error, message):
    with pytest.raises(error) as info:
        AdversarialTraining(PGD(steps=2), eps=0.1, **kwargs)
    assert message in str(info.value)


def test_setup_checks_the_members_a_defense_requires():
    class NeedsPrediction(VisitCounter):
        requires = ("prediction",)

    callback = AdversarialTraining(PGD(steps=2), eps=0.1, defense=NeedsPrediction())
    with pytest.raises(TypeError, match=r"AdversarialTraining \(visits\) needs a task module with `prediction`"):
        callback.setup(None, TinyTask(), "fit")
