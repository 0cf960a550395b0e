"""trainer.precision=bf16-mixed on the CPU: every task through adversarial training (adv=pgd) with its own
evaluation, and the default task through every evaluation suite; every number they write is finite.

The attacks compute their losses in float32 under autocast (tests/test_attacks.py and the suites' own tests check
the dtype); this is the end-to-end check that nothing on the way (defences, task losses, metrics, masking checks,
reports) breaks or turns to NaN in bfloat16. The combinations come from tests/test_contract.py's discovery, so a
new task or suite is covered here too.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest

from conftest import compose_config
from medrobust.reporting import read_csv
from medrobust.runner import build_callbacks, build_data_and_module, build_loggers, build_trainer
from test_contract import COMBOS, _default_task, _short_suites

BF16_COMBOS = [(task, adv, evaluation) for task, adv, evaluation in COMBOS
               if adv == ("none" if task == _default_task() else "pgd")]


@pytest.mark.parametrize(("task", "adv", "evaluation"), BF16_COMBOS, ids=["-".join(c) for c in BF16_COMBOS])
def test_bf16_mixed_trains_attacks_and_reports_finite_numbers(tiny_for, task, adv, evaluation, tmp_path):
    cfg = compose_config("train", [*tiny_for(task), f"adv={adv}", f"eval={evaluation}",
                                   "trainer.precision=bf16-mixed"], tmp_path)
    _short_suites(cfg)
    L.seed_everything(cfg.seed, workers=True)  # as train.py: the weights must not depend on the tests run before
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    assert trainer.precision == "bf16-mixed"
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, ckpt_path="best")
    assert math.isfinite(float(trainer.callback_metrics["test/accuracy"]))
    if evaluation == "none":
        return
    rows = [row for row in read_csv(Path(tmp_path) / "robustness.csv") if row["split"] == "test"]
    values = [float(row["value"]) for row in rows if row["value"] != "" and row["metric"] != "radius"]
    assert values and all(math.isfinite(value) for value in values)
    radii = [float(row["value"]) for row in rows if row["metric"] == "radius"]  # inf: not fooled within the budget
    assert all(radius >= 0 and not math.isnan(radius) for radius in radii)
