"""Suites: a cascade attacks only survivors; the minimum-norm curve agrees with separate PGD runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medrobust.attacks import FGSM, FMN, PGD, ClassifierObjective
from medrobust.evaluation.curve import attack_curve
from medrobust.evaluation.suites import Cascade, MinimumNormCurve
from test_attacks import binary_problem, correct


def test_cascade_attacks_only_survivors_and_keeps_every_success():
    torch.manual_seed(0)
    model, x, labels, radius = binary_problem((48, 1, 4, 5))
    r = radius["linf"]
    eps = float(torch.quantile(r.detach(), 0.5))
    weak = FGSM()  # exact on a linear model: fools exactly the samples with radius < eps
    cascade = Cascade({"fgsm": weak, "pgd": PGD(steps=5)}, name="standard")
    x_adv = cascade(model, x, {"label": labels}, ClassifierObjective(), eps=eps, bounds=None)
    assert cascade.stage_counts == [48, int((r >= eps).sum())]
    still = correct(model, x_adv, labels)
    assert (~still[r < eps]).all() and still[r > eps].all()


def test_cascade_needs_one_norm():
    with pytest.raises(ValueError, match="one norm"):
        Cascade([FGSM("linf"), PGD("l2")])


def _small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 3)).eval()


def test_minimum_norm_curve_agrees_with_separate_pgd_runs():
    """Six eps points from one FMN run + PGD verification: never weaker than separate PGD runs by > 1 point."""
    model = _small_cnn()
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        labels = model(x).argmax(1)  # every sample starts correct
    batch, objective = {"label": labels}, ClassifierObjective()
    eps_values = [0.002, 0.004, 0.008, 0.016, 0.032, 0.064]
    suite = MinimumNormCurve(FMN("linf", steps=50), PGD(steps=10))
    points = attack_curve(suite, model, x, batch, objective, eps_values=eps_values, bounds=(0.0, 1.0))
    assert suite.last_radii.shape == (64,)
    previous = 1.0
    for eps, x_adv in zip(eps_values, points):
        curve_acc = correct(model, x_adv, labels).float().mean().item()
        torch.manual_seed(1)
        pgd_acc = correct(model, PGD(steps=10)(model, x, batch, objective, eps=eps, bounds=(0.0, 1.0)), labels)
        assert curve_acc <= pgd_acc.float().mean().item() + 0.01, eps
        assert curve_acc <= previous  # monotone
        previous = curve_acc
        assert ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-6).all()
    # the radii alone already give the curve where FMN found points: fraction robust = fraction with radius > eps
    radii_acc = (suite.last_radii > eps_values[-1]).float().mean().item()
    assert curve_acc <= radii_acc + 1e-9


def test_minimum_norm_curve_is_exact_on_a_linear_model():
    torch.manual_seed(0)
    model, x, labels, radius = binary_problem((32, 1, 4, 5))
    r = radius["linf"]
    eps_values = [float(q) for q in torch.quantile(r.detach(), torch.tensor([0.25, 0.5, 0.75]).double())]
    suite = MinimumNormCurve(FMN("linf", steps=50), verify=None)
    points = attack_curve(suite, model, x, {"label": labels}, ClassifierObjective(), eps_values=eps_values, bounds=None)
    assert torch.allclose(suite.last_radii, r, rtol=0.02)
    for eps, x_adv in zip(eps_values, points):
        still = correct(model, x_adv, labels)
        assert (~still[r < 0.98 * eps]).all() and still[r > 1.02 * eps].all()


@pytest.mark.parametrize("suite", ["quick", "standard", "curve"])
def test_robust_accuracy_on_a_linear_model_with_known_radii(suite):
    """Every suite breaks exactly the samples whose radius is below eps (Linf, known answer)."""
    from medrobust.evaluation.suites import robust_accuracy

    torch.manual_seed(0)
    model, x, labels, radius = binary_problem((32, 1, 4, 5))
    r = radius["linf"]
    eps = float(torch.quantile(r.detach(), 0.5))
    expected = (r > eps).double().mean().item()
    got = robust_accuracy(model, x, labels, eps=eps, norm="linf", suite=suite, bounds=None)
    assert abs(got - expected) <= 1 / 32 + 1e-9


def test_standard_suite_is_at_least_as_strong_as_quick():
    from medrobust.evaluation.suites import robust_accuracy

    model = _small_cnn(1)
    x = torch.rand(48, 1, 8, 8)
    with torch.no_grad():
        labels = model(x).argmax(1)
    quick = robust_accuracy(model, x, labels, eps=0.03, suite="quick")
    standard = robust_accuracy(model, x, labels, eps=0.03, suite="standard")
    assert standard <= quick + 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curve_suite_is_never_weaker_than_cold_pgd(seed):
    """The `curve` suite as configured (a short FMN run, 3 PGD steps warm-started from its points) against cold
    PGD-10 at every eps: never a sample fewer fooled, on small CNNs."""
    from medrobust.evaluation.suites import curve_suite

    model = _small_cnn(seed)
    torch.manual_seed(100 + seed)
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        labels = model(x).argmax(1)
    batch, objective = {"label": labels}, ClassifierObjective()
    eps_values = [0.002, 0.004, 0.008, 0.016, 0.032, 0.064]
    points = attack_curve(curve_suite(), model, x, batch, objective, eps_values=eps_values, bounds=(0.0, 1.0))
    for eps, x_adv in zip(eps_values, points):
        cold = PGD(steps=10)(model, x, batch, objective, eps=eps, bounds=(0.0, 1.0))
        assert correct(model, x_adv, labels).sum() <= correct(model, cold, labels).sum(), eps
        assert ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-6).all()


class InflatedRadii(FMN):
    """A minimum-norm attack that overstates every radius of a linear model: its points lie ``factor`` times
    past the exact minimal perturbation, along the best direction."""

    def __init__(self, radius, factor):
        super().__init__("linf")
        self.radius, self.factor = radius, factor

    def minimal(self, model, x, batch, objective, *, bounds):
        w = model.weight[1].detach().reshape(x.shape[1:])
        f = model(x)[:, 1].detach()
        direction = -torch.sign(f)[:, None, None, None] * w.sign()
        return x + self.factor * self.radius[:, None, None, None] * direction, self.factor * self.radius


class CountingPGD(PGD):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls: list[int] = []

    def attack_from(self, start, model, x, batch, objective, *, eps, bounds):
        self.calls.append(x.shape[0])
        return super().attack_from(start, model, x, batch, objective, eps=eps, bounds=bounds)


def test_verification_goes_down_where_the_radius_was_too_large():
    """Radii 2.5x too large: each sample is verified at the largest eps below its stated radius, fooled there if
    its true radius is smaller, and then tried one eps lower; the curve comes out exact, the radii lowered."""
    torch.manual_seed(0)
    model, x, labels, radius = binary_problem((48, 1, 4, 5))
    r = radius["linf"]
    eps_values = [float(q) for q in torch.quantile(r.detach(), torch.tensor([0.2, 0.4, 0.6, 0.8]).double())]
    verify = CountingPGD(steps=3)
    suite = MinimumNormCurve(InflatedRadii(r, 2.5), verify)
    points = attack_curve(suite, model, x, {"label": labels}, ClassifierObjective(), eps_values=eps_values,
                          bounds=None)
    for eps, x_adv in zip(eps_values, points):
        still = correct(model, x_adv, labels)
        assert (~still[r < 0.99 * eps]).all() and still[r > eps].all()
    assert (suite.last_radii <= 2.5 * r).all() and (suite.last_radii < 2.5 * r).sum() >= 0.5 * 48
    assert (suite.last_radii >= r * (1 - 1e-9)).all()  # still upper bounds: fooling points' norms
    table = torch.tensor(eps_values, dtype=r.dtype)[:, None]
    first = int((2.5 * r > table[0]).sum())  # one verification per sample with something to verify ...
    again = int(((r < table) & (2.5 * r > table) & (table > table[0])).sum())  # ... plus one per eps fooled above
    assert sum(verify.calls) == first + again
    # an attack without attack_from verifies from its own start (FGSM: exact on a linear model)
    points = attack_curve(MinimumNormCurve(InflatedRadii(r, 2.5), FGSM()), model, x, {"label": labels},
                          ClassifierObjective(), eps_values=eps_values, bounds=None)
    for eps, x_adv in zip(eps_values, points):
        still = correct(model, x_adv, labels)
        assert (~still[r < 0.99 * eps]).all() and still[r > eps].all()


def test_verified_curve_needs_eps_non_decreasing_per_sample():
    from medrobust.evaluation.curve import verified_curve

    model, x, labels, radius = binary_problem((4, 1, 2, 2))
    eps = [torch.tensor([0.1, 0.2, 0.1, 0.1]), torch.tensor([0.2, 0.1, 0.2, 0.2])]
    with pytest.raises(ValueError, match="non-decreasing for every sample"):
        verified_curve(PGD(), model, x, {"label": labels}, ClassifierObjective(), eps_values=eps, bounds=None,
                       known=(x, radius["linf"]), norm="linf")
