"""attack_curve: one pass over increasing eps, monotone, exact on a linear model, cheaper than separate runs."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import FGSM, PGD, Attack, ClassifierObjective
from medrobust.evaluation.curve import attack_curve
from test_attacks import binary_problem, correct


class CountingAttack(Attack):
    """An attack that records how many samples it is asked to attack."""

    def __init__(self, attack):
        self.inner, self.samples, self.name, self.norm = attack, 0, attack.name, attack.norm

    def __call__(self, model, x, batch, objective, *, eps, bounds):
        self.samples += x.shape[0]
        return self.inner(model, x, batch, objective, eps=eps, bounds=bounds)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_curve_is_exact_on_a_linear_model_and_monotone(norm):
    torch.manual_seed(0)
    model, x, labels, radius = binary_problem((64, 1, 4, 5))
    r = radius[norm]
    eps_values = [float(q) for q in torch.quantile(r.detach(), torch.tensor([0.2, 0.4, 0.6, 0.8]).double())]
    step = 0.2 if norm == "linf" else 1.0
    attack = PGD(norm=norm, steps=30, rel_step_size=step)
    points = attack_curve(attack, model, x, {"label": labels}, ClassifierObjective(), eps_values=eps_values, bounds=None)
    previous = torch.ones_like(labels, dtype=torch.bool)
    for eps, x_adv in zip(eps_values, points):
        still = correct(model, x_adv, labels)
        # fooled exactly where the true radius is below eps (1 % slack for the iterate not reaching the edge)
        assert (~still[r < 0.99 * eps]).all() and still[r > eps].all()
        assert not (still & ~previous).any()  # monotone: once fooled, fooled at every larger eps
        previous = still


def test_curve_attacks_only_survivors():
    """Each eps attacks only the samples no smaller eps has fooled (FGSM is exact on a linear model)."""
    torch.manual_seed(0)
    model, x, labels, radius = binary_problem((64, 1, 4, 5))
    r = radius["linf"]
    eps_values = [float(q) for q in torch.quantile(r.detach(), torch.tensor([0.3, 0.6, 0.9]).double())]
    attack = CountingAttack(FGSM())
    attack_curve(attack, model, x, {"label": labels}, ClassifierObjective(), eps_values=eps_values, bounds=None)
    expected = 64 + int((r >= eps_values[0]).sum()) + int((r >= eps_values[1]).sum())
    assert attack.samples == expected < 3 * 64


def test_curve_rejects_decreasing_eps():
    model, x, labels, _ = binary_problem((4, 1, 2, 2))
    with pytest.raises(ValueError, match="non-decreasing"):
        attack_curve(FGSM(), model, x, {"label": labels}, ClassifierObjective(), eps_values=[0.2, 0.1], bounds=None)


def test_corruptions_are_applied_at_each_severity_independently():
    """No worst case is kept across severities: the noise at each eps has std eps x scale."""
    from medrobust.attacks import GaussianNoise

    model, _, labels, _ = binary_problem((16, 1, 4, 5))
    x = torch.full((16, 1, 32, 32), 0.5, dtype=torch.float64)
    points = attack_curve(GaussianNoise(scale=0.1), model, x, {"label": labels}, ClassifierObjective(),
                          eps_values=[0.0, 0.5, 1.0], bounds=(0.0, 1.0))
    stds = [float((p - x).std()) for p in points]
    assert stds[0] == 0.0
    assert stds[1] == pytest.approx(0.05, rel=0.05) and stds[2] == pytest.approx(0.1, rel=0.05)


class _BandObjective:
    """Loss ``x.sum()``; a sample is correct outside the band ``0.5 < x.sum() < 1.5``: climbing the loss from inside
    the band (wrong) leaves it on the correct side, as a loss-defined verdict can."""

    def attack_loss(self, output, batch):
        return output

    def is_correct(self, output, batch):
        return (output <= 0.5) | (output >= 1.5)


def test_a_sample_wrong_on_its_clean_image_is_never_counted_correct_under_attack():
    model = lambda x: x.flatten(1).sum(dim=1)  # noqa: E731
    x = torch.tensor([[[0.25, 0.25]], [[0.5, 0.5]]])  # sums 0.5 (correct) and 1.0 (wrong)
    points = attack_curve(FGSM(), model, x, {}, _BandObjective(), eps_values=[0.0, 0.3], bounds=None)
    correct = _BandObjective().is_correct(model(points[1]), {})
    assert torch.equal(points[1][1], x[1])  # the wrong sample keeps its clean image (FGSM would reach sum 1.6)
    assert correct.tolist() == [False, False]  # the first is fooled (sum 1.1); the second stays wrong
