"""eval.attack_eps: an attack with its own eps list in the same evaluation as others (seed 004's L2 PGD beside the
Linf attacks). Its rows equal those of a separate evaluation of that attack alone; the masking checks compare only
attacks of one norm; the comparison of runs gives each attack its own columns and ranks by the first attack's norm."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import FGSM, PGD
from medrobust.callbacks import RobustnessEvaluation
from medrobust.reporting import write_csv
from medrobust.reporting.comparison import compare_runs
from medrobust.reporting.comparison_table import comparison_markdown
from medrobust.runner import build_data_and_module
from conftest import compose_config
from test_compare import _run


@pytest.mark.parametrize(
    ("attack_eps", "message"),
    [
        ({"pgd_l1": [0.5]}, "eval.attack_eps.pgd_l1: no attack of that name in eval.attacks; there: "),
        ({"pgd_l2": [0.5, -1.0]}, "eval.attack_eps.pgd_l2 must be a non-empty list of values >= 0"),
        ({"pgd_l2": []}, "eval.attack_eps.pgd_l2 must be a non-empty list"),
        ({"pgd_l2": 0.5}, "eval.attack_eps.pgd_l2 must be a non-empty list"),
    ],
)
def test_attack_eps_rejects_unknown_attacks_and_bad_lists(attack_eps, message):
    with pytest.raises(ValueError) as info:
        RobustnessEvaluation({"pgd": PGD(steps=2), "pgd_l2": PGD(norm="l2", steps=2)}, attack_eps=attack_eps)
    assert message in str(info.value)
    if "no attack" in message:  # the names a user can write: config names and labels
        assert all(name in str(info.value) for name in ("pgd_l2", "pgd2_l2", "pgd"))


@pytest.fixture(scope="module")
def module_and_loader(tiny, tmp_path_factory):
    cfg = compose_config("train", [*tiny], tmp_path_factory.mktemp("attack_eps"))
    datamodule, module = build_data_and_module(cfg)
    datamodule.prepare_data()
    datamodule.setup("validate")
    module.input_bounds, module.intensity = datamodule.input_bounds, datamodule.intensity
    return module, list(datamodule.val_dataloader())[:2]


def test_an_attack_with_its_own_eps_gets_the_rows_of_its_own_evaluation(module_and_loader):
    module, batches = module_and_loader
    both = RobustnessEvaluation({"pgd": PGD(steps=3), "pgd_l2": PGD(norm="l2", steps=3)}, eps=[0.004],
                                attack_eps={"pgd_l2": [0.25, 0.5]}, seed=7)
    alone = RobustnessEvaluation({"pgd_l2": PGD(norm="l2", steps=3)}, eps=[0.25, 0.5], seed=7)
    found = both.evaluate(module, batches, split="val", epoch=0, max_batches=None)
    rows = found.rows
    assert {(r["attack"], r["eps"]) for r in rows} == {("pgd3_linf", 0.0), ("pgd3_linf", 0.004),
                                                       ("pgd3_l2", 0.0), ("pgd3_l2", 0.25), ("pgd3_l2", 0.5)}
    result = alone.evaluate(module, batches, split="val", epoch=0, max_batches=None)
    mine = {(r["eps"], r["metric"]): r["value"] for r in rows if r["attack"] == "pgd3_l2"}
    assert mine == {(r["eps"], r["metric"]): r["value"] for r in result.rows}  # same seeds, same draws
    example = found.examples["pgd3_l2"]
    eps, x, x_adv = example.eps, example.x, example.x_adv
    assert eps == 0.5
    assert (x_adv - x).flatten(1).norm(dim=1).max().item() <= 0.5 + 1e-5  # within its own L2 budget
    assert both.state_key != RobustnessEvaluation({"pgd": PGD(steps=3), "pgd_l2": PGD(norm="l2", steps=3)},
                                                  eps=[0.004], seed=7).state_key


def test_masking_checks_compare_attacks_within_a_norm_only(module_and_loader):
    """An L2 attack leaving more accuracy than Linf FGSM at the same number is no sign of masking; a Linf PGD doing
    so is."""
    module, _ = module_and_loader
    evaluation = RobustnessEvaluation({"fgsm": FGSM(), "pgd": PGD(steps=3), "pgd_l2": PGD(norm="l2", steps=3)},
                                      eps=[0.004], probe_splits=())
    accuracy = {"fgsm_linf": 0.2, "pgd3_l2": 0.8}

    def flags(accuracies):
        from medrobust.callbacks.robustness_evaluation import Evaluation

        rows = [{"attack": a, "norm": a.rsplit("_", 1)[1], "eps": eps, "metric": "accuracy",
                 "value": 0.9 if eps == 0 else value} for a, value in accuracies.items() for eps in (0.0, 0.004)]
        return [flag.name for flag in evaluation._masking_flags(module, Evaluation(rows=rows), "val")]

    assert flags({**accuracy, "pgd3_linf": 0.1}) == []
    assert flags({**accuracy, "pgd3_linf": 0.5}) == ["weaker_attack_wins"]  # PGD above FGSM, both Linf


def test_comparison_gives_each_attack_its_eps_and_ranks_by_the_first_attacks_norm(tmp_path):
    """Two runs, PGD Linf at 0.004 / 0.008 and PGD L2 at 0.5 / 1.0: no missing cells; the ranking at Linf 0.008,
    the L2 numbers (which favour the other run) shown but not mixed into the worst."""
    def rows(clean, linf, l2):
        cells = [("pgd10_linf", "linf", 0.0, clean), ("pgd10_l2", "l2", 0.0, clean)]
        cells += [("pgd10_linf", "linf", e, v) for e, v in zip((0.004, 0.008), linf)]
        cells += [("pgd10_l2", "l2", e, v) for e, v in zip((0.5, 1.0), l2)]
        return [{"epoch": 1, "split": "test", "attack": a, "norm": n, "eps": e, "eps_unit": "model",
                 "metric": "dice", "value": v, "points": "worst_loss"} for a, n, e, v in cells]

    _run(tmp_path / "sweep" / "0", ["adv=pgd"], rows(0.8, (0.7, 0.6), (0.5, 0.2)))
    _run(tmp_path / "sweep" / "1", ["adv=margin"], rows(0.8, (0.7, 0.5), (0.6, 0.4)))
    c = compare_runs(tmp_path / "sweep", count_params=False)
    assert c.cells() == [("pgd10_linf", 0.004), ("pgd10_linf", 0.008), ("pgd10_l2", 0.5), ("pgd10_l2", 1.0)]
    assert not c.missing
    assert c.eps == 0.008 and c.ranked == ["pgd10_linf"]
    assert c.most_robust.label == "adv=pgd"
    assert c.worst(c.most_robust) == ("pgd10_linf", 0.6)
    assert c.headline_eps("pgd10_l2") == 1.0 and c.most_robust.robust == {"pgd10_linf": 0.6, "pgd10_l2": 0.2}
    text = comparison_markdown(c)
    assert "strongest linf (pgd10_linf) attack's at eps 0.008" in text
    assert "pgd10_l2 dice @ 1" in text and "0.4000" in text
