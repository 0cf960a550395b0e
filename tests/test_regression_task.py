"""The regression task module, its metrics and the hybrid model, on tensors with known answers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medrobust.attacks import PGD
from medrobust.models import HybridRegressor, SmallCNN
from medrobust.tasks import BrainAgeTask, RegressionTask
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
    assert values["shift"] == pytest.approx(abs((pred - reference).mean().item()))
    assert values["shift_lt15"] == pytest.approx(2.0)
    assert values["shift_15-25"] == pytest.approx(1.0)
    assert values["shift_25-50"] == pytest.approx(5.0)
    assert values["shift_gt65"] == pytest.approx(10.0)
    assert "shift_50-65" not in values  # no subject in the band: skipped, not NaN


def test_a_model_gone_to_nan_shows_nan_metrics_instead_of_dropping_them():
    """Only a band without samples is dropped; NaN predictions of samples give NaN values the run reports."""
    metrics = metric_collection(regression_metrics(tau=3.0, bands=parse_bands([15, 25])))
    metrics.update(torch.tensor([[math.nan, 20.0], [math.nan, 21.0]]), torch.tensor([20.0, 22.0]))
    values = compute_metrics(metrics)
    assert math.isnan(values["mae"]) and math.isnan(values["shift_15-25"])
    assert "shift_lt15" not in values and "shift_gt25" not in values


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


BRAIN_AGE_METRICS = {"accuracy", "mae", "rmse", "r2", "age_shift", "age_shift_lt15", "age_shift_15-25",
                     "age_shift_25-50", "age_shift_50-65", "age_shift_gt65"}  # robustness.csv's names before the split


def test_generic_regression_speaks_of_a_target_not_an_age():
    task = _task(nn.Linear(1, 1), bands=[15, 25])
    assert not [name for name in task.robust_metrics() if "age" in name]
    assert set(task.robust_metrics()) == {"accuracy", "mae", "rmse", "r2", "shift", "shift_lt15", "shift_15-25",
                                          "shift_gt25"}
    assert set(task.clean_metrics()) == {"accuracy", "mae", "rmse", "r2"}  # shifts compare with the clean output
    assert set(_task(nn.Linear(1, 1)).robust_metrics()) == {"accuracy", "mae", "rmse", "r2", "shift"}  # no bands
    assert (task.outputs_logits, task.label_key, task.success_metric, task.shift_metric) == (
        False, "label", "accuracy", "shift")
    assert task.curve_metrics == ("accuracy", "mae", "shift") and task.bounded_metrics == ("accuracy",)


def test_brain_age_task_keeps_the_brain_age_names():
    task = BrainAgeTask(nn.Linear(1, 1), target_mean=50.0, target_std=10.0)
    assert set(task.robust_metrics()) == BRAIN_AGE_METRICS
    assert set(task.clean_metrics()) == {"accuracy", "mae", "rmse", "r2"}
    assert task.shift_metric == "age_shift" and task.curve_metrics == ("accuracy", "mae", "age_shift")
    with pytest.raises(ValueError, match=r"module.age_bands must be strictly increasing band edges, got \[25.0, 15"):
        BrainAgeTask(nn.Linear(1, 1), age_bands=[25, 15])
    with pytest.raises(ValueError, match=r"module.bands must be strictly increasing"):
        RegressionTask(nn.Linear(1, 1), bands=[25, 15])


@pytest.mark.parametrize("task_class, stats", [
    (RegressionTask, {"target_mean": 40.0, "target_std": 4.0}), (BrainAgeTask, {"age_mean": 40.0, "age_std": 4.0}),
])
def test_standardisation_comes_from_the_declared_datamodule_attributes(task_class, stats):
    task = task_class(nn.Linear(1, 1))
    task.bind_data(SimpleNamespace(**stats))
    assert (task.target_mean.item(), task.target_std.item()) == (40.0, 4.0)
    names = " / ".join(task.datamodule_stats)
    with pytest.raises(ValueError, match=f"gives no {names} to standardise"):
        task_class(nn.Linear(1, 1)).bind_data(SimpleNamespace(other=1.0))
