"""adv.schedule (seed 000's iterative adversarial training): rounds of [epochs, eps], the eps each epoch trains at,
the errors of a bad schedule, and adv=iterative end to end."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_config
from medrobust.attacks import PGD
from medrobust.callbacks import AdversarialTraining
from medrobust.runner import build_callbacks, build_data_and_module, build_trainer


def test_rounds_give_each_epoch_its_eps_and_the_last_eps_after_them():
    callback = AdversarialTraining(PGD(steps=7), eps=0.002, schedule=[[150, 0.001], [50, 0.002]])
    assert [callback.eps_at(e) for e in (0, 149, 150, 199, 250)] == [0.001, 0.001, 0.002, 0.002, 0.002]
    warm = AdversarialTraining(PGD(steps=7), eps=0.004, warmup_epochs=1)  # no schedule: the warm-up as before
    assert [warm.eps_at(e) for e in (0, 1, 5)] == [0.002, 0.004, 0.004]


@pytest.mark.parametrize(("schedule", "kwargs", "message"), [
    ([[0, 0.001]], {}, r"adv.schedule must be a list of \[epochs, eps\] rounds"),
    ([[2.5, 0.001]], {}, r"epochs an integer >= 1"),
    ([[2, -0.1]], {}, r"eps >= 0"),
    ([0.001, 0.002], {}, r"got \[0.001, 0.002\]"),
    ([[2, 0.001]], {}, r"adv.eps=0.002 must be the last round's eps of adv.schedule \(0.001\)"),
    ([[2, 0.002]], {"warmup_epochs": 1}, r"set adv.warmup_epochs=0"),
])
def test_a_bad_schedule_names_what_is_expected(schedule, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdversarialTraining(PGD(steps=7), eps=0.002, schedule=schedule, **kwargs)


def test_iterative_training_runs_its_rounds_and_keeps_them_in_the_checkpoint(tiny_for, tmp_path):
    cfg = compose_config("train", [*tiny_for("lidc"), "adv=iterative", "adv.schedule=[[1,0.001],[2,0.002]]",
                                   "eval=none", "trainer.max_epochs=3"], tmp_path)  # fmt: skip
    datamodule, module = build_data_and_module(cfg)
    callbacks = build_callbacks(cfg)
    (adv,) = [cb for cb in callbacks if isinstance(cb, AdversarialTraining)]
    assert adv.attack.steps == 7 and adv.defense.adv_fraction == 0.5
    build_trainer(cfg, callbacks, []).fit(module, datamodule=datamodule)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("AdversarialTraining")]
    assert [tuple(item) for item in state["eps_history"]] == [(0, 0.001), (1, 0.002), (2, 0.002)]
