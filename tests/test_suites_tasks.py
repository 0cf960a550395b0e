"""The evaluation suites beyond classification: a regression task module and a toy segmentation objective.

Known answer for regression: a linear regressor ``pred = w . x + b`` judged correct within ``tau`` is broken at
Linf radius exactly ``(tau - |error|) / ||w||_1`` (unbounded inputs), so every suite's robust accuracy at eps
is the fraction of samples whose radius exceeds eps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.evaluation.curve import attack_curve
from medrobust.evaluation.suites import build_suite
from medrobust.tasks import RegressionTask

SUITES = ("quick", "standard", "curve")


def _linear_regression_task(dims: int, seed: int = 0):
    torch.manual_seed(seed)
    shape = (1,) + (4,) * dims
    net = nn.Sequential(nn.Flatten(), nn.Linear(4 ** dims, 1))
    task = RegressionTask(net, tau=2.0, target_mean=0.0, target_std=1.0).eval()
    x = torch.randn(48, *shape)
    with torch.no_grad():
        pred = task.prediction(task(x), {})
    error = torch.rand(48) * 3.0 - 1.5  # |error| < tau: every sample starts correct
    batch = {"image": x, "label": pred - error}
    radius = (2.0 - error.abs()) / net[1].weight.detach().abs().sum()
    return task, x, batch, radius


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("dims", [2, 3])
def test_suites_on_a_linear_regressor_match_the_exact_radii(suite, dims):
    task, x, batch, radius = _linear_regression_task(dims)
    eps_values = [float(q) for q in radius.quantile(torch.tensor([0.25, 0.5, 0.75]))]
    points = attack_curve(build_suite(suite), task, x, batch, task, eps_values=eps_values, bounds=None)
    for eps, x_adv in zip(eps_values, points):
        assert (x_adv - x).abs().amax() <= eps * (1 + 1e-5)
        with torch.no_grad():
            correct = task.is_correct(task(x_adv), batch)
        expected = radius > eps
        # exact up to samples within 1 % of the radius (step sizes decide those)
        near = (radius - eps).abs() <= 0.01 * eps
        assert torch.equal(correct[~near], expected[~near]), (suite, eps)


class SegmentationToy:
    """Per-pixel logits ``(B, K, *spatial)``; loss: mean pixel CE; correct: pixel accuracy >= 0.9."""

    outputs_logits = False  # per-pixel logits, not (B, K): the suites use this loss

    def attack_loss(self, output, batch):
        return F.cross_entropy(output.float(), batch["label"], reduction="none").flatten(1).mean(1)

    def pixel_accuracy(self, output, batch):
        return (output.argmax(1) == batch["label"]).float().flatten(1).mean(1)

    def is_correct(self, output, batch):
        return self.pixel_accuracy(output, batch) >= 0.9

    def correct_margin(self, output, batch):  # > 0 exactly where correct (Square reads it)
        return self.pixel_accuracy(output, batch) - 0.9 + 1e-6


@pytest.mark.parametrize("suite", ("quick", "standard"))
def test_suites_raise_a_segmentation_loss_and_respect_bounds(suite):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    with torch.no_grad():
        net[0].weight.mul_(10)  # pixels' classes depend on the image, not only on the biases
    x = torch.rand(6, 1, 12, 12)
    with torch.no_grad():
        labels = net(x).argmax(1)  # the clean prediction: every sample starts fully correct
    batch, objective = {"image": x, "label": labels}, SegmentationToy()
    x_adv = build_suite(suite)(net, x, batch, objective, eps=0.1, bounds=(0.0, 1.0))
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv - x).abs().amax() <= 0.1 + 1e-6
    with torch.no_grad():
        clean_loss = objective.attack_loss(net(x), batch)
        adv_loss = objective.attack_loss(net(x_adv), batch)
        fooled = ~objective.is_correct(net(x_adv), batch)
    assert (adv_loss > clean_loss).all()
    assert fooled.all()  # eps 0.1 takes every image below 90 % pixel accuracy
