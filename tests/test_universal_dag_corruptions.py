"""Universal perturbations, DAG and corruptions against toy models with a known answer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from medrobust.attacks import (
    CORRUPTIONS,
    DAG,
    ClassifierObjective,
    ThreatModel,
    UniversalPerturbation,
    apply_universal,
    dag_attack,
    fit_universal_perturbation,
)
from medrobust.evaluation.corruptions import bias_field
from medrobust.attacks.core.threat import lp_norm

SHAPES = [(6, 2, 10, 12), (4, 1, 6, 7, 8)]  # 2-D and 3-D


# ------------------------------------------------------------------------------------ universal
class Overestimate:
    """The signed error ``f(x) - y`` (an attacker inflating e.g. a predicted brain age); right within 1."""

    def attack_loss(self, output, batch):
        return output - batch["label"]

    def is_correct(self, output, batch):
        return self.correct_margin(output, batch) > 0

    def correct_margin(self, output, batch):
        return 1 - (output - batch["label"]).abs()


def regression_problem(shape, seed=0):
    """A linear regressor ``w . x + b`` ``(B,)`` on images of any rank; fit and held-out images."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape[1:]), 1), nn.Flatten(0)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(model[1].weight.shape, generator=g, dtype=torch.float64))
    fit = 0.3 + 0.4 * torch.rand((32, *shape[1:]), generator=g, dtype=torch.float64)  # inside (0, 1) by > eps
    held_out = 0.3 + 0.4 * torch.rand((16, *shape[1:]), generator=g, dtype=torch.float64)
    return model, fit, held_out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_universal_regressor_finds_the_optimal_delta_and_transfers(shape, norm):
    model, fit, held_out = regression_problem(shape)
    w = model[1].weight.detach().reshape(1, *shape[1:])
    eps = 0.1 if norm == "linf" else 0.5
    # a DataLoader over dicts, minibatches of 8, labels = the clean predictions
    with torch.no_grad():
        data = [{"image": image, "label": model(image[None])[0]} for image in fit]
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    delta = fit_universal_perturbation(model, loader, Overestimate(), norm=norm, eps=eps, bounds=(0.0, 1.0))
    optimum = eps * (w.sign() if norm == "linf" else w / w.norm())  # the dual-norm maximizer of w . delta
    assert delta.shape == (1, *shape[1:]) and not delta.requires_grad
    assert torch.allclose(delta, optimum, atol=1e-3 * eps)
    assert lp_norm(delta, norm).item() <= eps * (1 + 1e-9)
    x_adv = apply_universal(held_out, delta, bounds=(0.0, 1.0))  # images the fit never saw
    with torch.no_grad():
        shift = model(x_adv) - model(held_out)
    dual = w.abs().sum() if norm == "linf" else w.norm()
    assert torch.allclose(shift, eps * dual.expand_as(shift), rtol=1e-3)


def test_universal_classifier_beats_random_signs_on_held_out_images():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(3, 20, generator=g))
    fit, held_out = torch.randn(64, 1, 4, 5, generator=g), torch.randn(64, 1, 4, 5, generator=g)
    with torch.no_grad():
        y_fit, y_held = model(fit).argmax(1), model(held_out).argmax(1)
    batches = [{"image": fit[i:i + 16], "label": y_fit[i:i + 16]} for i in range(0, 64, 16)]
    eps, objective = 0.3, ClassifierObjective()
    delta = fit_universal_perturbation(model, batches, objective, eps=eps, bounds=None, epochs=5)
    random_signs = eps * torch.randn(1, 1, 4, 5, generator=g).sign()
    with torch.no_grad():
        loss = {name: objective.attack_loss(model(held_out + d), {"label": y_held}).mean()
                for name, d in (("universal", delta), ("random", random_signs))}
        accuracy = (model(held_out + delta).argmax(1) == y_held).float().mean()
    assert loss["universal"] > 2 * loss["random"]
    assert accuracy < 0.75


@pytest.mark.parametrize("shape", SHAPES)
def test_universal_attack_class_shares_one_delta_within_eps_and_bounds(shape):
    model, fit, _ = regression_problem(shape)
    x = torch.rand(fit.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # touches bounds
    with torch.no_grad():
        batch = {"label": model(x)}
    attack = UniversalPerturbation(epochs=3, batch_size=8)
    assert (attack.name, attack.norm) == ("universal", "linf")
    x_adv = attack(model, x, batch, Overestimate(), eps=0.05, bounds=(0.0, 1.0))
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= 0.05 + 1e-12
    inside = ((x + 0.05 < 1) & (x - 0.05 > 0)).all(0)  # pixels no image clamps: the same shift for all
    diff = (x_adv - x)[:, inside]
    assert torch.allclose(diff, diff[:1].expand_as(diff))
    with torch.no_grad():
        assert (model(x_adv) > model(x)).all()
    assert torch.equal(attack(model, x, batch, Overestimate(), eps=0.0, bounds=(0.0, 1.0)), x)


def test_universal_errors_name_the_shapes_and_values():
    model, fit, _ = regression_problem((4, 1, 4, 5))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 4, 6\).*\(16, 1, 4, 5\).*\(1, 1, 4, 5\)"):
        apply_universal(fit[:16], torch.zeros(1, 1, 4, 6, dtype=torch.float64), bounds=None)
    mixed = [{"image": fit[:4], "label": torch.zeros(4)}, {"image": fit[:4, :, :3], "label": torch.zeros(4)}]
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 5\).*\(4, 1, 3, 5\)"):
        fit_universal_perturbation(model, mixed, Overestimate(), eps=0.1, bounds=None, epochs=1)
    one_shot = iter([{"image": fit[:4], "label": torch.zeros(4)}])
    with pytest.raises(ValueError, match="re-iterable.*epochs=2"):
        fit_universal_perturbation(model, one_shot, Overestimate(), eps=0.1, bounds=None, epochs=2)
    with pytest.raises(ValueError, match="epochs.*0"):
        UniversalPerturbation(epochs=0)
    with pytest.raises(ValueError, match="'l1'"):
        fit_universal_perturbation(model, [], Overestimate(), norm="l1", eps=0.1, bounds=None)


# ------------------------------------------------------------------------------------------ DAG
def pixel_problem(spatial_dims, seed=0):
    """A per-pixel linear classifier (1x1 conv, 2 channels -> 3 classes); labels = the clean predictions."""
    g = torch.Generator().manual_seed(seed)
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(2, 3, 1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        conv.bias.zero_()
    spatial = (12, 13) if spatial_dims == 2 else (5, 6, 7)
    x = torch.rand((4, 2, *spatial), generator=g, dtype=torch.float64)
    with torch.no_grad():
        labels = conv(x).argmax(1)
    return conv, x, labels


def slack(model, x, labels, eps, bounds):
    """Per pixel and class, the best change of ``z_t - z_y`` within the Linf box (and bounds) plus its clean
    value ``(B, K, *spatial)``: > 0 exactly where the pixel can be flipped to ``t``, each pixel on its own."""
    w = model.weight.flatten(1)  # (K, C)
    v = w.reshape(1, *w.shape, *(1,) * (x.ndim - 2)) - w[labels].movedim(-1, 1).unsqueeze(1)  # (B, K, C, ...)
    low, high = (-math.inf, math.inf) if bounds is None else bounds
    lo, hi = (low - x).clamp(min=-eps).unsqueeze(1), (high - x).clamp(max=eps).unsqueeze(1)  # (B, 1, C, ...)
    with torch.no_grad():
        logits = model(x)
    gain = torch.maximum(v * lo, v * hi).sum(2)
    return logits - logits.gather(1, labels.unsqueeze(1)) + gain


def pixel_accuracy(model, x, labels):
    with torch.no_grad():
        return (model(x).argmax(1) == labels).double().mean().item()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("bounds", [None, (0.0, 1.0)])
@pytest.mark.parametrize("target", ["best", "nearest"])
def test_dag_breaks_exactly_the_pixels_within_reach(spatial_dims, bounds, target):
    model, x, labels = pixel_problem(spatial_dims)
    eps = 0.2
    room = slack(model, x, labels, eps, bounds).scatter(1, labels.unsqueeze(1), -math.inf)  # (B, K, *spatial)
    reachable = room.amax(1) > 0  # towards some wrong class
    if target == "best":
        room, target = room.max(1)  # the class each pixel can most easily be flipped to
    else:
        with torch.no_grad():
            room = room.gather(1, model(x).scatter(1, labels.unsqueeze(1), -math.inf).argmax(1, keepdim=True))[:, 0]
    x_adv = dag_attack(model, x, {"label": labels}, threat=ThreatModel("linf", eps, bounds), target=target)
    assert (x_adv - x).abs().max() <= eps * (1 + 1e-9)
    assert bounds is None or (x_adv.min() >= bounds[0] and x_adv.max() <= bounds[1])
    with torch.no_grad():
        broken = model(x_adv).argmax(1) != labels
    assert broken[room > 0.02].all()  # everything within reach falls...
    assert not broken[~reachable].any()  # ...and nothing beyond reach can
    assert 0.2 < broken.double().mean() < 0.9


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_dag_class_stays_in_ball_and_bounds_and_drops_accuracy(spatial_dims, norm):
    model, x, labels = pixel_problem(spatial_dims)
    eps = 0.3 if norm == "linf" else 4.0
    for target in (None, "next", "nearest"):
        attack = DAG(norm=norm, steps=20, target=target, seed=0)
        assert (attack.name, attack.norm) == ("dag", norm)
        x_adv = attack(model, x, {"label": labels[:, None]}, None, eps=eps, bounds=(0.0, 1.0))
        assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
        assert (lp_norm(x_adv - x, norm) <= eps * (1 + 1e-9)).all()
        assert pixel_accuracy(model, x_adv, labels) < 0.7


class PixelAccuracyObjective:
    """Correct while at least ``tau`` of the pixels are right (a stand-in for Dice >= tau)."""

    tau = 0.8

    def attack_loss(self, output, batch):
        return -output.mean(dim=tuple(range(1, output.ndim)))

    def is_correct(self, output, batch):
        return (output.argmax(1) == batch["label"]).flatten(1).double().mean(1) >= self.tau


def test_dag_stops_each_sample_on_the_objective():
    model, x, labels = pixel_problem(2)
    eps = torch.tensor([0.5, 0.01, 0.5, 0.01], dtype=torch.float64)  # per sample: two can fall, two cannot
    batch, threat = {"label": labels}, ThreatModel("linf", eps, (0.0, 1.0))
    sizes = []  # the batch size of every forward: the clean one, then the steps, shrinking as samples fall
    hook = model.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    result = dag_attack(model, x, batch, PixelAccuracyObjective(), threat=threat, target="nearest",
                        return_result=True)
    hook.remove()
    assert sizes[:2] == [4, 4] and sizes[-1] == 2 and len(sizes) == 52
    with torch.no_grad():
        fooled = ~PixelAccuracyObjective().is_correct(model(result.x_adv), batch)
    assert fooled.tolist() == result.success.tolist() == [True, False, True, False]
    assert ((1 - result.loss[fooled]) < 0.8).all()  # loss is the pixel error rate
    full = dag_attack(model, x, batch, PixelAccuracyObjective(), threat=threat, target="nearest",
                      early_stop=False)
    assert pixel_accuracy(model, full, labels) < pixel_accuracy(model, result.x_adv, labels)


def test_dag_errors_and_eps_zero():
    model, x, labels = pixel_problem(2)
    threat = ThreatModel("linf", 0.1, None)
    for call, message in [(lambda: dag_attack(lambda z: model(z).mean((2, 3)), x, {"label": labels}, threat=threat),
                           r"logits.*\(4, 3\)"),
                          (lambda: dag_attack(model, x, {"label": labels[:, 0]}, threat=threat),
                           r"labels of shape \(4, 13\)"),
                          (lambda: DAG(target="far"), "'far'"), (lambda: DAG(gamma=-1), "gamma.*-1")]:
        with pytest.raises(ValueError, match=message):
            call()
    assert torch.equal(dag_attack(model, x, {"label": labels}, threat=ThreatModel("linf", 0.0, None)), x)


@pytest.mark.parametrize("attack", [DAG(steps=3), UniversalPerturbation(epochs=2)])
def test_parameters_modes_and_bn_stats_untouched(attack):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                        nn.Conv2d(4, 2, 1)).train()
    modes = {name: m.training for name, m in net.named_modules()}
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    x, y = torch.rand(3, 1, 8, 8), torch.randint(0, 2, (3, 8, 8))
    objective = PixelAccuracyObjective()
    objective.attack_loss = lambda output, batch: nn.functional.cross_entropy(output, batch["label"],
                                                                            reduction="none").mean((1, 2))
    attack(net, x, {"label": y}, objective, eps=0.05, bounds=(0.0, 1.0))
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())


# ---------------------------------------------------------------------------------- corruptions
def corrupt(name, x, eps, bounds=(0.0, 1.0), **kwargs):
    return CORRUPTIONS[name](**kwargs)(None, x, {}, None, eps=eps, bounds=bounds)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_contract(name, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    assert CORRUPTIONS[name]().name == name and CORRUPTIONS[name]().norm == "none"
    eps = 1.5 if name == "blur" else 0.2
    out = corrupt(name, x, eps)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, corrupt(name, x, eps))  # deterministic for a seed
    if name != "blur":
        assert not torch.equal(out, corrupt(name, x, eps, seed=1))
    assert torch.equal(corrupt(name, x, 0.0), x)  # severity 0 is the identity
    per_sample = torch.tensor([eps, 0.0] * (shape[0] // 2))
    mixed = corrupt(name, x, per_sample)
    assert torch.equal(mixed[1::2], x[1::2]) and not torch.equal(mixed[0::2], x[0::2])
    with torch.inference_mode():
        assert not corrupt(name, x.clone(), eps).is_inference()  # usable by autograd afterwards


@pytest.mark.parametrize("shape", [(2, 1, 96, 96), (2, 1, 20, 22, 24)])
def test_noise_std_matches_eps(shape):
    x = torch.full(shape, 0.5, dtype=torch.float64)
    for eps in (0.01, 0.05):
        for name in ("gaussian_noise", "rician_noise"):  # at high SNR Rician noise is ~ Gaussian
            noise = corrupt(name, x, eps) - x  # bounds (0, 1): magnitude 0 at 0, no clamping at 0.5 +- 5 sigma
            assert abs(noise.std().item() / eps - 1) < 0.03
            assert abs(noise.mean().item()) < 0.03 * eps + (eps ** 2 if name == "rician_noise" else 0)
    background = corrupt("rician_noise", torch.zeros(shape), 0.05)  # magnitude 0: Rayleigh, biased upwards
    assert abs(background.mean().item() / (0.05 * math.sqrt(math.pi / 2)) - 1) < 0.03
    assert abs(background.std().item() / (0.05 * math.sqrt(2 - math.pi / 2)) - 1) < 0.03


def high_frequency_energy(x):
    """Energy of the second differences along every spatial axis."""
    return sum(x.diff(dim=d).diff(dim=d).pow(2).sum().item() for d in range(2, x.ndim))


@pytest.mark.parametrize("shape", SHAPES)
def test_blur_reduces_high_frequencies_monotonically(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    energy = [high_frequency_energy(corrupt("blur", x, sigma)) for sigma in (0.0, 0.5, 1.0, 2.0, 3.0)]
    assert all(a > b for a, b in zip(energy, energy[1:]))
    assert energy[-1] < 0.05 * energy[0]
    flat = torch.full(shape, 0.3, dtype=torch.float64)
    assert torch.allclose(corrupt("blur", flat, 4.0), flat)  # replicate padding: borders keep their level


@pytest.mark.parametrize("shape", SHAPES)
def test_bias_field_is_multiplicative_and_smooth(shape):
    x = 0.2 + 0.5 * torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_field = (bias_field(x, 0.05) / x).log()
    assert log_field.std() > 0.01
    assert torch.allclose(log_field, log_field[:, :1].expand_as(log_field))  # one field per image
    assert torch.allclose((bias_field(x, 0.1) / x).log(), 2 * log_field)  # log(field) linear in severity
    assert not torch.allclose(log_field[0], log_field[1])  # a fresh field per image
    # smooth: log(field) is a polynomial of degree <= 3 along each axis (coordinates scaled to [-1, 1])
    axes = torch.meshgrid(*(torch.linspace(-1, 1, n, dtype=torch.float64) for n in shape[2:]), indexing="ij")
    powers = list(itertools.product(range(4), repeat=len(axes)))
    basis = torch.stack([math.prod(a ** k for a, k in zip(axes, p)).flatten() for p in powers], dim=1)
    targets = log_field[:, 0].flatten(1).T  # (pixels, B)
    residual = targets - basis @ torch.linalg.lstsq(basis, targets).solution
    assert residual.abs().max() < 1e-6 * log_field.abs().max()
    out = corrupt("bias_field", x, 0.05, bounds=(0.0, 1.0))
    assert torch.allclose(out, (x * log_field.exp()).clamp(0, 1))


def test_dag_with_structure_or_given_targets_is_declared_targeted():
    """Structure targets push named structures only, so their accuracy stays out of the masking checks' order."""
    assert DAG(target="swap:3,4").targeted and DAG(target="dilate:1,2").targeted
    assert DAG(target=torch.zeros(1, 4, 4, dtype=torch.long)).targeted
    assert not DAG().targeted and not DAG(target="random").targeted and not DAG(target="next").targeted
