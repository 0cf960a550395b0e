"""Gradient-masking flags: a deliberately masked model is flagged, a normal one is not."""

from __future__ import annotations

import torch
from torch import nn

from medrobust.attacks import ClassifierObjective
from medrobust.evaluation.masking import check_rows, probe_model
from test_attacks import binary_problem


class Quantized(nn.Module):
    """Input quantization by rounding before a model: the input gradient is zero almost everywhere."""

    def __init__(self, model: nn.Module, levels: int = 8) -> None:
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x):
        return self.model(torch.round(x * self.levels) / self.levels)


class Noisy(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.05 * torch.randn_like(x))


def _problem():
    torch.manual_seed(0)
    model, _, _, _ = binary_problem((32, 1, 4, 5))
    x = torch.rand(32, 1, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        labels = model(x).argmax(1)
    return model, x, {"label": labels}


def _names(flags):
    return {flag.name for flag in flags}


def test_normal_model_is_not_flagged():
    model, x, batch = _problem()
    assert probe_model(model, x, batch, ClassifierObjective(), norm="linf", bounds=(0.0, 1.0)) == []


def test_quantized_model_is_flagged():
    model, x, batch = _problem()
    flags = probe_model(Quantized(model), x, batch, ClassifierObjective(), norm="linf", bounds=(0.0, 1.0))
    assert {"zero_gradients", "survives_large_eps"} <= _names(flags)


def test_randomized_model_is_flagged():
    model, x, batch = _problem()
    flags = probe_model(Noisy(model), x, batch, ClassifierObjective(), norm="linf", bounds=(0.0, 1.0))
    assert "randomized_model" in _names(flags)


def _rows(curves: dict[str, list[float]]):
    eps = [0.0, 0.002, 0.004, 0.008]
    return [{"attack": a, "eps": e, "metric": "accuracy", "value": v} for a, vs in curves.items() for e, v in zip(eps, vs)]


def test_row_checks():
    healthy = _rows({"fgsm": [0.9, 0.7, 0.5, 0.3], "pgd": [0.9, 0.6, 0.4, 0.1], "square": [0.9, 0.8, 0.6, 0.4]})
    assert check_rows(healthy, ["fgsm", "pgd"], black_box=["square"]) == []
    rising = _rows({"pgd": [0.9, 0.6, 0.7, 0.1]})
    assert _names(check_rows(rising, ["pgd"])) == {"rises_with_eps"}
    weaker = _rows({"fgsm": [0.9, 0.5, 0.4, 0.3], "pgd": [0.9, 0.6, 0.4, 0.3]})
    assert _names(check_rows(weaker, ["fgsm", "pgd"])) == {"weaker_attack_wins"}
    black = _rows({"pgd": [0.9, 0.6, 0.4, 0.3], "square": [0.9, 0.6, 0.2, 0.1]})
    assert _names(check_rows(black, ["pgd"], black_box=["square"])) == {"black_box_wins"}


def test_cascade_reports_a_black_box_stage_that_breaks_what_white_box_could_not():
    from medrobust.attacks import PGD, Square
    from medrobust.evaluation.suites import Cascade

    model, x, batch = _problem()
    objective = ClassifierObjective()
    for net, flagged in ((model, False), (Quantized(model), True)):
        cascade = Cascade({"pgd": PGD(steps=10), "square": Square(queries=300)}, name="standard")
        cascade(net, x, batch, objective, eps=0.3, bounds=(0.0, 1.0))
        assert bool(cascade.black_box_wins()) == flagged
        assert cascade.attacked["pgd"] == 32
