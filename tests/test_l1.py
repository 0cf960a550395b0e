"""L1 threat model: the ball-and-box projection against a QP solver, and FMN / DeepFool / PGD in L1 against linear
models whose exact minimal L1 perturbation inside a box is known (a fractional knapsack)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from medrobust.attacks import (
    APGD,
    DAG,
    FGSM,
    PGD,
    ClassifierObjective,
    Square,
    ThreatModel,
    deepfool_attack,
    directional_attack,
    fgsm_attack,
    fmn_attack,
    minimal_perturbation,
    pgd,
    robust_accuracy,
)
from medrobust.evaluation.suites import curve_suite
from medrobust.attacks.core.threat import constrain, lp_norm, project

OBJ = ClassifierObjective()
SHAPES = [(12, 1, 6, 8), (12, 1, 4, 6, 8), (12, 1, 8, 16, 16)]  # 2-D, 3-D, and 3-D wide enough for sparse steps
BOX = (0.0, 1.0)


def box_problem(shape, seed=0):
    """Logits ``[0, w.x + b]`` on images in ``[0, 1]``, labels the clean predictions, and the exact minimal L1
    perturbation inside the box: move the coordinates of largest ``|w_i|`` first, each as far as the box lets it
    towards the boundary (the LP's greedy optimum). Samples within 0.02 of the boundary are dropped."""
    g = torch.Generator().manual_seed(seed)
    d = torch.Size(shape[1:]).numel()
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    b = -(x.flatten(1) @ w).median()
    linear = nn.Linear(d, 2, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([torch.zeros_like(w), w]))
        linear.bias.copy_(torch.stack([torch.zeros_like(b), b]))
    model = nn.Sequential(nn.Flatten(), linear)
    with torch.no_grad():
        f = model(x)[:, 1]
    moves_up = (-torch.sign(f)[:, None] * torch.sign(w)[None]) > 0  # the way each coordinate must move
    room = torch.where(moves_up, 1 - x.flatten(1), x.flatten(1))
    order = w.abs().argsort(descending=True)
    gain, room = w.abs()[order].expand_as(room), room[:, order]
    reached = (gain * room).cumsum(1)  # |f| closed by filling the first j coordinates
    radius = torch.full_like(f, float("inf"))
    for i in range(len(f)):
        j = int((reached[i] < f[i].abs()).sum())
        if j < d:
            before = reached[i, j - 1] if j else 0.0
            radius[i] = room[i, :j].sum() + (f[i].abs() - before) / gain[i, j]
    keep = (radius > 0.02) & torch.isfinite(radius)
    return model, x[keep], (f[keep] > 0).long(), radius[keep]


def fooled(model, x_adv, labels):
    with torch.no_grad():
        return ~OBJ.is_correct(model(x_adv), {"label": labels})


# -- geometry ------------------------------------------------------------------------------------------
def qp_projection(y: np.ndarray, eps: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """argmin ||z - y||^2 s.t. ||z||_1 <= eps, low <= z <= high, by SLSQP on z = p - n (p, n >= 0)."""
    d = len(y)
    objective = lambda v: float(((v[:d] - v[d:] - y) ** 2).sum())  # noqa: E731
    bounds = [(0, max(h, 0)) for h in high] + [(0, max(-lo, 0)) for lo in low]
    constraint = {"type": "ineq", "fun": lambda v: eps - v.sum()}
    v = minimize(objective, np.zeros(2 * d), bounds=bounds, constraints=[constraint], method="SLSQP",
                 options={"ftol": 1e-14, "maxiter": 500}).x
    return v[:d] - v[d:]


@pytest.mark.parametrize("seed", range(4))
def test_l1_projection_inside_the_box_is_the_euclidean_one(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 1, 2, 4, generator=g, dtype=torch.float64)
    target = x + torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.6
    eps = torch.tensor([0.3, 1.0, 50.0], dtype=torch.float64)  # tight, medium, never binding
    z = constrain(x, target, "l1", eps, BOX) - x
    for i in range(3):
        y, lo, hi = ((t[i].flatten().numpy()) for t in (target - x, -x, 1 - x))
        np.testing.assert_allclose(z[i].flatten().numpy(), qp_projection(y, float(eps[i]), lo, hi), atol=1e-6)
    assert (lp_norm(z, "l1") <= eps * (1 + 1e-9)).all()
    assert (x + z).min() >= 0 and (x + z).max() <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_l1_projections_of_half_precision_images_stay_inside_the_ball(dtype):
    torch.manual_seed(0)
    x = torch.rand(1, 1, 70, 32, 32).to(dtype)  # 71680 voxels: half-precision sums would overrun eps
    delta = torch.randn(x.shape).to(dtype)
    assert lp_norm(project(delta, "l1", torch.tensor([17.95])).float(), "l1") <= 17.95
    moved = constrain(x, x + delta, "l1", torch.tensor([5.0]), BOX) - x
    assert moved.dtype == dtype and 4.95 <= lp_norm(moved.float(), "l1") <= 5.0 * 1.001  # + the bound snap


def test_l1_ball_projection_is_soft_thresholding():
    delta = torch.tensor([[3.0, -1.0, 0.5, 0.0], [0.2, 0.2, -0.1, 0.0], [1.0, 1.0, 0.0, 0.0]])
    eps = torch.tensor([2.0, 1.0, 1.0])
    expected = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.2, 0.2, -0.1, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(project(delta, "l1", eps), expected)


# -- attacks against the exact answer ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_fmn_and_deepfool_find_the_exact_l1_radius_inside_the_box(shape):
    model, x, labels, radius = box_problem(shape)
    x_adv, norms = fmn_attack(model, x, {"label": labels}, OBJ, bounds=BOX, norm="l1", return_norms=True)
    ratio = norms / radius
    assert (ratio >= 1 - 1e-9).all() and (ratio <= 1.02).all(), ratio
    assert fooled(model, x_adv, labels).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    torch.testing.assert_close(minimal_perturbation(model, x, labels, norm="l1", bounds=BOX).double(), norms)
    _, norms = deepfool_attack(model, x, {"label": labels}, OBJ, bounds=BOX, norm="l1", return_norms=True)
    ratio = norms / radius  # DeepFool's box-aware L1 steps fill one coordinate after another: the greedy optimum
    assert (ratio >= 1 - 1e-9).all() and (ratio <= 1.02 * 1.02).all(), ratio  # overshoot 0.02


@pytest.mark.parametrize("shape", SHAPES)
def test_pgd_l1_breaks_every_sample_just_above_the_radius_and_none_below(shape):
    torch.manual_seed(0)
    model, x, labels, radius = box_problem(shape)
    batch = {"label": labels}
    # from x: within 5 %; a uniform random start puts budget on every coordinate, which the sparse steps
    # take back: within 10 % (at 5 %, one sample in ~30 stays standing, depending on the draw)
    for random_start, factor in ((False, 1.05), (True, 1.1)):
        above = PGD("l1", steps=10, random_start=random_start)(model, x, batch, OBJ, eps=factor * radius, bounds=BOX)
        assert fooled(model, above, labels).all()
        assert (lp_norm(above - x, "l1") <= factor * radius * (1 + 1e-9)).all()
        assert above.min() >= 0 and above.max() <= 1
    assert fooled(model, pgd(model, x, labels, eps=1.1 * radius, norm="l1", bounds=BOX), labels).all()
    for random_start in (True, False):
        below = PGD("l1", steps=20, random_start=random_start)(model, x, batch, OBJ, eps=0.95 * radius, bounds=BOX)
        assert not fooled(model, below, labels).any()


def test_pgd_l1_unbounded_reaches_the_vertex_with_shrinking_sparse_steps():
    """Unbounded, the optimum puts all of eps on the largest |w_i|; with 2048 inputs the first step moves 20
    coordinates, and the shrinking step width still ends on the largest one."""
    g = torch.Generator().manual_seed(1)
    d = 2048
    w = torch.randn(d, generator=g, dtype=torch.float64) / d**0.5  # logits of order 1: CE does not saturate
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2, bias=False, dtype=torch.float64))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros_like(w), w]))
    x = torch.randn(16, 1, 8, 16, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        f = model(x)[:, 1]
    labels, radius = (f > 0).long(), f.abs() / w.abs().max()
    for random_start in (False, True):
        above = PGD("l1", steps=10, random_start=random_start)(model, x, {"label": labels}, OBJ, eps=1.05 * radius,
                                                               bounds=None)
        assert fooled(model, above, labels).all()
    below = PGD("l1", steps=20)(model, x, {"label": labels}, OBJ, eps=0.95 * radius, bounds=None)
    assert not fooled(model, below, labels).any()


def test_l1_curve_suite_and_robust_accuracy_agree_with_the_radii():
    torch.manual_seed(0)
    model, x, labels, radius = box_problem((12, 1, 6, 8))
    ordered = radius.sort().values
    eps_values = [0.0, float(ordered[4:6].mean()), float(ordered[-1]) * 1.05]  # between radii, above all
    points = curve_suite("l1").curve(model, x, {"label": labels}, OBJ, eps_values=eps_values, bounds=BOX)
    for eps, point in zip(eps_values, points):
        assert torch.equal(fooled(model, point, labels), radius <= eps)
        assert (lp_norm(point - x, "l1") <= eps * (1 + 1e-9) + 1e-12).all()
    expected = float((radius > eps_values[1]).double().mean())
    assert robust_accuracy(model, x, labels, eps=eps_values[1], norm="l1", suite="curve", bounds=BOX) == \
        pytest.approx(expected)


def test_attacks_without_an_l1_form_refuse_it_by_name():
    model, x, labels, _ = box_problem((4, 1, 3, 3))
    cases = [(lambda: FGSM("l1"), "FGSM"), (lambda: APGD("l1"), "APGD"), (lambda: DAG("l1"), "DAG"),
             (lambda: Square("l1"), "Square"),
             (lambda: fgsm_attack(model, x, {"label": labels}, OBJ, threat=ThreatModel("l1", 0.1, BOX)), "FGSM"),
             (lambda: directional_attack(model, x, {"label": labels}, OBJ, threat=ThreatModel("l1", 0.1, BOX)),
              "directional_attack"),
             (lambda: robust_accuracy(model, x, labels, eps=0.1, norm="l1", suite="standard"), "APGD")]
    for make, who in cases:
        with pytest.raises(ValueError, match=rf"{who}.*'l1'|'l1'.*{who}"):
            make()
