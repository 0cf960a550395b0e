"""JSMA (L0) against linear models whose minimal number of changed values is known by brute force, the L0 budget
of its curve, other tasks through the loss map, fp32 objectives under autocast, and an evaluation's rows."""

from __future__ import annotations

import itertools

import pytest
import torch
from medrobust.callbacks import RobustnessEvaluation
from test_attacks import CountingModel
from test_minimal_norm import Net
from torch import nn

from medrobust.attacks import FGSM, JSMA, ClassifierObjective, jsma_attack
from medrobust.attacks.sparse.gradients import JSMA_TARGET, LogitSaliency, LossSaliency, saliency_for
from medrobust.reporting import summary_markdown
from medrobust.tasks.classification import ClassificationTask

BOUNDS = (0.0, 1.0)
SHAPE = (1, 3, 3)  # 9 values: 3^9 assignments (keep, low, high) for the brute force
OBJ = ClassifierObjective()


def distinct_weights(d: int, seed: int, smallest: float = 0.5) -> torch.Tensor:
    """Weights with distinct magnitudes ``smallest`` .. 2 (no ties in the order) and random signs."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.linspace(smallest, 2.0, d, dtype=torch.float64)[torch.randperm(d, generator=g)]
    return magnitude * (torch.randint(0, 2, (d,), generator=g) * 2 - 1)


def linear_classifier(w: torch.Tensor, rows=None) -> nn.Module:
    """Logits ``W (x - 0.5)`` (2 classes) with ``W = rows`` (default ``[-w / 2, w / 2]``: ``z_1 - z_0 = w.(x - 0.5)``)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(len(w), 2, dtype=torch.float64))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-w / 2, w / 2]) if rows is None else rows)
        model[1].bias.copy_(-0.5 * model[1].weight.sum(1))
    return model


def samples_along(w: torch.Tensor, offsets) -> torch.Tensor:
    """``x = 0.5 + t sign(w)`` per offset ``t``: ``w.(x - 0.5) = t |w|_1`` (class 1 for t > 0), and every value has the
    same room, 0.5 + |t|, towards the bound that moves ``w.x`` back: the best changes are those of largest |w|."""
    t = torch.tensor(offsets, dtype=torch.float64)[:, None]
    return (0.5 + t * w.sign()).reshape(-1, *SHAPE)


def brute_force_min_changes(correct_at, x: torch.Tensor) -> torch.Tensor:
    """Per sample, the fewest values sent to a bound that make ``correct_at(points, sample)`` false (inf: none)."""
    codes = torch.tensor(list(itertools.product((0, 1, 2), repeat=x[0].numel())))  # keep, low, high
    counts, found = (codes > 0).sum(1).double(), []
    for i, sample in enumerate(x.flatten(1)):
        points = torch.where(codes == 0, sample, torch.where(codes == 1, BOUNDS[0], BOUNDS[1]).double())
        found.append(torch.where(correct_at(points.reshape(-1, *SHAPE), i), torch.inf, counts).min())
    return torch.stack(found)


def changed(points: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (points != x).flatten(1)


# -- the known answer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("per_step", [1, 2])
@pytest.mark.parametrize("rows", ["opposite", "zero_row"])
def test_linear_classifier_changes_values_by_weight_and_stops_at_the_brute_force_minimum(per_step, rows):
    """``W = [-w/2, w/2]`` satisfies the paper's map (alpha > 0, beta < 0); ``W = [0, w]`` has beta = 0 for a label-0
    sample, where only the fallback (largest alpha - beta) moves. Either way the values change in the order of |w|,
    one or two per step, and the count is the brute-force minimum (a pair that flips with its first value alone
    keeps only that one)."""
    w = distinct_weights(9, seed=1, smallest=1.0)
    model = linear_classifier(w, None if rows == "opposite" else torch.stack([torch.zeros_like(w), w]))
    x = samples_along(w, [-0.42, -0.25, -0.06, 0.04, 0.14, 0.31, 0.45])  # 1 .. 4 changes, none near a tie
    labels = model(x).argmax(1)
    exact = brute_force_min_changes(lambda p, i: model(p).argmax(1) == labels[i], x)
    assert set(exact.tolist()) >= {1.0, 2.0, 3.0, 4.0}  # the samples need different counts, odd and even
    attack = JSMA(features_per_step=per_step)
    budgets = list(range(1, 10))
    with torch.no_grad():
        points = attack.curve(model, x, {"label": labels}, OBJ, eps_values=budgets, bounds=BOUNDS)
    assert torch.equal(attack.last_radii, exact)
    rank = w.abs().argsort(descending=True).argsort()  # 0: the largest |w|
    for eps, point in zip(budgets, points):  # the eps values of largest |w|, or fewer: stopped exactly at the flip
        assert torch.equal(changed(point, x), rank[None] < exact.clamp(max=eps)[:, None]), eps
        with torch.no_grad():
            assert torch.equal(model(point).argmax(1) != labels, exact <= eps)
    attack.curve(model, x, {"label": labels}, OBJ, eps_values=[1, 3], bounds=BOUNDS)  # odd: the last pair is cut
    assert torch.equal(attack.last_radii, torch.where(exact <= 3, exact, torch.inf))  # never past the budget


def test_multiclass_budget_bounds_and_radii_of_a_curve():
    """A CNN with 5 classes, 2-D (fp32) and 3-D (fp64): at every budget at most eps values changed, each exactly onto a
    bound (0.1, 0.9: not fp32 numbers); wrong at eps exactly when the count is <= eps (single steps: prefixes checked)."""
    torch.manual_seed(0)
    for shape, dtype in (((6, 2, 6, 6), torch.float32), ((4, 1, 4, 5, 6), torch.float64)):
        conv = nn.Conv2d if len(shape) == 4 else nn.Conv3d
        model = nn.Sequential(conv(shape[1], 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * torch.Size(shape[2:]).numel(), 5)).to(dtype).eval()
        x = torch.rand(shape, dtype=dtype) * 0.6 + 0.2
        with torch.no_grad():
            labels = model(x).argmax(1)
        labels[0] = (labels[0] + 1) % 5  # wrong at x: count 0, returned unchanged
        eps = [1, 2, 4, 8, 16]
        for per_step in (1, 2):
            attack = JSMA(features_per_step=per_step)
            points = attack.curve(model, x, {"label": labels}, OBJ, eps_values=eps, bounds=(0.1, 0.9))
            radii = attack.last_radii
            assert radii[0] == 0 and torch.equal(points[-1][0], x[0])
            assert bool(torch.isfinite(radii[1:]).any())
            for e, point in zip(eps, points):
                moved, fooled = changed(point, x), radii <= e
                assert (moved.sum(1) <= e).all() and (moved.sum(1)[fooled] == radii[fooled]).all()
                assert ((point == 0.1) | (point == 0.9)).flatten(1)[moved].all()  # onto a bound, inside them
                with torch.no_grad():
                    wrong = model(point).argmax(1) != labels
                assert torch.equal(wrong, fooled) if per_step == 1 else wrong[fooled].all()


class LinearRegression:
    """A regressor ``v.x`` scored against ``batch["target"]``: correct while ``|error| <= tau``; no logits."""

    outputs_logits = False

    def __init__(self, tau: float) -> None:
        self.tau = tau

    def attack_loss(self, output, batch):
        return (output[:, 0] - batch["target"]).abs()

    def is_correct(self, output, batch):
        return (output[:, 0] - batch["target"]).abs() <= self.tau


@pytest.mark.parametrize("start", ["centre", "random"])
def test_regression_through_the_loss_map_meets_the_brute_force_minimum(start):
    """The loss map: the value whose move to a bound raises |error| most first (|v| x its room towards that bound:
    at the centre the order of |v|; from random values the room decides); the sample stops once the error passes
    tau, at the brute-force minimum."""
    v = distinct_weights(9, seed=2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 1, bias=False, dtype=torch.float64))
    with torch.no_grad():
        model[1].weight.copy_(v[None])
    x = torch.full((6, *SHAPE), 0.5, dtype=torch.float64)
    if start == "random":
        x = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.9 + 0.05
    error = torch.tensor([-2.9, -1.6, -0.5, 0.1, 1.0, 2.7], dtype=torch.float64)
    target = model(x)[:, 0].detach() - error
    task, batch = LinearRegression(tau=3.0), {"target": target}
    exact = brute_force_min_changes(lambda p, i: (model(p)[:, 0] - target[i]).abs() <= task.tau, x)
    assert len(set(exact.tolist())) >= 3
    up = (v * error.sign()[:, None]) > 0  # the bound each value moves the error outwards by
    rank = (v.abs() * torch.where(up, 1 - x.flatten(1), x.flatten(1))).argsort(1, descending=True).argsort(1)
    assert (start == "random") == bool((rank != v.abs().argsort(descending=True).argsort()).any())  # room matters
    for per_step in (1, 2):
        with torch.no_grad():
            x_adv, counts = jsma_attack(model, x, batch, task, bounds=BOUNDS, max_changes=9,
                                        features_per_step=per_step, return_norms=True)
        assert torch.equal(counts, exact) and torch.equal(changed(x_adv, x), rank < exact[:, None])


def test_the_map_and_the_targets_come_from_the_task_and_its_clean_logits():
    """Logits (B, K) against integer labels: the logit map, each sample pushed to its runner-up (the default), the
    least likely class, or a given class (its runner-up where that is its label). Anything else: the loss map."""
    logits = torch.tensor([[3.0, 2.0, -1.0, 0.5], [0.0, 1.0, 4.0, -2.0]])
    labels = torch.tensor([0, 2])
    model = lambda x: logits
    x = torch.zeros(2, 1, 2, 2)
    for target, expected in (("runner_up", [1, 1]), ("least_likely", [2, 3]), (2, [2, 1]), (0, [1, 0])):
        saliency, batch = saliency_for(model, OBJ, x, {"label": labels}, target)
        assert isinstance(saliency, LogitSaliency) and batch[JSMA_TARGET].tolist() == expected, target
    assert JSMA().targeted is False and JSMA(target="least_likely").targeted and JSMA(target=1).targeted
    for forward, objective, batch in ((model, LinearRegression(1.0), {"label": labels}),  # outputs_logits False
                                      (lambda x: logits[:, :, None], OBJ, {"label": labels}),  # dense outputs
                                      (model, OBJ, {"label": labels.float()})):  # a regression target
        assert isinstance(saliency_for(forward, objective, x, batch, "runner_up")[0], LossSaliency)


class Recording:
    """``base`` recording the dtype of every output its objective sees and whether autocast was on."""

    def __init__(self, base) -> None:
        self.base, self.seen, self.outputs_logits = base, [], getattr(base, "outputs_logits", True)

    def attack_loss(self, output, batch):
        self.seen.append((output.dtype, torch.is_autocast_enabled("cpu")))
        return self.base.attack_loss(output, batch)

    def is_correct(self, output, batch):
        self.seen.append((output.dtype, torch.is_autocast_enabled("cpu")))
        return self.base.is_correct(output, batch)


def test_objective_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    classifier, regression = Recording(OBJ), Recording(LinearRegression(tau=0.05))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        x_adv = JSMA()(model, x, {"label": y}, classifier, eps=4, bounds=BOUNDS)
        x_reg = JSMA()(model, x, {"target": torch.zeros(6)}, regression, eps=4, bounds=BOUNDS)
    assert x_adv.dtype == x_reg.dtype == torch.float32
    for seen in (classifier.seen, regression.seen):
        assert seen and set(seen) == {(torch.float32, False)}


def test_parameters_modes_and_finished_samples():
    torch.manual_seed(0)
    net = Net().train()
    modes = {name: m.training for name, m in net.named_modules()}
    x, y = torch.rand(5, 1, 6, 6), torch.randint(0, 3, (5,))
    radii = JSMA(max_changes=6).radii(net, x, {"label": y}, OBJ, bounds=BOUNDS)
    assert radii.shape == (5,) and ((radii >= 0) & (radii <= 6) | torch.isinf(radii)).all()
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    model, x, batch, _ = _tiny([-0.31, -0.2, 0.04, 0.37])
    model, batch["label"][0] = CountingModel(model), 1 - batch["label"][0]
    JSMA(features_per_step=1)(model, x, batch, OBJ, eps=9, bounds=BOUNDS)
    assert model.sizes[:3] == [4, 4, 3]  # the clean output, the first step, then without the sample wrong at x
    assert model.sizes == sorted(model.sizes, reverse=True) and model.sizes[-1] < 3


@pytest.mark.parametrize(("make", "message"), [
    (lambda: JSMA(max_changes=0), "max_changes must be an integer >= 1, got 0"),
    (lambda: JSMA(features_per_step=3), "features_per_step must be 1 .* or 2 .*, got 3"),
    (lambda: JSMA(candidates=1), "candidates must be an integer >= 2, got 1"),
    (lambda: JSMA(target="most_likely"), "target must be a class index >= 0 or one of .*'most_likely'"),
    (lambda: JSMA()(*_tiny(), eps=2, bounds=None), r"needs bounds=\(low, high\); got None"),
    (lambda: JSMA()(*_tiny(), eps=2.5, bounds=BOUNDS), r"whole number >= 0; got \[2.5\].*eval.eps_unit=model"),
    (lambda: JSMA().curve(*_tiny(), eps_values=[4, 2], bounds=BOUNDS), "non-decreasing eps"),
])
def test_bad_arguments_fail_clearly(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _tiny(offsets=(0.2,)):
    w = distinct_weights(9, seed=1)
    return linear_classifier(w), samples_along(w, offsets), {"label": (torch.tensor(offsets) > 0).long()}, OBJ


# -- in an evaluation ----------------------------------------------------------------------------------
def _task_and_batch():
    w = distinct_weights(9, seed=3)
    task = ClassificationTask(linear_classifier(w).float(), num_classes=2, input_bounds=BOUNDS).eval()
    x = samples_along(w, [-0.3, -0.2, -0.1, -0.03, 0.05, 0.15, 0.25, 0.35]).float()
    return task, {"image": x, "label": ((x.flatten(1) - 0.5) @ w.float() > 0).long()}


def test_an_evaluation_gives_an_l0_curve_beside_linf_fgsm_and_refuses_range_units():
    task, batch = _task_and_batch()
    evaluation = RobustnessEvaluation({"jsma": JSMA(), "fgsm": FGSM()}, eps=[0.05, 0.1],
                                      attack_eps={"jsma": [1, 2, 4, 8]}, probe_splits=("val",))
    with torch.inference_mode():  # as Lightning's validation loop calls it
        result = evaluation.evaluate(task, [batch], split="val", epoch=0, max_batches=None)
    assert {(r["attack"], r["norm"], r["eps"]) for r in result.rows} == \
        {("jsma_l0", "l0", e) for e in (0.0, 1.0, 2.0, 4.0, 8.0)} | {("fgsm_linf", "linf", e) for e in (0.0, 0.05, 0.1)}
    radii = result.radii["jsma_l0"]
    assert torch.equal(radii.cpu(), JSMA(max_changes=8).radii(task, batch["image"], batch, task, bounds=BOUNDS).float())
    assert bool(torch.isfinite(radii).any()) and bool((radii > 1).any())
    accuracy = {r["eps"]: r["value"] for r in result.rows if r["attack"] == "jsma_l0" and r["metric"] == "accuracy"}
    for eps, value in accuracy.items():  # the curve is the radii's survival function
        assert value == pytest.approx(float((radii > eps).float().mean()))
    # each norm checked alone; the probes run in Linf although the first attack is L0
    assert evaluation._masking_flags(task, result, "val") == []
    assert "jsma_l0" in summary_markdown(result.rows, "val", title="t")
    batch["image"] = batch["image"] * 0.7 + 0.1  # an intensity range of 0.7 per image: eps 1 in range units is 0.7
    with pytest.raises(ValueError, match="eval.eps_unit=model"):
        RobustnessEvaluation({"jsma": JSMA()}, eps=[1, 2], eps_unit="range").evaluate(
            task, [batch], split="val", epoch=0, max_batches=None)


def test_an_l0_attack_needs_model_units_and_is_refused_for_training():
    from medrobust.callbacks import AdversarialTraining, RobustnessEvaluation

    with pytest.raises(ValueError, match=r"eval.eps_unit='native': jsma_l0 counts changed input values \(L0\)"):
        RobustnessEvaluation([JSMA()], eps=[1, 2], eps_unit="native")
    with pytest.raises(ValueError, match=r"adv.attack: jsma_l0 is an L0 attack"):
        AdversarialTraining(JSMA(), eps=2)
