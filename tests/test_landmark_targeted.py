"""The targeted landmark attack (Yao et al. 2020) on models whose coordinates are linear in the input, where the
smallest eps that moves a landmark by d mm (with another pinned) is known exactly: analytically for one moving
coordinate, by a linear program with a pinned one. Its success rate and target error in an evaluation's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from medrobust.attacks import PGD, LandmarkTargeted
from medrobust.attacks.landmarks.targeted import AIM_KEY
from medrobust.callbacks import RobustnessEvaluation
from medrobust.reporting import summary_markdown
from medrobust.reporting.examples import save_example_grid
from medrobust.tasks import LandmarkTask

SHAPE = (9, 7)  # 2-D images; normalised coordinate u -> voxel (n - 1) / 2 * (u + 1) along each axis
SPACING = (1.5, 0.8)  # mm per voxel
HALF = (SHAPE[0] - 1) / 2  # voxels per normalised unit along axis 0


def _linear_task(rows: dict[int, torch.Tensor]) -> LandmarkTask:
    """Two landmarks regressed linearly: output unit ``i`` (landmark ``i // 2``, axis ``i % 2``) is
    ``rows[i] . (x - 0.5)``, near the image centre for images near 0.5; the other outputs are 0 (the centre)."""
    inputs = SHAPE[0] * SHAPE[1]
    net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 4))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.zero_()
        for unit, row in rows.items():
            net[1].weight[unit] = row
            net[1].bias[unit] = -0.5 * row.sum()
    return LandmarkTask(net, num_landmarks=2, landmark_names=["AC", "PC"], correct="mre", radius_mm=1e6).eval()


def _batch(n: int) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(3)
    x = torch.rand(n, 1, *SHAPE) * 0.02 + 0.49  # far from the bounds: they never bind at these eps
    return x, {"image": x, "landmarks": torch.full((n, 2, 2), 3.0), "spacing": torch.tensor(SPACING).expand(n, 2)}


def _success(attack: LandmarkTargeted, task: LandmarkTask, x: torch.Tensor, batch: dict, eps: float) -> torch.Tensor:
    x_adv = attack(task, x, batch, task, eps=eps, bounds=(0.0, 1.0))
    size = (x_adv - x).flatten(1).abs().amax(1) if attack.norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()  # inside the threat model's ball
    with torch.no_grad():
        return attack.extra_values(task, task(x_adv), task(x), batch)["target_success"]


@pytest.mark.parametrize("norm", ("linf", "l2"))
def test_moving_one_landmark_succeeds_just_above_its_exact_minimal_eps(norm):
    """Only AC's first coordinate depends on x (weights w): it moves at most ``HALF |w|_1 eps`` voxels (Linf) or
    ``HALF |w|_2 eps`` (L2); AC must get within r = 2 mm of a target 5 mm away, so the smallest eps is
    ``(5 - 2) / SPACING[0] / (HALF |w|)``. PC does not depend on x: pinned for free."""
    torch.manual_seed(0)
    w = torch.randn(SHAPE[0] * SHAPE[1])
    task = _linear_task({0: w})
    x, batch = _batch(4)
    size = w.abs().sum() if norm == "linf" else w.norm()
    exact = float((5.0 - 2.0) / SPACING[0] / (HALF * size))
    attack = LandmarkTargeted(PGD(norm, steps=20, random_start=False), move=["AC"], shift_mm=5.0, radius_mm=2.0)
    assert _success(attack, task, x, batch, 1.02 * exact).all()
    assert not _success(attack, task, x, batch, 0.98 * exact).any()  # the rule: 5 - 0.98 * 3 > 2 mm everywhere


def test_moving_one_landmark_while_pinning_a_coupled_one_meets_the_linear_programs_eps():
    """AC's and PC's first coordinates share pixels (rows a0, a1 with correlated weights): moving AC 5 mm drags PC
    along unless the attack holds it. The smallest Linf eps with AC within r of its target and PC within r of where
    it was is a linear program; PGD on Yao's adaptively weighted distances (beyond half the radius) reaches success at 1.05x it. Without the
    pin the step is AC's own gradient sign, which drags PC outside the radius: the pin is what the attack solves."""
    torch.manual_seed(1)
    n = SHAPE[0] * SHAPE[1]
    a0 = torch.randn(n)
    a1 = 0.8 * a0 + 0.6 * torch.randn(n)
    task = _linear_task({0: a0, 2: a1})
    x, batch = _batch(3)
    shift, radius = 5.0, 1.0  # mm
    # voxels per unit of delta along axis 0: HALF * a; mm: times SPACING[0]
    g0, g1 = (HALF * SPACING[0] * a.double().numpy() for a in (a0, a1))
    # variables (delta_1..n, t): minimise t with |delta_i| <= t, shift - r <= g0.delta <= shift + r, |g1.delta| <= r
    eye = np.eye(n)
    A = np.vstack([np.hstack([eye, -np.ones((n, 1))]), np.hstack([-eye, -np.ones((n, 1))]),
                   np.append(-g0, 0), np.append(g0, 0), np.append(g1, 0), np.append(-g1, 0)])
    b = np.concatenate([np.zeros(2 * n), [-(shift - radius), shift + radius, radius, radius]])
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    solution = linprog(cost, A_ub=A, b_ub=b, bounds=[(None, None)] * (n + 1), method="highs")
    assert solution.status == 0
    exact = float(solution.x[-1])
    alone = float((shift - radius) / np.abs(g0).sum())  # without the pin
    assert exact > 1.05 * alone  # the pin costs budget: the case is not trivial
    attack = LandmarkTargeted(PGD("linf", steps=100, random_start=False), move=["AC"], shift_mm=shift,
                              radius_mm=radius)
    assert _success(attack, task, x, batch, 1.05 * exact).all()
    assert not _success(attack, task, x, batch, 0.97 * exact).any()
    # moving AC as far as the ball allows, PC unheld: its sign step drags PC outside the radius
    x_far = x + 1.05 * exact * torch.sign(torch.as_tensor(g0, dtype=x.dtype)).view(1, 1, *SHAPE)
    with torch.no_grad():
        dragged = (task(x_far) - task(x))[:, 1, 0].abs() * SPACING[0]
    assert (dragged > radius).all()


def test_aims_shift_in_mm_per_axis_or_onto_another_landmark_and_stay_in_the_image():
    task = _linear_task({})
    with torch.no_grad():  # AC at the centre (4, 3), PC at (6, 1.5)
        task.net[1].bias.copy_(torch.tensor([0.0, 0.0, 0.5, -0.5]))
    x, batch = _batch(2)
    with torch.no_grad():
        clean = task(x)
    shifted, moved = LandmarkTargeted(PGD(), move=["AC"], shift_mm=[3.0, -1.6]).aims(task, clean, batch, SHAPE)
    assert moved.tolist() == [True, False]
    assert torch.allclose(shifted[:, 0], torch.tensor([4.0 + 2.0, 3.0 - 2.0]).expand(2, 2))  # 3 / 1.5, -1.6 / 0.8
    assert torch.allclose(shifted[:, 1], clean[:, 1])  # pinned where the clean image put it
    onto, _ = LandmarkTargeted(PGD(), move=[0], onto="PC").aims(task, clean, batch, SHAPE)
    assert torch.allclose(onto[:, 0], clean[:, 1])
    far, _ = LandmarkTargeted(PGD(), move=["PC"], shift_mm=100.0).aims(task, clean, batch, SHAPE)
    assert torch.allclose(far[:, 1], torch.tensor([SHAPE[0] - 1.0, 1.5]).expand(2, 2))  # clipped into the image
    with pytest.raises(ValueError, match="'GENU'.*neither one of the task's landmarks"):
        LandmarkTargeted(PGD(), move=["GENU"]).aims(task, clean, batch, SHAPE)
    with pytest.raises(ValueError, match="shift_mm must be one number or 2"):
        LandmarkTargeted(PGD(), shift_mm=[1.0, 2.0, 3.0]).aims(task, clean, batch, SHAPE)
    assert AIM_KEY not in batch


def test_an_evaluation_reports_the_success_rate_and_target_error_at_each_eps(tmp_path):
    torch.manual_seed(0)
    task = _linear_task({0: torch.randn(SHAPE[0] * SHAPE[1])})
    task.input_bounds = (0.0, 1.0)
    x, batch = _batch(4)
    attack = LandmarkTargeted(PGD("linf", steps=10, random_start=False), move=["AC"], shift_mm=4.0, radius_mm=1.0)
    evaluation = RobustnessEvaluation([attack], eps=[0.0, 0.001, 0.05])
    with torch.inference_mode():  # as Lightning's validation and test loops call it
        result = evaluation.evaluate(task, [batch], split="val", epoch=0, max_batches=None)
    rows = {(row["eps"], row["metric"]): row for row in result.rows}
    assert rows[0.05, "target_success"]["value"] == 1.0 and rows[0.05, "target_error"]["value"] <= 1.0
    assert rows[0.001, "target_success"]["value"] == 0.0 and rows[0.001, "target_error"]["value"] > 3.0
    assert rows[0.05, "target_success"]["points"] == "each_eps"
    assert (0.0, "target_success") not in rows  # no attack at eps 0
    assert evaluation._masking_flags(task, result, "val") == []  # a targeted shift is no masking evidence
    table = summary_markdown(result.rows, "val", title="t").splitlines()
    header = next(line for line in table if line.startswith("| attack"))
    clean = next(line for line in table if line.startswith("| clean"))
    assert header.endswith("| target_success |") and clean.endswith("|  |  |")  # no target at eps 0: blank cells
    example = result.examples[attack.label]
    eps, x_shown, x_adv, marks = example.eps, example.x, example.x_adv, example.masks  # the largest eps, drawn with the targets named
    assert set(marks) == {"ground truth", "clean prediction", "adversarial prediction", "targets"}
    assert marks["targets"].point_names == ("AC target",) and marks["targets"].shape == (4, 1, 2)
    assert torch.allclose(marks["targets"][:, 0, 0], marks["clean prediction"][:, 0, 0] + 4.0 / SPACING[0])
    path = save_example_grid(x_shown, x_adv, tmp_path / "targeted.png", title="targeted", masks=marks)
    assert path.stat().st_size > 0
