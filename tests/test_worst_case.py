"""Worst-case curves: continuous metrics read at the highest-loss point within each eps, against known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medrobust.attacks import FGSM, PGD
from medrobust.evaluation.worst_case import EACH_EPS, FIRST_FAILURE, WORST_LOSS, robustness_curve
from medrobust.evaluation.corruptions import GaussianNoise


class LinearRegressor(nn.Module):
    """``y = w . x + b``; ``w`` with mixed signs so the worst direction differs per coordinate."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1) + self.b


class AbsoluteError:
    """attack_loss = |y - label|, correct while it is <= tau (the regression task's contract)."""

    def __init__(self, tau: float) -> None:
        self.tau = tau

    def attack_loss(self, output, batch):
        return (output - batch["label"]).abs()

    def is_correct(self, output, batch):
        return (output - batch["label"]).abs() <= self.tau


def _problem(shape):
    torch.manual_seed(1)
    model = LinearRegressor(shape[1:])
    x = 0.3 + 0.4 * torch.rand(shape, dtype=torch.float64)  # inside [0, 1] with room: the bounds never bind below
    with torch.no_grad():
        labels = model(x) + 0.05 * torch.randn(shape[0], dtype=torch.float64)
    return model, x, {"label": labels}


@pytest.mark.parametrize("shape", [(16, 1, 6, 7), (16, 1, 3, 4, 5)], ids=["2d", "3d"])
def test_worst_case_mae_of_a_linear_regressor_matches_the_exact_optimum(shape):
    """The worst |error| inside the Linf ball is |error| + eps * ||w||_1 (bounds not binding): the curve's MAE
    must reach it at every eps within 1 %, while the early-stopped points stop at the threshold."""
    model, x, batch = _problem(shape)
    objective = AbsoluteError(tau=0.1)
    eps_values = [0.0, 0.005, 0.01, 0.02, 0.04]
    curve = robustness_curve(PGD("linf", steps=10), model, x, batch, objective, eps_values=eps_values, bounds=(0, 1))
    assert curve.worst_kind == WORST_LOSS
    with torch.no_grad():
        clean_error = (model(x) - batch["label"]).abs()
        w_l1 = model.w.abs().sum()
        for eps, worst, first in zip(eps_values, curve.worst, curve.first_failure):
            assert float((worst - x).abs().max()) <= eps + 1e-12 and worst.min() >= 0 and worst.max() <= 1
            exact = float((clean_error + eps * w_l1).mean())
            mae = float((model(worst) - batch["label"]).abs().mean())
            assert mae == pytest.approx(exact, rel=0.01), (eps, mae, exact)
        early_mae = float((model(curve.first_failure[-1]) - batch["label"]).abs().mean())
        assert early_mae < 0.8 * exact  # the early-stopped point is what made the old curves flat


def test_accuracy_points_fool_whoever_either_point_fools_and_stay_monotone():
    model, x, batch = _problem((16, 1, 6, 7))
    objective = AbsoluteError(tau=0.2)
    eps_values = [0.0, 0.002, 0.005, 0.01]
    curve = robustness_curve(FGSM("linf"), model, x, batch, objective, eps_values=eps_values, bounds=(0, 1))
    fooled_before = torch.zeros(16, dtype=torch.bool)
    with torch.no_grad():
        for point, worst in zip(curve.first_failure, curve.worst):
            fooled = ~objective.is_correct(model(point), batch)
            assert bool((fooled >= ~objective.is_correct(model(worst), batch)).all())
            assert bool((fooled >= fooled_before).all())
            fooled_before = fooled
    assert bool(fooled_before.any())


def test_worst_case_off_and_perturbations_without_errors_say_which_points_they_are():
    model, x, batch = _problem((8, 1, 5, 5))
    eps_values = [0.0, 0.01]
    plain = robustness_curve(PGD("linf", steps=3), model, x, batch, AbsoluteError(0.1), eps_values=eps_values,
                             bounds=(0, 1), worst_case=False)
    assert plain.worst_kind == FIRST_FAILURE and plain.worst is plain.first_failure
    noise = robustness_curve(GaussianNoise(scale=0.1), model, x, batch, AbsoluteError(0.1), eps_values=eps_values,
                             bounds=(0, 1))
    assert noise.worst_kind == EACH_EPS and torch.equal(noise.worst[0], x)


def _row(attack, metric, eps, value, norm="linf"):
    return {"attack": attack, "metric": metric, "eps": eps, "value": value, "norm": norm}


def test_a_weaker_attack_reaching_a_worse_continuous_metric_is_flagged_per_metric():
    from medrobust.evaluation.masking import check_metric_rows

    rows = [_row("pgd10_linf", "mae", 0.004, 9.6), _row("directional_down_linf", "mae", 0.004, 20.3),
            _row("pgd10_linf", "r2", 0.004, 0.71), _row("directional_down_linf", "r2", 0.004, 0.705),
            _row("pgd10_linf", "age_shift", 0.004, 1.0), _row("directional_down_linf", "age_shift", 0.004, 20.0),
            _row("pgd10_l2", "mae", 0.004, 50.0, norm="l2"), _row("pgd10_linf", "accuracy", 0.004, 0.5),
            _row("directional_down_linf", "accuracy", 0.004, 0.0)]
    directions = {"mae": False, "r2": True, "age_shift": None, "accuracy": True}
    flags = check_metric_rows(rows, strongest="pgd10_linf", directions=directions, skip=["accuracy"])
    # MAE: worse under the directional attack; R2 within 1 %; the shift has no bad direction; L2 is another
    # threat model; accuracy is the success metric, checked elsewhere
    assert [flag.name for flag in flags] == ["weaker_attack_wins_mae"]
    assert "directional_down_linf" in flags[0].message and "20.3" in flags[0].message
    assert check_metric_rows(rows[:2], strongest="directional_down_linf", directions=directions) == []


def test_a_cascade_reads_its_continuous_metrics_at_the_worst_of_its_white_box_stages():
    """The cascade's full-budget form runs each white-box stage on every sample (Square, black-box, stays out) and
    keeps the highest loss: on the linear regressor it meets the exact worst MAE, as a single PGD does."""
    from medrobust.attacks import Square
    from medrobust.evaluation.suites import Cascade, WorstOf

    model, x, batch = _problem((8, 1, 6, 7))
    cascade = Cascade({"fgsm": FGSM("linf"), "pgd": PGD("linf", steps=10), "square": Square(queries=5)})
    full = cascade.full_budget()
    assert isinstance(full, WorstOf) and [type(s).__name__ for s in full.stages] == ["FGSM", "PGD"]
    assert full.stages[1].early_stop is False
    eps_values = [0.0, 0.01, 0.04]
    curve = robustness_curve(cascade, model, x, batch, AbsoluteError(tau=0.1), eps_values=eps_values, bounds=(0, 1))
    assert curve.worst_kind == WORST_LOSS
    with torch.no_grad():
        clean_error, w_l1 = (model(x) - batch["label"]).abs(), model.w.abs().sum()
        for eps, worst in zip(eps_values, curve.worst):
            mae = float((model(worst) - batch["label"]).abs().mean())
            assert mae == pytest.approx(float((clean_error + eps * w_l1).mean()), rel=0.01)
    assert Cascade({"square": Square(queries=5)}).full_budget() is None  # nothing white-box: labelled instead


def test_samples_left_correct_by_the_early_stopped_run_are_not_attacked_again():
    """PGD declares that a sample its early-stopped run leaves correct had its whole budget: the worst-case pass
    attacks only the others, and the curve still meets the exact optimum. A wrapper that does not declare it
    gets every sample attacked again."""
    model, x, batch = _problem((16, 1, 6, 7))
    with torch.no_grad():
        clean_error = (model(x) - batch["label"]).abs()
    eps, w_l1 = 0.005, float(model.w.abs().sum().detach())
    objective = AbsoluteError(tau=float(clean_error.median()) + eps * w_l1)  # about half the samples survive eps
    attacked = []
    handle = model.register_forward_pre_hook(lambda _, args: attacked.append(len(args[0])) if torch.is_grad_enabled()
                                             else None)

    class Undeclared(PGD):
        survivors_had_full_budget = False

    for attack in (PGD("linf", steps=10), Undeclared("linf", steps=10)):
        attacked.clear()
        torch.manual_seed(0)  # the same random starts for the early-stopped run in both calls
        robustness_curve(attack, model, x, batch, objective, eps_values=[eps], bounds=(0, 1), worst_case=False)
        early = sum(attacked)  # the early-stopped run's gradient passes alone
        attacked.clear()
        torch.manual_seed(0)
        curve = robustness_curve(attack, model, x, batch, objective, eps_values=[eps], bounds=(0, 1))
        with torch.no_grad():
            survivors = int(objective.is_correct(model(curve.first_failure[0]), batch).sum())
            mae = float((model(curve.worst[0]) - batch["label"]).abs().mean())
        assert 0 < survivors < 16
        expected = 16 - survivors if attack.survivors_had_full_budget else 16
        assert sum(attacked) - early == 10 * expected, (type(attack).__name__, attacked)
        assert mae == pytest.approx(float((clean_error + eps * w_l1).mean()), rel=0.01)
    handle.remove()
