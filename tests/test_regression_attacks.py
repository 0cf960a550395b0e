"""Directional (age-shifting) attacks, group universal shifts and C&W L2 on regressors with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medrobust.attacks import (
    DEFAULT_GROUP_SIZES,
    Directional,
    ShiftObjective,
    ThreatModel,
    cw_l2_attack,
    directional_attack,
    resolve_eps,
    universal_shift,
    with_clean_prediction,
)
from medrobust.attacks.core.threat import lp_norm
from medrobust.attacks.regression.directional import CLEAN_KEY

SHAPES = [(6, 1, 4, 5), (6, 1, 3, 4, 5)]  # 2-D and 3-D
DUAL = {"linf": 1, "l2": 2}  # the largest w . delta over ||delta||_p <= eps is eps * ||w||_dual
SIGN = {"up": 1.0, "down": -1.0}


class AbsError:
    """A regression objective on a scalar output ``(B,)``: ``|pred - y|``, right within ``tau``."""

    def __init__(self, tau: float = 1.0) -> None:
        self.tau = tau

    def prediction(self, output, batch):
        return output.reshape(-1)

    def attack_loss(self, output, batch):
        return (self.prediction(output, batch) - batch["label"]).abs()

    def is_correct(self, output, batch):
        return self.correct_margin(output, batch) > 0

    def correct_margin(self, output, batch):
        return self.tau - (self.prediction(output, batch) - batch["label"]).abs()


class HybridAbsError(AbsError):
    """The output is an image embedding ``(B, E)``; the prediction adds the clean features: ``e . a + f . v``."""

    def __init__(self, a: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.a, self.v = a, v

    def prediction(self, output, batch):
        return output @ self.a + batch["features"] @ self.v


def linear(shape, out_features=1, seed=0):
    """``w . x + b`` on images of any rank, float64: ``(B,)`` (or an embedding ``(B, E)``)."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(math.prod(shape[1:]), out_features)]
    model = nn.Sequential(*layers, *([nn.Flatten(0)] if out_features == 1 else [])).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(model[1].weight.shape, generator=g, dtype=torch.float64))
    return model


def predict(model, x, objective=AbsError(), batch=None):
    with torch.no_grad():
        return objective.prediction(model(x), batch or {})


def problem(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = linear(shape, seed=seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    labels = predict(model, x) + torch.randn(shape[0], generator=g, dtype=torch.float64)  # any labels
    return model, x, {"label": labels}, model[1].weight.detach().flatten()


# ------------------------------------------------------------------------------------ directional
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("steps", [1, 10])
def test_linear_shift_is_eps_times_the_dual_norm(shape, direction, norm, steps):
    model, x, batch, w = problem(shape)
    eps = 0.05 if norm == "linf" else 0.5
    x_adv = Directional(direction, steps=steps, norm=norm)(model, x, batch, AbsError(), eps=eps, bounds=None)
    shift = predict(model, x_adv) - predict(model, x)
    expected = SIGN[direction] * eps * w.norm(p=DUAL[norm])  # whatever the labels: the prediction moves
    assert torch.allclose(shift, expected.expand_as(shift), rtol=1e-9)
    assert (lp_norm(x_adv - x, norm) <= eps * (1 + 1e-9)).all()


def test_bounds_are_respected_and_the_one_step_shift_is_the_clamped_corner():
    model, _, batch, w = problem((6, 1, 3, 4, 5))
    x = torch.rand((6, 1, 3, 4, 5), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps = 0.2
    for direction in ("up", "down"):
        x_adv = Directional(direction)(model, x, batch, AbsError(), eps=eps, bounds=(0.0, 1.0))
        assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv - x).abs().max() <= eps + 1e-12
        corner = (x + SIGN[direction] * eps * w.sign().reshape(x.shape[1:])).clamp(0, 1)
        assert torch.equal(x_adv, corner)
        moved = predict(model, x_adv) - predict(model, x)
        assert (SIGN[direction] * moved > 0).all()


def test_range_eps_is_per_sample():
    model, x, batch, w = problem((4, 1, 3, 4, 5))
    x = x * torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64).reshape(4, 1, 1, 1, 1)  # different ranges
    eps = resolve_eps(0.01, "range", x=x)
    assert eps.shape == (4,) and len(set(eps.tolist())) == 4
    x_adv = Directional("up")(model, x, batch, AbsError(), eps=eps, bounds=None)
    shift = predict(model, x_adv) - predict(model, x)
    assert torch.allclose(shift, eps * w.abs().sum(), rtol=1e-9)


@pytest.mark.parametrize("steps", [1, 5])
def test_hybrid_objective_keeps_the_features_and_shifts_only_the_image_part(steps):
    shape, embed = (5, 1, 3, 4, 5), 3
    g = torch.Generator().manual_seed(2)
    model = linear(shape, out_features=embed)
    a, v = torch.randn(embed, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    objective = HybridAbsError(a, v)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    features = torch.randn(5, 4, generator=g, dtype=torch.float64)
    batch = {"label": torch.zeros(5, dtype=torch.float64), "features": features}
    features, keys = features.clone(), list(batch)
    x_adv = Directional("down", steps=steps)(model, x, batch, objective, eps=0.03, bounds=None)
    assert torch.equal(batch["features"], features) and list(batch) == keys
    image_weight = model[1].weight.detach().T @ a  # d prediction / d x
    shift = predict(model, x_adv, objective, batch) - predict(model, x, objective, batch)
    assert torch.allclose(shift, -0.03 * image_weight.abs().sum().expand(5), rtol=1e-9)


def test_tau_stops_each_sample_at_the_first_step_past_the_target_shift():
    model, x, batch, w = problem((6, 1, 3, 4, 5))
    eps, steps = 0.1, 20
    largest = eps * w.abs().sum()
    tau = float(0.3 * largest)  # PGD steps 2.5 eps / 20 = eps / 8: crossed at the third step, 3/8 of the way
    x_adv = Directional("up", steps=steps, tau=tau)(model, x, batch, AbsError(), eps=eps, bounds=None)
    shift = predict(model, x_adv) - predict(model, x)
    assert torch.allclose(shift, 0.375 * largest.expand(6), rtol=1e-9)
    assert list(batch) == ["label"]  # the clean predictions ride in a copy of the batch


def test_cw_l2_on_a_shift_target_finds_the_minimal_perturbation():
    model, x, batch, w = problem((4, 1, 3, 4, 5))
    tau = 0.5
    shifted = with_clean_prediction(model, x, batch, AbsError())
    assert torch.equal(shifted[CLEAN_KEY], predict(model, x)) and list(batch) == ["label"]
    # lr in input units (bounds=None): Adam moves each voxel ~lr per step, so lr must be well below the minimal
    # perturbation per voxel (here ~0.008) for the norm to come out within 1 %
    _, norms = cw_l2_attack(model, x, shifted, ShiftObjective(AbsError(), "down", tau=tau), bounds=None,
                            steps=60, lr=0.002, return_norms=True)
    assert torch.allclose(norms, torch.full_like(norms, tau / w.norm()), rtol=0.01)


def test_cw_l2_regression_finds_the_minimal_perturbation():
    model, x, _, w = problem((6, 1, 3, 4, 5))
    tau = 1.0
    error = torch.tensor([0.9, -0.5, 0.2, -0.8, 0.6, -0.3], dtype=torch.float64)  # inside tau, never 0
    batch = {"label": predict(model, x) - error}
    minimal = (tau - error.abs()) / w.norm()  # |error| must grow past tau along w
    x_adv, norms = cw_l2_attack(model, x, batch, AbsError(tau), bounds=None, steps=100, lr=0.001, return_norms=True)
    assert not AbsError(tau).is_correct(predict(model, x_adv), batch).any()
    assert (norms >= minimal * (1 - 1e-6)).all()
    assert torch.allclose(norms, minimal, rtol=0.01)


# ----------------------------------------------------------------------------------- universal
def pool_and_heldout(shape, model, pool=24, heldout=12, batch_size=8):
    """Batch dicts of images inside (0, 1) by more than eps; labels are the clean predictions."""
    g = torch.Generator().manual_seed(3)
    dtype = next(model.parameters()).dtype
    images = 0.3 + 0.4 * torch.rand((pool + heldout, *shape[1:]), generator=g, dtype=dtype)
    batches = [{"image": images[i:i + batch_size], "label": predict(model, images[i:i + batch_size]),
                "id": [f"s{j}" for j in range(i, min(i + batch_size, pool + heldout))]}
               for i in range(0, pool + heldout, batch_size)]
    return batches[:pool // batch_size], batches[pool // batch_size:]


@pytest.mark.parametrize("direction", ["up", "down"])
def test_universal_shift_on_a_linear_model_is_eps_times_l1_on_held_out_images(direction):
    shape = (1, 1, 3, 4, 5)
    model = linear(shape)
    fit, held_out = pool_and_heldout(shape, model)
    rows = universal_shift(model, fit, held_out, AbsError(), eps=0.05, bounds=(0.0, 1.0), direction=direction,
                           group_sizes=(1, 5, 50), repeats=2, seed=0)
    assert [(row["group_size"], row["repeat"]) for row in rows] == [(1, 0), (1, 1), (5, 0), (5, 1), (24, 0), (24, 1)]
    expected = SIGN[direction] * 0.05 * model[1].weight.detach().abs().sum().item()
    for row in rows:
        assert row["direction"] == direction and row["eps"] == 0.05
        assert row["fit_shift"] == pytest.approx(expected, rel=1e-9)
        assert row["heldout_shift"] == pytest.approx(expected, rel=1e-9)
        assert 0 <= row["heldout_correct"] <= 1


class SmallCNN(nn.Module):
    """A 3-D regressor ``(B, 1, D, H, W) -> (B,)`` with BatchNorm and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 1), nn.Flatten(0))

    def forward(self, x):
        return self.head(self.features(x))


def test_universal_shift_on_a_cnn_moves_held_out_predictions_in_the_requested_direction():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    shape = (1, 1, 6, 6, 6)
    fit, held_out = pool_and_heldout(shape, model, pool=16, heldout=8)
    kwargs = dict(eps=0.05, eps_unit="range", bounds=(0.0, 1.0), group_sizes=(1, 16), repeats=2, seed=1, epochs=3)
    for direction in ("up", "down"):
        rows = universal_shift(model, fit, held_out, AbsError(), direction=direction, **kwargs)
        assert all(SIGN[direction] * row["heldout_shift"] > 0 for row in rows)
        assert all(SIGN[direction] * row["fit_shift"] > 0 for row in rows)
    smallest_range = min(float((b["image"].flatten(1).amax(1) - b["image"].flatten(1).amin(1)).min())
                         for b in fit + held_out)
    assert rows[0]["eps"] == pytest.approx(0.05 * smallest_range)
    assert rows[0]["fit_shift"] != rows[1]["fit_shift"]  # repeats draw different groups of one image
    again = universal_shift(model, fit, held_out, AbsError(), direction="down", **kwargs)
    assert again == rows  # deterministic from the seed


def test_default_group_sizes_are_capped_by_the_pool():
    shape = (1, 1, 2, 2, 2)
    model = linear(shape)
    fit, held_out = pool_and_heldout(shape, model, pool=40, heldout=8)
    rows = universal_shift(model, fit, held_out, AbsError(), eps=0.01, bounds=None, repeats=1, epochs=1)
    assert DEFAULT_GROUP_SIZES[0] == 1
    assert [row["group_size"] for row in rows] == [n for n in DEFAULT_GROUP_SIZES if n < 40] + [40]


# ------------------------------------------------------------------------------------ contract
def test_parameters_and_modes_untouched():
    torch.manual_seed(0)
    net = SmallCNN().train()
    net.head.eval()
    net.head[2].weight.grad = torch.ones_like(net.head[2].weight)
    modes = {name: m.training for name, m in net.named_modules()}
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    x = torch.rand(3, 1, 5, 5, 5)
    batch = {"label": torch.zeros(3)}
    Directional("up", steps=3)(net, x, batch, AbsError(), eps=0.02, bounds=(0.0, 1.0))
    universal_shift(net, [{"image": x, **batch}], [{"image": x, **batch}], AbsError(), eps=0.02, bounds=(0.0, 1.0),
                    group_sizes=(2,), repeats=1, epochs=1)
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert torch.equal(net.head[2].weight.grad, torch.ones_like(net.head[2].weight))
    assert all(p.grad is None for name, p in net.named_parameters() if name != "head.2.weight")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())


def test_names():
    assert Directional().name == "directional_up"
    assert Directional("down", steps=10).name == "directional_down_pgd10"
    assert Directional(steps=10, random_start=True, restarts=5).name == "directional_up_pgd10x5"


def test_bad_arguments_quote_the_value():
    for make, message in [
        (lambda: Directional("sideways"), "'up' or 'down'.*'sideways'"),
        (lambda: Directional(steps=0), "steps.*0"),
        (lambda: Directional(tau=-1.0), "tau.*-1.0"),
        (lambda: Directional(norm="l1"), "'l1'"),
        (lambda: ShiftObjective(AbsError(), direction=1), "'up' or 'down'.*1"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    model, x, batch, _ = problem((2, 1, 2, 2, 2))
    threat = ThreatModel("linf", 0.1, None)

    class Classifier:  # no prediction: not a regression task
        attack_loss = is_correct = AbsError.attack_loss

    with pytest.raises(TypeError, match=r"need a regression task.*prediction\(output, batch\).*Classifier"):
        directional_attack(model, x, batch, Classifier(), threat=threat)
    with pytest.raises(KeyError, match="with_clean_prediction"):
        ShiftObjective(AbsError(), tau=1.0).is_correct(model(x), batch)
    fit, held_out = [{"image": x, **batch}], [{"image": x, **batch}]
    run = lambda **kw: universal_shift(model, **{"fit_batches": fit, "heldout_batches": held_out,  # noqa: E731
                                                 "objective": AbsError(), "eps": 0.1, "bounds": None, **kw})
    for kwargs, error, message in [
        ({"group_sizes": ()}, ValueError, r"group_sizes.*\(\)"),
        ({"group_sizes": (0, 2)}, ValueError, "group size.*0"),
        ({"repeats": 0}, ValueError, "repeats.*0"),
        ({"direction": "older"}, ValueError, "'older'"),
        ({"eps_unit": "percent"}, ValueError, "'percent'"),
        ({"fit_batches": []}, ValueError, "no batch"),
        ({"heldout_batches": iter(held_out)}, ValueError, "re-iterable"),
        ({"heldout_batches": []}, ValueError, "no images"),
        ({"image_key": "t1"}, KeyError, "'t1'"),
    ]:
        with pytest.raises(error, match=message):
            run(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_batches_from_a_cpu_loader():
    shape = (1, 1, 3, 4, 5)
    model = linear(shape)
    fit, held_out = pool_and_heldout(shape, model)
    model = model.cuda()
    rows = universal_shift(model, fit, held_out, AbsError(), eps=0.05, bounds=(0.0, 1.0), group_sizes=(5,),
                           repeats=1, device="cuda")
    expected = 0.05 * model[1].weight.detach().abs().sum().item()
    assert rows[0]["heldout_shift"] == pytest.approx(expected, rel=1e-9)
    x = held_out[0]["image"].cuda()
    x_adv = Directional("down", steps=3)(model, x, {"label": held_out[0]["label"].cuda()}, AbsError(), eps=0.05,
                                         bounds=(0.0, 1.0))
    assert x_adv.is_cuda and torch.allclose(predict(model, x_adv) - predict(model, x),
                                            torch.full((x.shape[0],), -expected, device="cuda", dtype=x.dtype))


def test_directional_curve_shifts_every_sample_at_every_eps():
    """Through attack_curve (what the robustness evaluation calls), samples the task already gets wrong are
    shifted too, and each eps is attacked on its own: the shift of a linear model is exactly eps * ||w||_1."""
    from medrobust.evaluation.curve import attack_curve
    from medrobust.tasks import RegressionTask

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(27, 1))
    task = RegressionTask(net, tau=1.0, target_mean=0.0, target_std=1.0).eval()
    x = torch.randn(8, 1, 3, 3, 3)
    with torch.no_grad():
        clean = task.prediction(task(x), {})
    batch = {"image": x, "label": clean + torch.linspace(-3, 3, 8)}  # most samples already wrong
    eps_values = [0.01, 0.02, 0.04]
    points = attack_curve(Directional("up"), task, x, batch, task, eps_values=eps_values, bounds=None)
    w1 = net[1].weight.detach().abs().sum()
    for eps, x_adv in zip(eps_values, points):
        with torch.no_grad():
            shift = task.prediction(task(x_adv), batch) - clean
        assert torch.allclose(shift, eps * w1 * torch.ones(8), rtol=1e-4)
