"""ShapeTask's contract on hand-made outputs with known answers: loss, correctness, divergence, metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medrobust.attacks.core.batch import float_output, index_output
from medrobust.tasks.shape import ShapeTask
from medrobust.tasks.shape_metrics import mask_dice

K, H = 8, 16


class FixedOutput(nn.Module):
    """A 'network' whose output is set by the test (the contract is judged on outputs, not on training)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.output = None

    def forward(self, x):
        return self.output


def _circle(radius: float, centre: float = (H - 1) / 2) -> torch.Tensor:
    t = torch.arange(K) * 2 * math.pi / K
    return torch.stack([centre - radius * torch.cos(t), centre - radius * torch.sin(t)], dim=-1)


def _batch(n: int = 2) -> dict:
    mask = torch.zeros(n, H, H, dtype=torch.long)
    mask[:, 4:12, 4:12] = 1
    return {"image": torch.zeros(n, 1, H, H), "points": _circle(4.0).expand(n, K, 2).clone(), "mask": mask,
            "spacing": torch.full((n, 2), 0.5)}


def _output(batch: dict, shift: float = 0.0, logit: float = 20.0) -> dict:
    logits = (batch["mask"].float() * 2 - 1)[:, None] * logit
    return {"points": batch["points"] + torch.tensor([shift, 0.0]), "mask": logits}


@pytest.fixture
def task() -> ShapeTask:
    return ShapeTask(FixedOutput(), num_points=K, radius_px=2.0, memory_format="contiguous")


def test_a_perfect_outline_and_mask_cost_almost_nothing(task):
    batch = _batch()
    loss = task.attack_loss(_output(batch), batch)
    assert loss.shape == (2,) and bool((loss < 0.01).all())


def test_the_point_term_is_the_mean_point_error_in_pixels_times_its_weight(task):
    batch = _batch()
    moved = task.attack_loss(_output(batch, shift=3.0), batch) - task.attack_loss(_output(batch), batch)
    assert torch.allclose(moved, torch.full((2,), 0.1 * 3.0), atol=1e-3)


def test_correct_exactly_within_the_radius_and_the_margin_says_so(task):
    batch = _batch()
    for shift, correct in ((1.5, True), (2.5, False)):
        output = _output(batch, shift=shift)
        assert bool((task.is_correct(output, batch) == correct).all())
        margin = task.correct_margin(output, batch)
        assert torch.allclose(margin, torch.full((2,), 2.0 - shift), atol=1e-3)


def test_divergence_zero_for_equal_outputs_and_its_point_gradient_matches_the_formula(task):
    batch = _batch()
    clean = _output(batch, logit=1.0)
    assert torch.allclose(task.output_divergence(clean, clean, batch), torch.zeros(2), atol=1e-6)
    adversarial = {"points": (clean["points"] + torch.randn(2, K, 2)).requires_grad_(),
                   "mask": clean["mask"].clone().requires_grad_()}
    task.output_divergence(clean, adversarial, batch).sum().backward()
    expected = 2 * (adversarial["points"].detach() - clean["points"]) / K  # d/dq mean_k |q_k - p_k|^2
    assert torch.allclose(adversarial["points"].grad, expected, atol=1e-5)
    assert adversarial["mask"].grad.abs().max() < 1e-6  # the KL is at its minimum where the masks agree


def test_metrics_in_pixels_and_mm_dice_and_shift(task):
    batch = _batch()
    metrics = {name: metric for name, metric in task.robust_metrics().items()}
    clean = _output(batch)
    adversarial = _output(batch, shift=3.0, logit=-20.0)  # every point 3 px off, empty mask
    for metric in metrics.values():
        metric.update(*task.metric_inputs(adversarial, batch, reference=clean))
    values = {name: float(metric.compute()) for name, metric in metrics.items()}
    assert values["mrse"] == pytest.approx(3.0, abs=1e-4)
    assert values["mrse_mm"] == pytest.approx(1.5, abs=1e-4)  # spacing 0.5 mm
    assert values["dice"] == pytest.approx(0.0)
    assert values["shape_shift"] == pytest.approx(3.0, abs=1e-4)
    assert values["accuracy"] == 0.0
    assert "shape_shift" not in task.clean_metrics()


def test_mask_dice_known_values():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2], b[0, :1] = True, True  # 8 and 4 pixels, 4 shared: 2 * 4 / 12
    a[1, 0, 0] = True  # one empty
    assert torch.allclose(mask_dice(a, b), torch.tensor([8 / 12, 0.0, 1.0], dtype=torch.float64))


def test_forward_names_what_a_shape_network_must_give(task):
    task.net.output = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="points"):
        task(torch.zeros(2, 1, H, H))


def test_bad_settings_and_mismatched_batches_are_named():
    with pytest.raises(ValueError, match="num_points"):
        ShapeTask(FixedOutput(), num_points=2)
    with pytest.raises(ValueError, match="radius_px"):
        ShapeTask(FixedOutput(), num_points=K, radius_px=0)
    task = ShapeTask(FixedOutput(), num_points=K)
    batch = _batch()
    output = _output(batch)
    batch["points"] = batch["points"][:, :4]
    with pytest.raises(ValueError, match=r"batch\['points'\]"):
        task.attack_loss(output, batch)


def test_dict_outputs_are_indexed_and_cast_as_tensors_are():
    output = {"points": torch.arange(12.0).reshape(3, 2, 2).bfloat16(), "mask": torch.zeros(3, 1, 2, 2)}
    picked = index_output(output, slice(1, 3), 3)
    assert picked["points"].shape == (2, 2, 2) and picked["mask"].shape == (2, 1, 2, 2)
    assert float_output(output)["points"].dtype == torch.float32
    assert torch.equal(index_output(torch.arange(3), torch.tensor([2, 0]), 3), torch.tensor([2, 0]))
