"""FGSM and PGD against models with a known answer, plus the attack contract (grads, modes, precision)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medrobust.attacks import FGSM, PGD, ClassifierObjective, ThreatModel, fgsm, fgsm_attack, pgd, pgd_attack
from medrobust.attacks.core.threat import lp_norm

SHAPES = [(12, 1, 4, 5), (12, 1, 3, 4, 5)]  # 2-D and 3-D
DUAL = {"linf": 1, "l2": 2}  # the minimal Linf perturbation of a linear model is |f| / ||w||_1; L2: / ||w||_2


class Linear(nn.Module):
    """Logits ``W x + b`` for images of any rank; ``(B, K)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def binary_problem(shape, seed=0):
    """Two logits ``[0, f(x)]`` with ``f = w.x + b``; labels are the clean predictions; radii per norm."""
    g = torch.Generator().manual_seed(seed)
    d = torch.Size(shape[1:]).numel()
    w = torch.randn(d, generator=g, dtype=torch.float64)
    model = Linear(torch.stack([torch.zeros(d, dtype=torch.float64), w]), torch.tensor([0.0, 0.1], dtype=torch.float64))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    f = model(x)[:, 1]
    labels = (f > 0).long()
    radius = {norm: f.abs() / w.norm(p=p) for norm, p in DUAL.items()}
    return model, x, labels, radius


def attack_fn(kind: str, norm: str):
    """Attacks that are exact on a linear model at eps just above the radius."""
    if kind == "fgsm":
        return lambda m, x, y, eps: fgsm(m, x, y, eps=eps, norm=norm, bounds=None)
    # L2 from a random start needs a larger step to reach the boundary of the ball within 1 %
    step = {"linf": None, "l2": 1.0}[norm]
    attack = PGD(norm=norm, steps=20, rel_step_size=step)
    return lambda m, x, y, eps: attack(m, x, {"label": y}, ClassifierObjective(), eps=eps, bounds=None)


def correct(model, x, labels):
    with torch.no_grad():
        return ClassifierObjective().is_correct(model(x), {"label": labels})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("kind", ["fgsm", "pgd"])
def test_linear_binary_known_minimal_perturbation(shape, norm, kind):
    torch.manual_seed(1)
    model, x, labels, radius = binary_problem(shape)
    attack = attack_fn(kind, norm)
    above = attack(model, x, labels, 1.01 * radius[norm])
    assert not correct(model, above, labels).any()  # every sample broken
    assert (lp_norm(above - x, norm) <= 1.01 * radius[norm] * (1 + 1e-9)).all()
    below = attack(model, x, labels, 0.99 * radius[norm])
    assert correct(model, below, labels).all()  # no sample can be broken


class PairwiseMargin:
    """Margin of the target class over the label, ``z_t - z_y``; correct while the label wins."""

    def attack_loss(self, output, batch):
        return (output.gather(1, batch["target"][:, None]) - output.gather(1, batch["label"][:, None]))[:, 0]

    def is_correct(self, output, batch):
        return output.argmax(1) == batch["label"]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_multiclass_pgd_breaks_just_above_the_pairwise_radius(norm):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    k, shape = 4, (16, 2, 3, 3)
    weight = torch.randn(k, 18, generator=g, dtype=torch.float64)
    model = Linear(weight, torch.zeros(k, dtype=torch.float64))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    logits = model(x)
    labels = logits.argmax(1)
    gaps = logits.gather(1, labels[:, None]) - logits  # (B, K), 0 at the label
    dual = (weight[labels][:, None, :] - weight[None]).norm(p=DUAL[norm], dim=2)  # ||w_y - w_j||_dual
    pairwise = torch.where(gaps > 0, gaps / dual.clamp_min(1e-12), torch.inf)  # (B, K)
    radius, target = pairwise.min(1)  # the nearest decision boundary is the minimal perturbation
    batch = {"label": labels, "target": target, "ids": [f"s{i}" for i in range(16)]}
    objective = PairwiseMargin()
    x_adv = pgd_attack(model, x, batch, objective, threat=ThreatModel(norm, 1.01 * radius, None), steps=30,
                       rel_step_size=0.1 if norm == "linf" else 0.5)
    assert not correct(model, x_adv, labels).any()
    for attack in (objective, ClassifierObjective()):  # below the radius no objective can succeed
        x_below = pgd_attack(model, x, batch, attack, threat=ThreatModel(norm, 0.99 * radius, None), steps=20)
        assert correct(model, x_below, labels).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("bounds", [(-1.0, 3.0), None])
def test_bounds_and_ball_respected(shape, norm, bounds):
    torch.manual_seed(0)
    model, _, labels, _ = binary_problem(shape)
    x = torch.rand(shape, dtype=torch.float64) * 4 - 1
    eps = {"linf": 0.7, "l2": 3.0, "l1": 6.0}[norm]
    runs = [] if norm == "l1" else [  # FGSM has no L1 form
        fgsm(model, x, labels, eps=eps, norm=norm, bounds=bounds),
        FGSM(norm, random_start=True)(model, x, {"label": labels}, ClassifierObjective(), eps=eps, bounds=bounds),
    ]
    runs += [
        pgd(model, x, labels, eps=eps, norm=norm, bounds=bounds, steps=5, restarts=2),
        PGD(norm, steps=5)(model, x, {"label": labels}, ClassifierObjective(), eps=eps, bounds=bounds),
        PGD(norm, steps=2).attack_from(x + 10, model, x, {"label": labels}, ClassifierObjective(), eps=eps,
                                       bounds=bounds),  # a start far outside the ball and the bounds
    ]
    for x_adv in runs:
        assert x_adv.dtype == x.dtype and x_adv.shape == x.shape and not x_adv.requires_grad
        assert (lp_norm(x_adv - x, norm) <= eps * (1 + 1e-9)).all()
        if bounds is not None:
            assert x_adv.min() >= bounds[0] and x_adv.max() <= bounds[1]
        else:
            assert (x_adv - x).abs().amax() > 0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3), nn.Dropout(0.2))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("attack", [FGSM(), FGSM(random_start=True), PGD(steps=3), PGD(steps=3, early_stop=False)])
def test_parameters_modes_and_bn_stats_untouched(attack):
    torch.manual_seed(0)
    net = Net()
    net.train()
    net.head.eval()  # mixed modes
    net.features[0].bias.requires_grad_(False)
    net.head[1].weight.grad = torch.ones_like(net.head[1].weight)
    modes = {name: m.training for name, m in net.named_modules()}
    flags = {name: p.requires_grad for name, p in net.named_parameters()}
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 3, (5,))
    x_adv = attack(net, x, {"label": y}, ClassifierObjective(), eps=0.05, bounds=(0.0, 1.0))
    assert x_adv.shape == x.shape
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert {name: p.requires_grad for name, p in net.named_parameters()} == flags
    assert torch.equal(net.head[1].weight.grad, torch.ones_like(net.head[1].weight))
    assert all(p.grad is None for name, p in net.named_parameters() if name != "head.1.weight")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())


def test_bn_eval_false_leaves_batchnorm_in_the_callers_mode():
    torch.manual_seed(0)
    net = Net().train()
    before = net.features[1].running_mean.clone()
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 3, (5,))
    PGD(steps=2, bn_eval=False)(net, x, {"label": y}, ClassifierObjective(), eps=0.05, bounds=(0.0, 1.0))
    assert not torch.equal(net.features[1].running_mean, before)  # the caller asked for train-mode BN
    assert net.training and net.features[1].training


class CountingModel(nn.Module):
    """Records the batch size of every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_early_stopping_shrinks_the_batch_and_finds_the_same_samples(norm):
    torch.manual_seed(0)
    model, x, labels, radius = binary_problem((12, 1, 4, 5))
    eps = radius[norm] * torch.where(torch.arange(12) % 2 == 0, 1.5, 0.9).double()  # per-sample eps
    labels[0] = 1 - labels[0]  # wrong at the clean point: needs no attack
    eps[0] = 0.5 * radius[norm][0]
    runs = {}
    for early_stop in (True, False):
        counting = CountingModel(model)
        threat = ThreatModel(norm, eps, None)
        runs[early_stop] = pgd_attack(counting, x, {"label": labels}, ClassifierObjective(), threat=threat,
                                      steps=10, early_stop=early_stop, return_result=True)
        runs[early_stop, "sizes"] = counting.sizes
    fooled = {key: ~correct(model, runs[key].x_adv, labels) for key in (True, False)}
    assert torch.equal(fooled[True], fooled[False])
    assert torch.equal(fooled[True], (torch.arange(12) % 2 == 0))
    assert torch.equal(runs[True].success, fooled[True])
    assert torch.equal(runs[True].x_adv[0], x[0])  # clean-wrong sample returned untouched
    sizes = runs[True, "sizes"]
    assert sizes[0] == 12 and sizes[1] == 11 and sizes[-1] == 6  # clean check, minus sample 0, the 6 survivors
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))
    assert runs[False, "sizes"] == [12] * 11  # every step on every sample, plus the final point


def test_restarts_keep_best_and_max_loss_without_early_stop():
    torch.manual_seed(0)
    model, x, labels, radius = binary_problem((8, 1, 4, 4))
    result = pgd_attack(model, x, {"label": labels}, ClassifierObjective(),
                        threat=ThreatModel("linf", 0.5 * radius["linf"], None), steps=3, restarts=3,
                        early_stop=False, return_result=True)
    # for a linear model the max-loss point of the box is the corner PGD reaches
    loss = ClassifierObjective().attack_loss(model(result.x_adv), {"label": labels}).detach()
    assert torch.allclose(result.loss, loss)
    assert not result.success.any()


def test_eps_zero_returns_x():
    model, x, labels, _ = binary_problem((4, 1, 3, 3))
    assert torch.equal(pgd(model, x, labels, eps=0.0, bounds=None), x)
    assert torch.equal(fgsm(model, x, labels, eps=0.0, bounds=None), x)


class RecordingObjective(ClassifierObjective):
    def __init__(self):
        super().__init__()
        self.seen = []

    def attack_loss(self, output, batch):
        self.seen.append((output.dtype, torch.is_autocast_enabled("cpu")))
        return super().attack_loss(output, batch)


def test_fp32_loss_under_bf16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    objective = RecordingObjective()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        x_adv = PGD(steps=2)(model, x, {"label": y}, objective, eps=0.03, bounds=(0.0, 1.0))
    assert x_adv.dtype == torch.float32
    assert objective.seen and set(objective.seen) == {(torch.float32, False)}


def test_works_under_no_grad_and_inference_mode():
    torch.manual_seed(0)
    model, x, labels, radius = binary_problem((6, 1, 4, 4))
    eps = 1.01 * radius["linf"]
    with torch.no_grad():
        x_adv = pgd(model, x, labels, eps=eps, bounds=None)
    assert not correct(model, x_adv, labels).any()
    with torch.inference_mode():
        x_inf, labels_inf, eps_inf = x.clone(), labels.clone(), eps.clone()
    assert x_inf.is_inference() and labels_inf.is_inference()
    with torch.inference_mode(False), torch.enable_grad():  # what the callbacks do
        x_adv = PGD()(model, x_inf, {"label": labels_inf}, ClassifierObjective(), eps=eps_inf, bounds=None)
    assert not x_adv.is_inference() and not correct(model, x_adv, labels).any()
    with torch.inference_mode():  # even without the caller's help
        x_adv = FGSM()(model, x_inf, {"label": labels_inf}, ClassifierObjective(), eps=eps_inf, bounds=None)
    assert not correct(model, x_adv.clone(), labels).any()


def test_bad_hyperparameters_quote_the_value():
    cases = [
        (lambda: PGD(steps=0), "steps.*0"),
        (lambda: PGD(restarts=0), "restarts.*0"),
        (lambda: PGD(rel_step_size=-0.5), "rel_step_size.*-0.5"),
        (lambda: PGD(norm="l3"), "'l3'.*'linf', 'l2', 'l1'"),
        (lambda: PGD(norm="l1", l1_sparsity=0), "l1_sparsity.*0"),
        (lambda: FGSM(norm="l1"), "FGSM does not define norm 'l1'"),
        (lambda: FGSM(rel_step_size=0), "rel_step_size.*0"),
        (lambda: FGSM(norm="L2"), "'L2'"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    model, x, labels, _ = binary_problem((2, 1, 2, 2))
    threat = ThreatModel("linf", 0.1, None)
    with pytest.raises(ValueError, match="step_size.*-0.1"):
        pgd_attack(model, x, {"label": labels}, ClassifierObjective(), threat=threat, step_size=-0.1)
    with pytest.raises(ValueError, match="steps.*2.5"):
        pgd_attack(model, x, {"label": labels}, ClassifierObjective(), threat=threat, steps=2.5)
    with pytest.raises(ValueError, match="not both"):
        fgsm_attack(model, x, {"label": labels}, ClassifierObjective(), threat=threat, step_size=0.1, rel_step_size=1.0)


def test_names_and_objective_shape_check():
    assert (FGSM().name, FGSM(random_start=True).name, PGD().name, PGD(steps=20, restarts=5).name) == \
        ("fgsm", "fgsm_rs", "pgd10", "pgd20x5")

    class Mean(ClassifierObjective):
        def attack_loss(self, output, batch):
            return super().attack_loss(output, batch).mean()

    model, x, labels, _ = binary_problem((3, 1, 2, 2))
    with pytest.raises(ValueError, match=r"attack_loss must return one value per sample, shape \(3,\); got \(\)"):
        PGD()(model, x, {"label": labels}, Mean(), eps=0.1, bounds=None)


def test_single_logit_classifier():
    model, x, labels, radius = binary_problem((8, 1, 3, 3))
    f_only = lambda x: model(x)[:, 1:]  # noqa: E731  logits [0, f] -> f, (B, 1)
    x_adv = pgd(f_only, x, labels.double(), eps=1.01 * radius["linf"], bounds=None)
    assert not correct(model, x_adv, labels).any()
    x_adv = pgd(f_only, x, labels.double(), eps=0.99 * radius["linf"], bounds=None)
    assert correct(model, x_adv, labels).all()


class Bump(nn.Module):
    """Logits ``[0, -|sum(x)|]``: the loss of label 0 peaks where ``sum(x) = 0``, so large steps overshoot the
    peak and the loss falls and rises again (the label stays right: ``-|.| <= 0``)."""

    def forward(self, x):
        f = -x.flatten(1).sum(1).abs()
        return torch.stack([torch.zeros_like(f), f], 1)


def test_last_iterate_costs_a_forward_only_where_the_loss_turned_down():
    """Without early stopping: where the loss rose at the last step, the last iterate is returned unjudged (as
    plain PGD returns it); elsewhere one forward, on just those samples, compares it with the best point."""
    peaks = torch.tensor([0.5, 1.9, 3.1, 4.45, 5.3, 7.0, 9.5, 2.2], dtype=torch.float64)  # sum(x) to climb
    model, x = Bump(), (-peaks / 4)[:, None, None, None].expand(8, 1, 2, 2).clone()
    batch, objective, steps, step = {"label": torch.zeros(8, dtype=torch.long)}, ClassifierObjective(), 4, 0.3
    points, losses = [x], []  # the plain loop: sign steps from x (the ball, radius 100, never binds)
    for _ in range(steps + 1):
        leaf = points[-1].clone().requires_grad_(True)
        loss = objective.attack_loss(model(leaf), batch)
        losses.append(loss.detach())
        points.append(points[-1] + step * torch.autograd.grad(loss.sum(), leaf)[0].sign())
    losses, points = torch.stack(losses), torch.stack(points[:-1])  # (steps + 1, B): x_0 .. x_T
    best = losses[:steps].argmax(0)  # the best point the gradient steps judged (first of equals)
    rising = best == steps - 1
    last_wins = losses[steps] > losses[best, torch.arange(8)]
    expected = torch.where((rising | last_wins)[:, None, None, None], points[steps], points[best, torch.arange(8)])
    assert rising.any() and (~rising).any()
    counting = CountingModel(model)
    x_adv = pgd_attack(counting, x, batch, objective, threat=ThreatModel("linf", 100.0, None), steps=steps,
                       step_size=step, random_start=False, early_stop=False)
    assert torch.equal(x_adv, expected)
    assert counting.sizes == [8] * steps + [int((~rising).sum())]
    counting = CountingModel(model)  # an AttackResult reports every returned point's loss: all are judged
    result = pgd_attack(counting, x, batch, objective, threat=ThreatModel("linf", 100.0, None), steps=steps,
                        step_size=step, random_start=False, early_stop=False, return_result=True)
    assert counting.sizes == [8] * (steps + 1)
    assert torch.equal(result.loss, torch.maximum(losses[steps], losses[best, torch.arange(8)]))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_warm_start_is_moved_into_the_ball_and_a_fooling_start_is_kept(norm):
    model, x, labels, radius = binary_problem((10, 1, 3, 4))
    f = model(x)[:, 1].detach()
    w = model.weight[1].detach().reshape(x.shape[1:])
    toward = -torch.sign(f)[:, None, None, None] * (w.sign() if norm == "linf" else w / w.norm())
    far = x + 3 * radius[norm][:, None, None, None] * toward  # fools, 3x outside the radius
    eps = 1.01 * radius[norm]
    counting = CountingModel(model)
    x_adv = pgd_attack(counting, x, {"label": labels}, ClassifierObjective(), threat=ThreatModel(norm, eps, None),
                       steps=5, start=far)
    assert (lp_norm(x_adv - x, norm) <= eps * (1 + 1e-9)).all()
    assert not correct(model, x_adv, labels).any()
    assert counting.sizes == [10]  # the start, moved onto the ball's edge along the best direction, fools at once
    below = pgd_attack(model, x, {"label": labels}, ClassifierObjective(), start=far,
                       threat=ThreatModel(norm, 0.99 * radius[norm], None), steps=5)
    assert correct(model, below, labels).all()
    assert (lp_norm(below - x, norm) <= 0.99 * radius[norm] * (1 + 1e-9)).all()


@pytest.mark.parametrize("bounds", [(-0.5, 1.2), None])
def test_linf_box_clamp_is_the_projection(bounds):
    from medrobust.attacks.core.threat import constrain, linf_box

    torch.manual_seed(0)
    x = torch.rand(6, 2, 3, 4, dtype=torch.float64)
    eps = torch.rand(6, dtype=torch.float64) * 0.5
    x_adv = x + torch.randn_like(x)
    low, high = linf_box(x, eps, bounds)
    assert torch.allclose(torch.clamp(x_adv, low, high), constrain(x, x_adv, "linf", eps, bounds), atol=1e-15)
