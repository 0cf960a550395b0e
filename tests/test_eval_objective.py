"""eval.objective: an evaluation's attacks climb one of the task's declared alternative objectives (a shape task's
summed squared point error, seed 002's attack) instead of its training loss; correctness stays the task's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medrobust.attacks import PGD
from medrobust.callbacks import RobustnessEvaluation
from medrobust.data.shape_outline import outline_points
from medrobust.models.shape_net import ShapeNet
from medrobust.tasks.shape import ShapeTask

K, H = 16, 32


@pytest.fixture(scope="module")
def shape_task_and_batch():
    torch.manual_seed(0)
    net = ShapeNet(num_points=K, features=(8, 16, 32), patch_size=H)
    torch.nn.init.normal_(net.point_head.mlp[-1].weight, std=0.05)  # points that follow the image, as a trained head's
    task = ShapeTask(net, num_points=K, input_bounds=(0.0, 1.0), memory_format="contiguous")
    rr, cc = np.mgrid[:H, :H]
    masks = np.stack([(rr - 15.5) ** 2 + (cc - 15.5) ** 2 <= r**2 for r in (5, 7, 9, 6)])
    images = torch.from_numpy(masks[:, None].astype(np.float32)) * 0.6 + 0.2
    batch = {"image": images, "mask": torch.from_numpy(masks.astype(np.int64)),
             "points": torch.from_numpy(np.stack([outline_points(m, K) for m in masks])),
             "spacing": torch.ones(4, 2)}
    return task, batch


def test_the_objective_must_be_one_the_task_declares(shape_task_and_batch):
    task, _ = shape_task_and_batch
    evaluation = RobustnessEvaluation({"pgd": PGD(steps=2)}, objective="dice")
    with pytest.raises(ValueError, match=r"eval.objective='dice': ShapeTask offers \['points'\]"):
        evaluation.setup(None, task, "test")


def test_attacks_climb_the_named_objective_and_judge_by_the_task(shape_task_and_batch):
    task, batch = shape_task_and_batch
    objective = RobustnessEvaluation({"pgd": PGD(steps=2)}, objective="points").objective_of(task)
    with torch.no_grad():
        output = task(batch["image"])
    assert torch.equal(objective.attack_loss(output, batch), task.squared_point_error(output, batch))
    assert torch.equal(objective.is_correct(output, batch), task.is_correct(output, batch))
    assert RobustnessEvaluation({"pgd": PGD(steps=2)}).objective_of(task) is task


def test_an_evaluation_on_the_point_objective_moves_the_outline_further_with_eps(shape_task_and_batch):
    task, batch = shape_task_and_batch
    evaluation = RobustnessEvaluation({"pgd": PGD(steps=5, rel_step_size=0.2)}, eps=[0.02, 0.1], objective="points",
                                      seed=0)
    evaluation.setup(None, task, "test")
    rows = evaluation.evaluate(task, [batch], split="val", epoch=0, max_batches=None).rows
    mrse = {row["eps"]: row["value"] for row in rows if row["metric"] == "mrse"}
    assert mrse[0.0] < mrse[0.02] < mrse[0.1]
    assert {row["points"] for row in rows if row["metric"] == "mrse" and row["eps"] > 0} == {"worst_loss"}
    differs = RobustnessEvaluation({"pgd": PGD(steps=5)}, eps=[0.02]).state_key
    assert evaluation.state_key != differs and "points" in evaluation.state_key
