"""APGD / APGD-T and Square against models with a known answer, plus the attack contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medrobust.attacks import PGD, ClassifierObjective, ThreatModel
from medrobust.attacks.core.session import loss_and_grad
from medrobust.attacks.gradient.apgd import APGD, apgd_attack
from medrobust.losses.classification import LossFallbackWarning, classification_margin, dlr_loss, margin_loss
from medrobust.losses.classification import targeted_dlr_loss
from medrobust.attacks.core.objectives import with_loss
from medrobust.attacks.black_box.square import Square, p_selection, random_windows
from medrobust.attacks.core.threat import lp_norm
from test_attacks import CountingModel

SHAPES = [(16, 1, 4, 5), (16, 1, 3, 4, 5)]  # 2-D and 3-D
DUAL = {"linf": 1, "l2": 2}  # a linear model's minimal Linf perturbation is gap / ||w_y - w_j||_1; L2: / ||.||_2
OBJ = ClassifierObjective()


class Linear(nn.Module):
    """Logits ``W x + b`` ``(B, K)`` for images of any rank."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def linear_problem(weight, bias, x):
    """Model, labels (the clean predictions) and the exact minimal radius per norm: the nearest boundary."""
    model = Linear(weight, bias)
    logits = model(x).detach()
    labels = logits.argmax(1)
    gaps = logits.gather(1, labels[:, None]) - logits  # (B, K), 0 at the label
    radius = {}
    for norm, p in DUAL.items():
        dual = (weight[labels][:, None, :] - weight[None]).norm(p=p, dim=2)
        radius[norm] = torch.where(gaps > 0, gaps / dual.clamp_min(1e-12), torch.inf).min(1).values
    return model, labels, radius


def problem(shape, classes="binary", seed=0):
    """``x`` and a float64 linear problem: ``binary``, logits ``[0, w.x + 0.1]``; ``"five"``, classes 0 / 1
    compete and 2-4 are distractors far below that still set DLR's denominator; an int: random classes."""
    g = torch.Generator().manual_seed(seed)
    d, f64 = torch.Size(shape[1:]).numel(), torch.float64
    k = {"binary": 2, "five": 5}.get(classes, classes)
    weight, bias = torch.randn(k, d, generator=g, dtype=f64), torch.zeros(k, dtype=f64)
    if classes == "binary":
        weight[0], bias[1] = 0.0, 0.1
    elif classes == "five":
        weight[2:] *= 0.5
        bias = torch.tensor([0.0, 0.1, -1.0, -1.5, -2.0], dtype=f64) * 4 * d ** 0.5
    x = torch.randn(shape, generator=g, dtype=f64)
    return (x, *linear_problem(weight, bias, x))


def fooled(model, x_adv, labels):
    with torch.no_grad():
        return ~OBJ.is_correct(model(x_adv), {"label": labels})


def check_exact(model, x, labels, radius, norm, **kwargs):
    """Every sample broken at 1.05x the minimal radius, inside the ball; none at 0.95x."""
    above = apgd_attack(model, x, {"label": labels}, OBJ, threat=ThreatModel(norm, 1.05 * radius, None), **kwargs)
    assert fooled(model, above, labels).all()
    assert (lp_norm(above - x, norm) <= 1.05 * radius * (1 + 1e-9)).all()
    below = apgd_attack(model, x, {"label": labels}, OBJ, threat=ThreatModel(norm, 0.95 * radius, None), **kwargs)
    assert not fooled(model, below, labels).any()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_apgd_binary_known_radius(shape, norm, loss):
    x, model, labels, radius = problem(shape)
    check_exact(model, x, labels, radius[norm], norm, loss=loss, seed=0)
    single = lambda z: model(z)[:, 1:]  # noqa: E731  one logit (B, 1) against labels in {0, 1}
    above = apgd_attack(single, x, {"label": labels}, OBJ, threat=ThreatModel(norm, 1.05 * radius[norm], None),
                        loss=loss, steps=50, seed=0)
    assert fooled(model, above, labels).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr", "margin"])
def test_apgd_multiclass_known_radius(shape, norm, loss):
    x, model, labels, radius = problem(shape, "five")
    assert set(labels.tolist()) == {0, 1}  # the distractors never win, but they are in the DLR denominator
    check_exact(model, x, labels, radius[norm], norm, loss=loss, seed=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_targeted_finds_the_nearest_class(shape, norm):
    # six random classes: the class an untargeted loss heads for (the smallest logit gap) need not be the
    # nearest one, and untargeted attacks can stall at that class's corner; APGD-T tries the top classes in turn
    x, model, labels, radius = problem(shape, 6, seed=2)
    check_exact(model, x, labels, radius[norm], norm, targeted=True, n_target_classes=5, seed=0)


def small_cnn(x):
    """A random conv net over ``x`` ``(B, 1, *spatial)`` (2-D or 3-D) whose 4 classes are balanced on ``x``."""
    conv = nn.Conv2d if x.ndim == 4 else nn.Conv3d
    net = nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * x[0].numel(), 16),
                        nn.ReLU(), nn.Linear(16, 4)).double()
    with torch.no_grad():
        net[-1].bias -= net(x).mean(0)
    return net


@pytest.mark.parametrize("shape,norm,eps", [((32, 1, 8, 8), "linf", 0.01), ((32, 1, 4, 4, 4), "l2", 0.1)])
def test_apgd_at_least_as_strong_as_pgd10(shape, norm, eps):
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64)
    model = small_cnn(x)
    labels = model(x).argmax(1).detach()
    batch, bounds = {"label": labels}, (0.0, 1.0)
    runs = {
        "pgd10": PGD(norm, steps=10)(model, x, batch, OBJ, eps=eps, bounds=bounds),
        "apgd-ce": APGD(norm, seed=0)(model, x, batch, OBJ, eps=eps, bounds=bounds),
        "apgd-t": APGD(norm, targeted=True, n_target_classes=3, seed=0)(model, x, batch, OBJ, eps=eps, bounds=bounds),
    }
    robust = {name: (~fooled(model, x_adv, labels)).float().mean().item() for name, x_adv in runs.items()}
    assert 0.1 < robust["pgd10"] < 0.9, robust  # a non-trivial eps
    assert robust["apgd-ce"] <= robust["pgd10"] and robust["apgd-t"] <= robust["pgd10"], robust


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("bounds", [(-1.0, 3.0), None])
def test_bounds_and_ball_respected(shape, norm, bounds):
    torch.manual_seed(0)
    _, model, _, _ = problem(shape, "five")
    x = torch.rand(shape, dtype=torch.float64) * 4 - 1
    labels = model(x).argmax(1).detach()
    eps = (0.7 if norm == "linf" else 3.0) * torch.linspace(0.5, 1.0, shape[0], dtype=torch.float64)
    attacks = [APGD(norm, steps=10), APGD(norm, steps=10, loss="dlr", restarts=2),
               APGD(norm, steps=10, early_stop=False), APGD(norm, steps=10, targeted=True, n_target_classes=2)]
    attacks += [Square(queries=30), Square(queries=30, early_stop=False)] if norm == "linf" else []
    for attack in attacks:
        x_adv = attack(model, x, {"label": labels}, OBJ, eps=eps, bounds=bounds)
        assert x_adv.dtype == x.dtype and x_adv.shape == x.shape and not x_adv.requires_grad
        assert (lp_norm(x_adv - x, norm) <= eps * (1 + 1e-9)).all(), attack
        assert (x_adv - x).abs().amax() > 0
        if bounds is not None:
            assert x_adv.min() >= bounds[0] and x_adv.max() <= bounds[1]


def test_losses_match_their_definitions():
    z = torch.tensor([[3.0, 1.0, 2.0, -1.0, 0.5], [0.0, 4.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    y, t = torch.tensor([0, 2]), torch.tensor([2, 1])
    assert torch.allclose(margin_loss(z, y), torch.tensor([-1.0, 3.0], dtype=torch.float64))
    assert torch.allclose(dlr_loss(z, y), torch.tensor([-1 / (3 - 1), 3 / (4 - 2)], dtype=torch.float64))
    assert torch.allclose(dlr_loss(2.5 * z + 7, y), dlr_loss(z, y))  # shift and scale invariant
    expected = torch.tensor([-(3 - 2) / (3 - (1 + 0.5) / 2), -(1 - 4) / (4 - (2 + 1) / 2)], dtype=torch.float64)
    assert torch.allclose(targeted_dlr_loss(z, y, t), expected)
    wrapped = with_loss(OBJ, lambda out, b: margin_loss(out, b["label"]))
    batch = {"label": y}
    assert torch.equal(wrapped.attack_loss(z, batch), margin_loss(z, y))
    assert torch.equal(wrapped.is_correct(z, batch), OBJ.is_correct(z, batch))
    assert torch.equal(wrapped.correct_margin(z, batch), classification_margin(z, y))


def test_dlr_with_few_classes_falls_back_to_the_margin():
    x, model, labels, radius = problem((8, 1, 3, 3))
    eps = 1.05 * radius["linf"]
    with pytest.warns(LossFallbackWarning, match="DLR needs >= 3"):
        x_adv = APGD(loss="dlr", steps=30)(model, x, {"label": labels}, OBJ, eps=eps, bounds=None)
    assert fooled(model, x_adv, labels).all()
    single = lambda z: model(z)[:, 1]  # noqa: E731  one logit (B,)
    with pytest.warns(LossFallbackWarning):
        x_adv = APGD(loss="dlr", steps=30)(single, x, {"label": labels}, OBJ, eps=eps, bounds=None)
    assert fooled(model, x_adv, labels).all()
    with pytest.warns(LossFallbackWarning):
        assert torch.equal(dlr_loss(model(x), labels), margin_loss(model(x), labels))
    x3, model3, labels3, radius3 = problem((8, 1, 3, 3), 3)
    with pytest.warns(LossFallbackWarning, match="APGD-T needs >= 4"):
        APGD(targeted=True, steps=10)(model3, x3, {"label": labels3}, OBJ, eps=radius3["linf"], bounds=None)
    with pytest.raises(ValueError, match="K >= 4.*K=3"):
        targeted_dlr_loss(model3(x3), labels3, labels3)


@pytest.mark.parametrize("attack", [APGD(steps=3), APGD(steps=3, targeted=True, n_target_classes=2, early_stop=False),
                                    Square(queries=5)])
def test_parameters_modes_and_bn_stats_untouched(attack):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 5), nn.Dropout(0.2)).train()
    net[5:].eval()  # mixed modes
    net[5].weight.grad = torch.ones_like(net[5].weight)
    modes = {name: m.training for name, m in net.named_modules()}
    flags = {name: p.requires_grad for name, p in net.named_parameters()}
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 5, (6,))
    x_adv = attack(net, x, {"label": y}, ClassifierObjective(), eps=0.05, bounds=(0.0, 1.0))
    assert x_adv.shape == x.shape
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert {name: p.requires_grad for name, p in net.named_parameters()} == flags
    assert torch.equal(net[5].weight.grad, torch.ones_like(net[5].weight))
    assert all(p.grad is None for name, p in net.named_parameters() if name != "5.weight")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())


@pytest.mark.parametrize("attack", [APGD(steps=20), APGD("l2", steps=20), Square(queries=200)])
def test_early_stopping_shrinks_the_forwarded_batch(attack):
    x, model, labels, radius = problem((12, 1, 4, 5))
    eps = radius[attack.norm] * torch.where(torch.arange(12) % 2 == 0, 1.5, 0.9).double()  # per-sample eps
    labels[0] = 1 - labels[0]  # wrong at the clean point: needs no attack
    counting = CountingModel(model)
    x_adv = attack(counting, x, {"label": labels}, OBJ, eps=eps, bounds=None)
    assert torch.equal(fooled(model, x_adv, labels), torch.arange(12) % 2 == 0)
    assert torch.equal(x_adv[0], x[0])  # returned untouched
    sizes = counting.sizes
    assert sizes[:2] == [12, 11] and sizes[-1] == 6  # clean check, minus sample 0, ..., the 6 survivors
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))


def test_no_early_stop_runs_every_sample_every_step_and_returns_the_max_loss_point():
    x, model, labels, radius = problem((12, 1, 4, 5))
    counting = CountingModel(model)
    result = apgd_attack(counting, x, {"label": labels}, OBJ, threat=ThreatModel("linf", 2 * radius["linf"], None),
                         steps=20, restarts=2, early_stop=False, return_result=True)
    assert counting.sizes == [12] * 43  # clean forward, then per restart: start point and 20 steps
    assert torch.allclose(result.loss, OBJ.attack_loss(model(result.x_adv), {"label": labels}).detach())
    assert result.success.all()


class Quantized(Linear):
    """``x -> round(8 x) / 8`` before a linear classifier: the input gradient is zero everywhere."""

    def forward(self, x):
        return super().forward(torch.round(x * 8) / 8)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 4, 4, 4)])
def test_square_breaks_gradient_masking_that_stops_pgd_and_apgd(shape):
    # f = s.x + b with s = +-1: a sample k grid steps (of 1/8) from the boundary has Linf radius k / (8 * 64);
    # k in [41, 61] puts it in [0.08, 0.12], far beyond what a random start reaches (~4 sigma) but well inside
    # eps = 0.25, which moves every pixel exactly two grid steps
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    d = torch.Size(shape).numel()
    s = torch.randint(0, 2, (d,), generator=g).double() * 2 - 1
    steps = torch.randint(41, 62, (16,), generator=g)
    side = torch.randint(0, 2, (16,), generator=g) * 2 - 1
    moved = torch.rand(16, d, generator=g).argsort(1) < steps[:, None]  # which pixels sit one step off 0.5
    x = (0.5 + moved * side[:, None] * s / 8).reshape((16,) + shape)
    weight = torch.stack([torch.zeros_like(s), s])
    bias = torch.tensor([0.0, -0.5 * float(s.sum())], dtype=torch.float64)
    _, labels, radius = linear_problem(weight, bias, x)
    assert torch.allclose(radius["linf"], steps.double() / (8 * d)) and torch.equal(labels, (side > 0).long())
    model = Quantized(weight, bias)
    batch, eps, bounds = {"label": labels}, 0.25, (0.0, 1.0)  # eps > 2x the radius of the linear model
    assert loss_and_grad(model, OBJ, x, batch)[1].abs().max() == 0
    robust = {}
    for attack in (PGD(steps=20), APGD(steps=50, seed=0), Square(queries=300)):
        x_adv = attack(model, x, batch, OBJ, eps=eps, bounds=bounds)
        assert (x_adv - x).abs().max() <= eps + 1e-12
        robust[attack.name] = (~fooled(model, x_adv, labels)).float().mean().item()
    assert robust["pgd20"] >= 0.8 and robust["apgd-ce"] >= 0.8 and robust["square"] == 0.0, robust


class Regression:
    """``pred (B, 1)`` against ``batch["target"] (B,)``: squared error, correct within 0.5."""

    def attack_loss(self, output, batch):
        return (output.reshape(-1) - batch["target"]) ** 2

    def is_correct(self, output, batch):
        return self.correct_margin(output, batch) > 0

    def correct_margin(self, output, batch):
        return 0.5 - (output.reshape(-1) - batch["target"]).abs()


@pytest.mark.parametrize("shape", SHAPES)
def test_regression_objective(shape):
    torch.manual_seed(0)
    d = torch.Size(shape[1:]).numel()
    model = Linear(torch.randn(1, d, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    x = torch.rand(shape, dtype=torch.float64)
    target = model(x).detach().reshape(-1) + 0.2 * torch.randn(shape[0], dtype=torch.float64)
    target[0] += 1.0  # wrong at x
    batch, objective, eps = {"target": target}, Regression(), 0.02
    clean = objective.attack_loss(model(x), batch).detach()
    reach = eps * model.weight.abs().sum() - objective.correct_margin(model(x), batch).detach()  # > 0: breakable
    attacks = [APGD(loss="default", steps=20), APGD(loss="margin", steps=20),
               APGD(loss="default", steps=20, early_stop=False), Square(queries=200)]
    right = objective.is_correct(model(x), batch)
    for attack in attacks:
        x_adv = attack(model, x, batch, objective, eps=eps, bounds=(0.0, 1.0))
        assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv - x).abs().max() <= eps + 1e-12
        adv = objective.attack_loss(model(x_adv), batch).detach()
        grew = right | torch.tensor(not attack.early_stop)  # early stopping leaves samples wrong at x alone
        assert (adv[grew] > clean[grew]).all() and torch.equal(x_adv[~grew], x[~grew]), attack.name
        assert (~objective.is_correct(model(x_adv), batch))[reach > 0.05].all(), attack.name
    with pytest.raises(ValueError, match="needs integer labels"):
        APGD(loss="ce")(model, x, batch, objective, eps=eps, bounds=None)


def test_seeded_runs_repeat_and_leave_the_global_rng_alone():
    x, model, labels, radius = problem((8, 1, 4, 4))
    state = torch.get_rng_state()
    for attack in (APGD(steps=5, seed=3), Square(queries=20, seed=3)):
        runs = [attack(model, x, {"label": labels}, OBJ, eps=0.5 * radius["linf"], bounds=None) for _ in range(2)]
        assert torch.equal(runs[0], runs[1])
    assert torch.equal(torch.get_rng_state(), state)


def test_square_schedule_and_windows():
    assert p_selection(0.8, 0, 1000) == 0.8 and p_selection(0.8, 2, 1000) == 0.4
    assert p_selection(0.8, 999, 1000) == 0.8 / 512
    masks = random_windows(5, (8, 8), 0.25, torch.device("cpu"))
    assert masks.shape == (5, 1, 8, 8) and (masks.flatten(1).sum(1) == 16).all()  # 4 x 4 squares
    masks = random_windows(5, (4, 6, 8), 0.125, torch.device("cpu"))
    assert masks.shape == (5, 1, 4, 6, 8) and (masks.flatten(1).sum(1) == 2 * 3 * 4).all()  # boxes, half each dim


class RecordingObjective(ClassifierObjective):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def attack_loss(self, output, batch):
        self.seen.add((output.dtype, torch.is_autocast_enabled("cpu")))
        return super().attack_loss(output, batch)

    correct_margin = attack_loss  # what Square reads: record it too (a loss, not a margin, is fine here)


@pytest.mark.parametrize("attack", [APGD(steps=3), APGD(steps=3, loss="default"), Square(queries=3)])
def test_fp32_objective_under_bf16_autocast_and_eps_zero(attack):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 5, (6,))
    objective = RecordingObjective()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = attack(model, x, {"label": y}, objective, eps=0.03, bounds=(0.0, 1.0))
    assert x_adv.dtype == torch.float32 and objective.seen == {(torch.float32, False)}
    assert torch.equal(attack(model, x, {"label": y}, objective, eps=0.0, bounds=(0.0, 1.0)), x)


def test_names_and_bad_arguments_quote_the_value():
    names = [APGD().name, APGD(loss="dlr").name, APGD(loss="margin").name, APGD(loss="default").name,
             APGD(targeted=True).name, APGD(targeted=True, loss="ce").name, Square().name]
    assert names == ["apgd-ce", "apgd-dlr", "apgd-margin", "apgd", "apgd-t", "apgd-t-ce", "square"]
    assert (APGD("l2").norm, Square().norm) == ("l2", "linf")
    cases = [
        (lambda: APGD(loss="cw"), "unknown loss 'cw'"),
        (lambda: APGD(targeted=True, loss="margin"), "'margin' for targeted"),
        (lambda: APGD(steps=0), "steps.*0"),
        (lambda: APGD(rho=1.5), "rho.*1.5"),
        (lambda: APGD(n_target_classes=0), "n_target_classes.*0"),
        (lambda: APGD(norm="l1"), "'l1'"),
        (lambda: Square(norm="l2"), "Square.*'l2'.*'linf'"),
        (lambda: Square(queries=0), "queries.*0"),
        (lambda: Square(p_init=0), "p_init.*0"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    x, model, labels, _ = problem((2, 1, 2, 2))

    class NoMargin:
        attack_loss, is_correct = OBJ.attack_loss, OBJ.is_correct

    with pytest.raises(TypeError, match="correct_margin"):
        Square()(model, x, {"label": labels}, NoMargin(), eps=0.1, bounds=None)
