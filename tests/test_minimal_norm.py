"""Minimum-norm attacks (FMN, DeepFool, C&W L2) against models whose exact robustness radius is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from medrobust.attacks import (
    CWL2,
    FMN,
    ClassifierObjective,
    DeepFool,
    cw_l2_attack,
    deepfool_attack,
    fmn_attack,
    minimal_perturbation,
)
from medrobust.attacks.core.threat import lp_norm
from test_attacks import CountingModel

SHAPES = [(12, 1, 4, 5), (12, 1, 3, 4, 5)]  # 2-D and 3-D
# the minimal perturbation of a linear f is |f| / ||w||_dual: Linf -> L1, L2 -> L2, L1 -> Linf
DUAL = {"linf": 1, "l2": 2, "l1": float("inf")}
WIDE = (-10.0, 10.0)  # bounds that never bind for x ~ N(0, 1) and the radii here
OBJ = ClassifierObjective()


def linear_binary(shape, seed=0):
    """Logits ``[0, w.x + b]``, labels the clean predictions, exact radius per norm."""
    g = torch.Generator().manual_seed(seed)
    d = torch.Size(shape[1:]).numel()
    w = torch.randn(d, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 2, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros_like(w), w]))
        model.bias.copy_(torch.tensor([0.0, 0.1]))
    model = nn.Sequential(nn.Flatten(), model)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        f = model(x)[:, 1]
    return model, x, (f > 0).long(), {norm: f.abs() / w.norm(p=p) for norm, p in DUAL.items()}


def linear_multiclass(shape, k=4, seed=3):
    """``K`` logits ``W x``; the radius is the nearest pairwise boundary ``(z_y - z_j) / ||w_y - w_j||_dual``."""
    g = torch.Generator().manual_seed(seed)
    d = torch.Size(shape[1:]).numel()
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, k, bias=False, dtype=torch.float64))
    with torch.no_grad():
        model[1].weight.copy_(weight)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(1)
    gaps = logits.gather(1, labels[:, None]) - logits
    radius = {}
    for norm, p in DUAL.items():
        dual = (weight[labels][:, None, :] - weight[None]).norm(p=p, dim=2)
        radius[norm] = torch.where(gaps > 0, gaps / dual.clamp_min(1e-12), torch.inf).min(1).values
    return model, x, labels, radius


def assert_radius(norms, radius, rtol, above=1.0):
    """Every sample within ``rtol`` of ``above * radius`` (and never below the true radius)."""
    ratio = norms / radius
    assert (ratio >= 1 - 1e-9).all(), ratio  # nothing beats the exact minimum
    assert ((ratio / above - 1).abs() <= rtol).all(), ratio


def wrong(model, x, labels):
    with torch.no_grad():
        return ~OBJ.is_correct(model(x), {"label": labels})


# -- exact radii ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("bounds", [None, WIDE])
def test_fmn_and_deepfool_linear_binary(shape, norm, bounds):
    model, x, labels, radius = linear_binary(shape)
    # init=None: the paper's FMN from x, no DeepFool start
    x_adv, norms = fmn_attack(model, x, {"label": labels}, OBJ, bounds=bounds, norm=norm, init=None,
                              return_norms=True)
    assert_radius(norms, radius[norm], 0.02)
    assert wrong(model, x_adv, labels).all()
    assert torch.allclose(lp_norm(x_adv - x, norm), norms)
    x_adv, norms = deepfool_attack(model, x, {"label": labels}, OBJ, bounds=bounds, norm=norm, return_norms=True)
    assert_radius(norms, radius[norm], 0.02, above=1.02)  # overshoot 0.02
    assert wrong(model, x_adv, labels).all()


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_fmn_and_deepfool_linear_multiclass(norm):
    model, x, labels, radius = linear_multiclass((16, 2, 3, 3))
    _, norms = fmn_attack(model, x, {"label": labels}, OBJ, bounds=None, norm=norm, return_norms=True)
    assert_radius(norms, radius[norm], 0.02)  # from DeepFool's start: the nearest class, not the runner-up
    x_adv, norms = deepfool_attack(model, x, {"label": labels}, OBJ, bounds=WIDE, norm=norm, return_norms=True)
    assert_radius(norms, radius[norm], 0.02, above=1.02)  # the multi-class form: one jump to the nearest class
    assert wrong(model, x_adv, labels).all()


CW = dict(binary_search_steps=9, initial_const=1.0)  # 5 rounds from c = 0.01 leave some samples 5-30 % off


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bounds", [None, (-5.0, 5.0)])
def test_cw_l2_linear_binary(shape, bounds):
    model, x, labels, radius = linear_binary(shape)
    x_adv, norms = cw_l2_attack(model, x, {"label": labels}, OBJ, bounds=bounds, return_norms=True, **CW)
    assert_radius(norms, radius["l2"], 0.05)  # measured: <= 3.1 %
    assert wrong(model, x_adv, labels).all()


class MaxOfTwo(nn.Module):
    """Logits ``[0, f]`` with ``f = max(w1.x + b1, w2.x + b2) = f2 + relu(f1 - f2)``: a two-piece ReLU model."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias  # (2, d), (2,)

    def forward(self, x):
        f = (x.flatten(1) @ self.weight.T + self.bias).amax(1)
        return torch.stack([torch.zeros_like(f), f], 1)


def max_of_two_radius(weight, bias, x, norm):
    """Exact radius: label 0 (f < 0) needs one piece > 0; label 1 needs both pieces <= 0 (an LP / a QP)."""
    out = []
    for xi in x.flatten(1):
        f = weight @ xi + bias
        if f.max() < 0:
            out.append(min(-f[k] / weight[k].norm(p=DUAL[norm]) for k in range(2)))
        elif norm == "linf":  # min t s.t. |delta_i| <= t, w_k.delta <= -f_k
            d = xi.numel()
            c = np.r_[np.zeros(d), 1.0]
            eye = np.eye(d)
            a = np.r_[np.c_[eye, -np.ones(d)], np.c_[-eye, -np.ones(d)], np.c_[weight.numpy(), np.zeros(2)]]
            b = np.r_[np.zeros(2 * d), -f.numpy()]
            out.append(linprog(c, A_ub=a, b_ub=b, bounds=(None, None)).fun)
        else:  # projection onto the intersection of two half-spaces: one face, else the edge
            cands = [-f[k].clamp(min=0) / weight[k].norm() ** 2 * weight[k] for k in range(2)]
            gram = weight @ weight.T
            cands.append(-weight.T @ torch.linalg.solve(gram, f))
            ok = [c for c in cands if (weight @ c + f <= 1e-9).all()]
            out.append(min(c.norm() for c in ok))
    return torch.tensor([float(r) for r in out], dtype=torch.float64)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fmn_piecewise_linear(norm):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(2, 12, generator=g, dtype=torch.float64)
    bias = torch.tensor([0.3, -0.2], dtype=torch.float64)
    model = MaxOfTwo(weight, bias)
    x = torch.randn((16, 1, 3, 4), generator=g, dtype=torch.float64)
    with torch.no_grad():
        pieces = x.flatten(1) @ weight.T + bias
    labels = pieces.amax(1).gt(0).long()
    radius = max_of_two_radius(weight, bias, x, norm)
    _, norms = fmn_attack(model, x, {"label": labels}, OBJ, bounds=None, norm=norm, return_norms=True)
    # label 1: both pieces must go down, a convex problem whose answer is often on the kink: FMN is exact
    one = labels == 1
    assert 4 <= one.sum() <= 12
    assert_radius(norms[one], radius[one], 0.02)
    # label 0: either piece up, a union. FMN is local: it follows the margin of the piece that is up at x,
    # to that piece's boundary, even where the other one is nearer (here 2 of 8 samples, 30-50 % farther)
    active = pieces.argmax(1)
    own = pieces.gather(1, active[:, None])[:, 0].abs() / weight[active].norm(p=DUAL[norm], dim=1)
    assert_radius(norms[~one], own[~one], 0.02)
    assert (own[~one] > 1.1 * radius[~one]).sum() == 2


class LinearRegressionTask:
    """A regression objective: correct while ``|pred - target| <= tau``; margin ``tau - |error|``."""

    def __init__(self, tau):
        self.tau = tau

    def attack_loss(self, output, batch):
        return (output[:, 0] - batch["target"]).abs()

    def is_correct(self, output, batch):
        return (output[:, 0] - batch["target"]).abs() <= self.tau

    def correct_margin(self, output, batch):
        return self.tau - (output[:, 0] - batch["target"]).abs()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_regression_objective(norm):
    g = torch.Generator().manual_seed(7)
    shape = (10, 1, 2, 3, 3)
    w = torch.randn(18, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 1, bias=False, dtype=torch.float64))
    with torch.no_grad():
        model[1].weight.copy_(w[None])
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        pred = model(x)[:, 0]
    target = pred + torch.linspace(-0.9, 0.9, 10, dtype=torch.float64)  # errors within tau = 1
    task, batch = LinearRegressionTask(tau=1.0), {"target": target}
    radius = (1.0 - (pred - target).abs()) / w.norm(p=DUAL[norm])
    for attack in (FMN(norm), DeepFool(norm)):
        radii = attack.radii(model, x, batch, task, bounds=None)
        assert_radius(radii, radius, 0.02, above=1.02 if attack.name == "deepfool" else 1.0)
    if norm == "l2":
        assert_radius(CWL2(**CW).radii(model, x, batch, task, bounds=None), radius, 0.05)


# -- the fixed-eps form, bounds, the convenience API ---------------------------------------------------
@pytest.mark.parametrize("attack", [FMN("linf"), FMN("l2"), DeepFool("linf"), DeepFool("l2"),
                                    CWL2(**CW, steps=200)])  # unbounded: lr 0.01 x 200 steps reaches radius 2.8
def test_fixed_eps_call_fools_just_above_the_radius(attack):
    model, x, labels, radius = linear_binary((10, 1, 3, 3))
    r = radius[attack.norm]
    batch = {"label": labels}
    above = attack(model, x, batch, OBJ, eps=1.06 * r, bounds=None)  # per-sample eps; C&W needs a few %
    assert wrong(model, above, labels).all()
    assert (lp_norm(above - x, attack.norm) <= 1.06 * r * (1 + 1e-9)).all()
    below = attack(model, x, batch, OBJ, eps=float(0.5 * r.min()), bounds=None)  # projected: inside the ball
    assert not wrong(model, below, labels).any()
    assert (lp_norm(below - x, attack.norm) <= 0.5 * r.min() * (1 + 1e-9)).all()


def test_minimal_perturbation_zero_when_wrong_inf_when_impossible():
    model, _, _, _ = linear_binary((8, 1, 2, 2))
    x = torch.rand(8, 1, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        f = model(x)[:, 1]
    labels = (f > 0).long()
    labels[:2] = 1 - labels[:2]  # already misclassified
    radii = minimal_perturbation(model, x, labels, norm="l2", bounds=(0.0, 1.0), steps=50)
    assert torch.equal(radii[:2], torch.zeros(2, dtype=torch.float64))
    assert (radii[2:] > 0).all()
    # a model whose boundary lies outside the box for every input: nothing to find
    far = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, dtype=torch.float64))
    with torch.no_grad():
        far[1].weight.fill_(0.1)
        far[1].bias.copy_(torch.tensor([5.0, 0.0]))
    never = minimal_perturbation(far, x, torch.zeros(8, dtype=torch.long), norm="linf", bounds=(0.0, 1.0), steps=30)
    assert torch.isinf(never).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_points_inside_tight_bounds(norm):
    model, _, _, _ = linear_binary((12, 1, 3, 3))
    x = torch.rand(12, 1, 3, 3, dtype=torch.float64) * 0.2 + 0.4
    with torch.no_grad():
        labels = (model(x)[:, 1] > 0).long()
    bounds = (0.3, 0.7)  # binds for the samples farther from the boundary
    runs = [fmn_attack(model, x, {"label": labels}, OBJ, bounds=bounds, norm=norm, steps=30, return_norms=True),
            deepfool_attack(model, x, {"label": labels}, OBJ, bounds=bounds, norm=norm, return_norms=True)]
    if norm == "l2":
        runs.append(cw_l2_attack(model, x, {"label": labels}, OBJ, bounds=bounds, steps=30, return_norms=True))
    for x_adv, norms in runs:
        assert x_adv.min() >= bounds[0] and x_adv.max() <= bounds[1]
        found = torch.isfinite(norms)
        assert torch.allclose(lp_norm(x_adv - x, norm)[found], norms[found])
        assert wrong(model, x_adv[found], labels[found]).all() and torch.equal(x_adv[~found], x[~found])


# -- the attack contract -------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3), nn.Dropout(0.2))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("attack", [FMN(steps=5), FMN("l2", steps=5), DeepFool(steps=3), CWL2(2, steps=3)],
                         ids=lambda a: f"{a.name}-{a.norm}")
def test_parameters_modes_and_bn_stats_untouched(attack):
    torch.manual_seed(0)
    net = Net().train()
    net.head.eval()  # mixed modes
    net.head[1].weight.grad = torch.ones_like(net.head[1].weight)
    modes = {name: m.training for name, m in net.named_modules()}
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    x, y = torch.rand(5, 1, 6, 6), torch.randint(0, 3, (5,))
    radii = attack.radii(net, x, {"label": y}, OBJ, bounds=(0.0, 1.0))
    x_adv = attack(net, x, {"label": y}, OBJ, eps=0.05, bounds=(0.0, 1.0))
    assert radii.shape == (5,) and (radii >= 0).all() and x_adv.shape == x.shape and not x_adv.requires_grad
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert all(p.requires_grad for p in net.parameters())
    assert torch.equal(net.head[1].weight.grad, torch.ones_like(net.head[1].weight))
    assert all(p.grad is None for name, p in net.named_parameters() if name != "head.1.weight")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())


class RecordingObjective(ClassifierObjective):
    def __init__(self):
        super().__init__()
        self.seen = []

    def correct_margin(self, output, batch):
        self.seen.append((output.dtype, torch.is_autocast_enabled("cpu")))
        return super().correct_margin(output, batch)


def test_fp32_margin_under_bf16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    for attack in (FMN(steps=3), DeepFool(steps=2), CWL2(1, steps=2)):
        objective = RecordingObjective()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x_adv = attack(model, x, {"label": y}, objective, eps=0.03, bounds=(0.0, 1.0))
        assert x_adv.dtype == torch.float32
        assert objective.seen and set(objective.seen) == {(torch.float32, False)}


def test_finished_samples_leave_the_batch():
    model, x, labels, _ = linear_binary((6, 1, 3, 3))
    labels[:2] = 1 - labels[:2]  # wrong at x
    for run in (lambda m: fmn_attack(m, x, {"label": labels}, OBJ, bounds=None, steps=4, init=None),
                lambda m: deepfool_attack(m, x, {"label": labels}, OBJ, bounds=None),
                lambda m: cw_l2_attack(m, x, {"label": labels}, OBJ, bounds=None, binary_search_steps=1, steps=3)):
        counting = CountingModel(model)
        x_adv = run(counting)
        assert torch.equal(x_adv[:2], x[:2])  # returned untouched (norm 0)
        assert counting.sizes[0] == 6 and set(counting.sizes[1:]) == {4}  # the clean check, then the survivors
    sizes = CountingModel(model)
    deepfool_attack(sizes, x, {"label": labels}, OBJ, bounds=None)
    assert sizes.sizes == [6, 4]  # DeepFool: one jump fools a linear model, then nothing is left
    sizes = CountingModel(model)
    x_adv, norms = fmn_attack(sizes, x, {"label": labels}, OBJ, bounds=None, steps=4, return_norms=True)
    # DeepFool's norms tell FMN which samples are wrong at x and which starts fool: no forward re-checks them
    assert sizes.sizes == [6, 4] + [4] * 5 and torch.equal(norms[:2], torch.zeros(2, dtype=norms.dtype))
    assert torch.equal(x_adv[:2], x[:2])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_given_starting_points_are_shrunk_to_the_boundary(norm):
    """A fooling start 3x past the boundary along the best direction: the line search brings it back to the
    radius (a linear margin: its first chord lands there), before any FMN step could."""
    model, x, labels, radius = linear_binary((12, 1, 3, 4))
    w = model[1].weight[1].detach().reshape(x.shape[1:])
    with torch.no_grad():
        f = model(x)[:, 1]
    toward = -torch.sign(f)[:, None, None, None] * (w.sign() if norm == "linf" else w / w.norm())
    start = x + 3 * radius[norm][:, None, None, None] * toward
    counting = CountingModel(model)
    x_adv, norms = fmn_attack(counting, x, {"label": labels}, OBJ, bounds=None, norm=norm, steps=1, init=start,
                              alpha_init=1e-6, return_norms=True)
    assert_radius(norms, radius[norm], 0.005)
    assert wrong(model, x_adv, labels).all()
    assert len(counting.sizes) == 1 + 2 + 4 + 2  # which starts fool, the segment's ends, the search, FMN's step


def test_bad_arguments_quote_the_value():
    cases = [
        (lambda: FMN(norm="l0"), "'l0'"),
        (lambda: FMN(steps=0), "steps.*0"),
        (lambda: FMN(gamma_init=1.5), "gamma_init.*1.5"),
        (lambda: DeepFool(overshoot=-0.1), "overshoot.*-0.1"),
        (lambda: DeepFool(num_classes=1), "num_classes.*1"),
        (lambda: CWL2(lr=0), "lr.*0"),
        (lambda: CWL2(kappa=-1), "kappa.*-1"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    model, x, labels, _ = linear_binary((2, 1, 2, 2))

    class NoMargin:
        attack_loss, is_correct = OBJ.attack_loss, OBJ.is_correct

    with pytest.raises(TypeError, match="correct_margin.*NoMargin"):
        fmn_attack(model, x, {"label": labels}, NoMargin(), bounds=None)
    assert (FMN().name, FMN().norm, DeepFool().name, DeepFool().norm, CWL2().name, CWL2().norm) == \
        ("fmn", "linf", "deepfool", "l2", "cw-l2", "l2")
