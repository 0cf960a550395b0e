"""TOG and DAG for detection on detectors whose heatmap logits are linear in the input, where the smallest Linf eps
that moves a peak across the operating point is known exactly: ``|z - logit(thr)| / ||w||_1`` for a logit
``z = b + w . (x - 0.5)`` (images near 0.5: the bounds never bind). Every cell but the attacked ones is constant, so
no other detection can come or go. Then the refusal on other tasks and the attacks' metrics in an evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medrobust.attacks import PGD, TOG, DetectionDAG
from medrobust.attacks.detection.tog import peaks_below
from medrobust.callbacks import RobustnessEvaluation
from medrobust.models.centernet import CenterNet
from medrobust.tasks import ClassificationTask
from medrobust.tasks.base import lacking
from medrobust.tasks.detection import DetectionTask

THRESHOLD = 0.5  # the task's score_threshold: logit 0
BACKGROUND = -6.0  # the constant logit of every cell not attacked: never a detection
TAU = {"heatmap": 1.0, "size": 1.0, "offset": 1.0}


class LinearHeads(nn.Module):
    """CenterNet-shaped output: heatmap logits ``BACKGROUND`` but at ``peaks`` ``{(class, cell): (bias, w)}``, where
    they are ``bias + w . (x - 0.5)``; boxes 2 cells wide (size 2), centred in their cells (offset 0.5)."""

    def __init__(self, shape: tuple[int, ...], stride: int, classes: int, peaks: dict) -> None:
        super().__init__()
        self.stride, self.classes = stride, classes
        self.out = tuple(n // stride for n in shape)
        cells = math.prod(self.out)
        self.register_buffer("bias", torch.full((classes * cells,), BACKGROUND))
        self.register_buffer("weight", torch.zeros(classes * cells, math.prod(shape)))
        for (k, cell), (bias, w) in peaks.items():
            self.bias[k * cells + cell] = bias
            self.weight[k * cells + cell] = w

    def forward(self, x: torch.Tensor) -> dict:
        b, d = x.shape[0], len(self.out)
        heat = self.bias + (x.flatten(1) - 0.5) @ self.weight.T
        return {"heatmap": heat.view(b, self.classes, *self.out), "size": x.new_full((b, d, *self.out), 2.0),
                "offset": x.new_full((b, d, *self.out), 0.5)}


def weights(n: int, seed: int) -> torch.Tensor:
    """Random signs, magnitudes in [0.5, 1.5]: DAG's Linf-normalised steps fill every coordinate in a few steps."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) + 0.5) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)


def linear_task(shape, stride, classes, peaks) -> DetectionTask:
    return DetectionTask(LinearHeads(shape, stride, classes, peaks), num_classes=classes, tau=TAU,
                         score_threshold=THRESHOLD, memory_format="contiguous").eval()


def images(n: int, shape, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + 0.02 * (torch.rand(n, 1, *shape, generator=g) - 0.5)
    d = len(shape)
    boxes = torch.cat([torch.zeros(n, 1, d), torch.full((n, 1, d), 4.0)], dim=-1)  # one annotated box each
    valid = torch.ones(n, 1, dtype=torch.bool)
    return x, {"image": x, "boxes": boxes, "labels": torch.zeros(n, 1, dtype=torch.long), "box_valid": valid,
               "box_target": valid.clone()}


def logit(task: DetectionTask, x: torch.Tensor, k: int, cell: int) -> torch.Tensor:
    with torch.no_grad():
        return task(x)["heatmap"].flatten(2)[:, k, cell]


def extra(attack, task, x, x_adv, batch) -> dict:
    with torch.no_grad():
        return attack.extra_values(task, task(x_adv), task(x), batch)


def attacked(attack, task, x, batch, eps: torch.Tensor) -> torch.Tensor:
    x_adv = attack(task, x, batch, task, eps=eps, bounds=(0.0, 1.0))
    assert ((x_adv - x).flatten(1).abs().amax(1) <= eps + 1e-6).all()  # inside the ball (up to fp32 rounding at 0.5)
    return x_adv


def tog(mode: str, **kwargs) -> TOG:
    return TOG(PGD("linf", steps=10, rel_step_size=0.25, random_start=True), mode=mode, **kwargs)  # TOG's setting


SHAPE_2D, STRIDE_2D, PEAK = (16, 16), 4, 5  # a 4 x 4 output; the attacked peak at cell 5, away from the edge


@pytest.mark.parametrize("attack", [tog("vanishing"), tog("untargeted"), DetectionDAG(steps=20, target="next")],
                         ids=["tog-vanishing", "tog-untargeted", "dag"])
def test_a_detection_vanishes_just_above_its_exact_minimal_eps_and_not_below(attack):
    """One class, one peak ``z = 2 + w . (x - 0.5)``: it drops below the operating point at ``eps = z / ||w||_1``
    (the corner ``-eps sign(w)``), and no point of a smaller ball gets it there: the 0.95x part holds by
    construction, the 1.03x part is the attacks' strength. (DAG on one class aims at background whatever
    ``target`` says.)"""
    torch.manual_seed(0)
    w = weights(math.prod(SHAPE_2D), seed=1)
    task = linear_task(SHAPE_2D, STRIDE_2D, 1, {(0, PEAK): (2.0, w)})
    x, batch = images(4, SHAPE_2D)
    exact = logit(task, x, 0, PEAK) / w.abs().sum()
    metric = "dag_success" if isinstance(attack, DetectionDAG) else "tog_success"
    for ratio, expected in ((1.03, 1.0), (0.95, 0.0)):
        x_adv = attacked(attack, task, x, batch, ratio * exact)
        assert (logit(task, x_adv, 0, PEAK) < 0).tolist() == [expected == 1.0] * 4
        assert extra(attack, task, x, x_adv, batch)[metric].tolist() == [expected] * 4


def test_fabrication_raises_a_cell_above_the_operating_point_just_above_its_exact_minimal_eps():
    """A constant detection (logit 3) and a cell at ``z = -1.5 + w . (x - 0.5)``: the second detection appears at
    ``eps = -z / ||w||_1``; below it the count stays at the clean one."""
    w = weights(math.prod(SHAPE_2D), seed=2)
    task = linear_task(SHAPE_2D, STRIDE_2D, 1, {(0, 0): (3.0, torch.zeros_like(w)), (0, 10): (-1.5, w)})
    x, batch = images(3, SHAPE_2D, seed=1)
    exact = -logit(task, x, 0, 10) / w.abs().sum()
    attack = tog("fabrication")
    assert attack.min_fabricated == 1 and attack.extra_metrics == ("tog_success", "fabricated")
    for ratio, expected in ((1.03, 1.0), (0.95, 0.0)):
        values = extra(attack, task, x, attacked(attack, task, x, batch, ratio * exact), batch)
        assert values["tog_success"].tolist() == values["fabricated"].tolist() == [expected] * 3


def test_fabrication_on_peaks_beats_togs_sum_where_two_cells_pull_against_each_other():
    """Two cells at ``z = -1.5 +- w . (x - 0.5)`` (as neighbouring convolution outputs share pixels with gradients of
    opposite signs): TOG's sum over cells (``cells="all"``) is highest with both equal, so PGD on it stays near
    ``z = -1.5`` even at 2x the exact eps, where the default ``cells="peaks"`` climbs the higher cell alone and
    fabricates it at 1.03x, never at 0.95x."""
    w = weights(math.prod(SHAPE_2D), seed=3)
    task = linear_task(SHAPE_2D, STRIDE_2D, 1, {(0, 0): (3.0, torch.zeros_like(w)), (0, 10): (-1.5, w),
                                                (0, 8): (-1.5, -w)})
    x, batch = images(3, SHAPE_2D, seed=2)
    exact = -torch.maximum(logit(task, x, 0, 10), logit(task, x, 0, 8)) / w.abs().sum()
    peaks, whole = tog("fabrication"), tog("fabrication", cells="all")
    assert peaks.cells == "peaks" and peaks.name.startswith("tog-fabrication-pgd")
    assert whole.name.startswith("tog-fabrication-all-pgd")
    for attack, ratio, expected in ((peaks, 1.03, 1.0), (peaks, 0.95, 0.0), (whole, 2.0, 0.0)):
        torch.manual_seed(0)
        values = extra(attack, task, x, attacked(attack, task, x, batch, ratio * exact), batch)
        assert values["tog_success"].tolist() == values["fabricated"].tolist() == [expected] * 3, (attack.cells, ratio)


def test_peaks_below_picks_the_highest_local_maxima_under_the_operating_point():
    """A detection (logit 2) with a higher-than-background neighbour, and two isolated sub-threshold peaks: the
    neighbour is no peak, the detection is above the operating point, so the two isolated ones come first, the
    higher one first, then a flat background cell (a plateau is its own peak); with fewer peaks than asked, the
    highest other cells fill in."""
    heat = torch.full((1, 1, 6, 6), -6.0)
    heat[0, 0, 1, 1], heat[0, 0, 1, 2] = 2.0, -0.5      # a detection and its neighbour
    heat[0, 0, 4, 4], heat[0, 0, 4, 0] = -1.0, -2.0     # isolated peaks below the operating point
    assert peaks_below(heat, 0.5, 3).tolist() == [[-1.0, -2.0, -6.0]]
    assert peaks_below(heat, 0.5, 1).tolist() == [[-1.0]]
    crowded = torch.tensor([[[[2.0, -1.0], [-1.5, -1.0]]]])  # every cell below 0.5 neighbours the detection
    assert peaks_below(crowded, 0.5, 2).tolist() == [[2.0, -1.0]]
    heat3d = torch.full((2, 2, 4, 4, 4), -6.0)
    heat3d[1, 1, 3, 0, 2] = -0.25
    assert peaks_below(heat3d, 0.5, 1)[1].tolist() == [-0.25]


def test_mislabel_turns_each_detection_into_the_other_class_at_the_linear_programs_eps():
    """Two classes at one cell, class 0 at ``z0 = 2 + w0 . (x - 0.5)`` (detected), class 1 at ``z1 = -1 + w1 . (x -
    0.5)``, ``w0`` and ``w1`` on disjoint halves of the pixels: relabelling needs ``z0 < 0 <= z1``, whose smallest
    Linf eps is ``max(z0 / ||w0||_1, -z1 / ||w1||_1)``, here ``z0``'s (class 1 needs about half of it). The boxes
    are the cell's, so the IoU is 1. Below it the new label is found but the old one stays: no success."""
    n = math.prod(SHAPE_2D)
    half = torch.arange(n) < n // 2
    w0, w1 = weights(n, seed=3) * half, weights(n, seed=4) * ~half
    task = linear_task(SHAPE_2D, STRIDE_2D, 2, {(0, PEAK): (2.0, w0), (1, PEAK): (-1.0, w1)})
    x, batch = images(3, SHAPE_2D, seed=2)
    vanish, appear = logit(task, x, 0, PEAK) / w0.abs().sum(), -logit(task, x, 1, PEAK) / w1.abs().sum()
    assert (appear < 0.6 * vanish).all()
    attack = tog("mislabel")
    assert attack.name == "tog-mislabel-ml-pgd10"
    for ratio, expected in ((1.03, 1.0), (0.95, 0.0)):
        values = extra(attack, task, x, attacked(attack, task, x, batch, ratio * torch.maximum(vanish, appear)), batch)
        assert values["tog_success"].tolist() == [expected] * 3
        assert values["relabelled"].tolist() == [1.0] * 3


def test_mislabel_on_a_single_class_task_is_refused_with_the_reason():
    task = linear_task(SHAPE_2D, STRIDE_2D, 1, {(0, PEAK): (2.0, weights(math.prod(SHAPE_2D), seed=1))})
    x, batch = images(2, SHAPE_2D)
    with pytest.raises(ValueError, match=r"TOG mislabel relabels .* DetectionTask has num_classes=1"):
        tog("mislabel")(task, x, batch, task, eps=0.01, bounds=(0.0, 1.0))


def test_a_3d_detection_vanishes_just_above_its_exact_minimal_eps():
    shape = (8, 8, 8)
    w = weights(math.prod(shape), seed=5)
    task = linear_task(shape, 2, 1, {(0, 21): (1.5, w)})  # cell (1, 1, 1) of the 4^3 output
    x, batch = images(2, shape, seed=3)
    batch["boxes"] = torch.tensor([[0.0, 0, 0, 4, 4, 4]]).expand(2, 1, 6)
    exact = logit(task, x, 0, 21) / w.abs().sum()
    attack = tog("vanishing")
    for ratio, expected in ((1.03, 1.0), (0.95, 0.0)):
        values = extra(attack, task, x, attacked(attack, task, x, batch, ratio * exact), batch)
        assert values["tog_success"].tolist() == [expected] * 2
        assert values["detections_left"].tolist() == [1.0 - expected] * 2


def test_a_sample_without_a_clean_detection_is_not_counted_a_vanishing_success():
    w = weights(math.prod(SHAPE_2D), seed=1)
    task = linear_task(SHAPE_2D, STRIDE_2D, 1, {(0, PEAK): (-3.0, w)})  # nothing detected clean
    x, batch = images(2, SHAPE_2D)
    for attack, metric in ((tog("vanishing"), "tog_success"), (DetectionDAG(steps=3), "dag_success")):
        x_adv = attacked(attack, task, x, batch, torch.full((2,), 0.01))
        assert torch.equal(x_adv, x)  # nothing to attack
        assert extra(attack, task, x, x_adv, batch)[metric].isnan().all()


def test_bad_arguments_and_other_tasks_are_refused():
    with pytest.raises(ValueError, match="TOG mode must be one of"):
        tog("hide")
    with pytest.raises(ValueError, match="target .* must be one of"):
        tog("mislabel", target="random")
    with pytest.raises(ValueError, match="TOG cells .* must be one of .*'peaks'.* got 'top'"):
        tog("fabrication", cells="top")
    with pytest.raises(ValueError, match="min_fabricated must be an integer >= 1"):
        tog("fabrication", min_fabricated=0)
    with pytest.raises(ValueError, match="target must be one of"):
        DetectionDAG(target="ml")
    classifier = ClassificationTask(nn.Linear(4, 2), num_classes=2)
    for attack in (tog("vanishing"), DetectionDAG()):
        assert lacking(classifier, attack.requires)[:3] == ["detections", "peak_index", "score_threshold"]
        assert lacking(linear_task(SHAPE_2D, STRIDE_2D, 1, {}), attack.requires) == []


def squares(n: int, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.rand(n, 1, size, size, generator=g)
    x[:, :, 8:16, 8:16] = 0.9
    valid = torch.ones(n, 1, dtype=torch.bool)
    return {"image": x, "boxes": torch.tensor([[8.0, 8.0, 16.0, 16.0]]).expand(n, 1, 4),
            "labels": torch.zeros(n, 1, dtype=torch.long), "box_valid": valid, "box_target": valid.clone()}


def test_an_evaluation_reports_each_attacks_own_metrics_at_each_eps():
    """Through RobustnessEvaluation on a small CenterNet whose heatmap starts near 0.5 (detections clean)."""
    torch.manual_seed(0)
    net = CenterNet(spatial_dims=2, num_classes=1, features=(4, 8), stride=2)
    with torch.no_grad():
        net.heads["heatmap"][-1].bias.fill_(0.3)
    task = DetectionTask(net, tau=TAU, memory_format="contiguous", input_bounds=(0.0, 1.0))
    attacks = [tog("vanishing"), tog("fabrication"), DetectionDAG(steps=5)]
    evaluation = RobustnessEvaluation(attacks, eps=[0.0, 0.002, 0.05])
    with torch.inference_mode():  # as Lightning's validation and test loops call it
        result = evaluation.evaluate(task, [squares(4, 32)], split="val", epoch=0, max_batches=None)
    rows = {(row["attack"], row["eps"], row["metric"]): row for row in result.rows}
    for attack in attacks:
        assert (attack.label, 0.0, attack.extra_metrics[0]) not in rows  # no attack at eps 0
        for eps in (0.002, 0.05):
            success, count = (rows[attack.label, eps, name] for name in attack.extra_metrics)
            assert 0.0 <= success["value"] <= 1.0 and count["value"] >= 0.0
            assert success["points"] == count["points"] == "each_eps"  # a chosen outcome: every sample at each eps
    assert evaluation._masking_flags(task, result, "val") == []  # targeted: no masking evidence
