"""The regression task module, its metrics and the hybrid model, on tensors with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medrobust.attacks import PGD
from medrobust.models import HybridRegressor, SmallCNN
from medrobust.tasks import RegressionTask
from medrobust.tasks.base import compute_metrics, metric_collection
from medrobust.tasks.regression_metrics import MeanShift, band_name, parse_bands, regression_metrics


def _task(net, **kwargs) -> RegressionTask:
    return RegressionTask(net, target_mean=50.0, target_std=10.0, **kwargs)


class Constant(nn.Module):
    """Predicts the standardised values it is given, whatever the image."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.as_tensor(values, dtype=torch.float32)

    def forward(self, x):
        return self.values[: len(x), None]


def test_metrics_known_values():
    ages = torch.tensor([10.0, 20.0, 30.0, 70.0])
    pred = torch.tensor([12.0, 20.0, 25.0, 80.0])
    reference = torch.tensor([10.0, 21.0, 30.0, 70.0])
    metrics = metric_collection(regression_metrics(tau=3.0, bands=parse_bands([15, 25, 50, 65])))
    metrics.update(torch.stack([pred, reference], 1), ages)
    values = compute_metrics(metrics)
    errors = pred - ages
    assert values["mae"] == pytest.approx(errors.abs().mean().item())
    assert values["rmse"] == pytest.approx(errors.pow(2).mean().sqrt().item())
    sst = ((ages - ages.mean()) ** 2).sum()
    assert values["r2"] == pytest.approx(1 - (errors ** 2).sum().item() / sst.item(), rel=1e-5)
    assert values["accuracy"] == pytest.approx(0.5)  # |2|, |0| within 3 years; |5|, |10| not
    assert values["age_shift"] == pytest.approx(abs((pred - reference).mean().item()))
    assert values["age_shift_lt15"] == pytest.approx(2.0)
    assert values["age_shift_15-25"] == pytest.approx(1.0)
    assert values["age_shift_25-50"] == pytest.approx(5.0)
    assert values["age_shift_gt65"] == pytest.approx(10.0)
    assert "age_shift_50-65" not in values  # no subject in the band: skipped, not NaN


def test_bands_stay_separate_across_batches():
    """Two bands empty after the first batch must not be merged (torchmetrics compute groups)."""
    metrics = metric_collection({"a": MeanShift(0, 10), "b": MeanShift(10, 20)})
    metrics.update(torch.tensor([[1.0, 1.0]]), torch.tensor([50.0]))
    metrics.update(torch.tensor([[3.0, 1.0]]), torch.tensor([15.0]))
    values = compute_metrics(metrics)
    assert set(values) == {"b"} and values["b"] == pytest.approx(2.0)


def test_band_parsing_and_names():
    assert [band_name(*b) for b in parse_bands([15, 25, 50, 65])] == ["lt15", "15-25", "25-50", "50-65", "gt65"]
    with pytest.raises(ValueError, match="strictly increasing"):
        parse_bands([25, 15])


def test_contract_on_known_predictions():
    task = _task(Constant([0.0, 1.0, -2.0]), tau=5.0)
    batch = {"image": torch.zeros(3, 1, 4, 4, 4), "label": torch.tensor([50.0, 55.0, 40.0])}
    output = task(batch["image"])
    assert torch.allclose(task.prediction(output, batch), torch.tensor([50.0, 60.0, 30.0]))
    assert task.is_correct(output, batch).tolist() == [True, True, False]
    assert torch.allclose(task.correct_margin(output, batch), torch.tensor([5.0, 0.0, -5.0]))
    assert torch.allclose(task.attack_loss(output, batch), torch.tensor([0.0, 0.5, 1.0]))  # L1 in std units
    mse = _task(Constant([0.0, 1.0, -2.0]), loss="mse")
    assert torch.allclose(mse.attack_loss(output, batch), torch.tensor([0.0, 0.25, 1.0]))


@pytest.mark.parametrize("kwargs, match", [
    ({"loss": "l3"}, "module.loss"), ({"tau": 0}, "module.tau"), ({"target_std": -1.0}, "target_std"),
])
def test_bad_arguments_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegressionTask(nn.Linear(1, 1), **{"target_mean": 0.0, "target_std": 1.0, **kwargs})


def test_hybrid_features_come_from_the_batch_and_survive_an_attack():
    torch.manual_seed(0)
    net = HybridRegressor(spatial_dims=3, num_features=4, channels=(4, 8), embed_dim=4, hidden=8)
    task = _task(net, tau=0.5).eval()
    x = torch.rand(6, 1, 8, 8, 8)
    features = torch.randn(6, 4)
    batch = {"image": x, "label": torch.full((6,), 50.0), "features": features.clone()}
    clean = task.prediction(task(x), batch)
    x_adv = PGD(steps=5, random_start=False)(task, x, batch, task, eps=0.05, bounds=(0.0, 1.0))
    assert torch.equal(batch["features"], features)  # the attack never touched them
    adv = task.prediction(task(x_adv), batch)
    assert (task.attack_loss(task(x_adv), batch) >= task.attack_loss(task(x), batch) - 1e-6).all()
    assert not torch.allclose(adv, clean)  # the image part still moves the prediction
    # the features do reach the prediction: changing them changes it
    moved = task.prediction(task(x), {**batch, "features": features + 1.0})
    assert not torch.allclose(moved, clean)


def test_hybrid_needs_features():
    net = HybridRegressor(spatial_dims=3, channels=(4,), embed_dim=2, hidden=4)
    with pytest.raises(ValueError, match="needs anatomical features"):
        net.bind_features(0)
    net.bind_features(3)
    with pytest.raises(ValueError, match="model.num_features=3 but the data gives 5"):
        net.bind_features(5)
    task = _task(net)
    x = torch.zeros(2, 1, 4, 4, 4)
    with pytest.raises(KeyError, match="features"):
        task.prediction(task(x), {"image": x, "label": torch.zeros(2)})


def test_standardisation_is_saved_with_the_weights():
    task = _task(SmallCNN(3, 1, 1, (4,)))
    state = task.state_dict()
    fresh = RegressionTask(SmallCNN(3, 1, 1, (4,)))
    assert math.isnan(fresh.target_mean.item())
    fresh.load_state_dict(state)
    assert fresh.target_mean.item() == 50.0 and fresh.target_std.item() == 10.0


def test_network_output_shape_is_checked():
    task = _task(nn.Flatten())
    x = torch.zeros(2, 1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"must output \(B, 1\)"):
        task.prediction(task(x), {"image": x, "label": torch.zeros(2)})
