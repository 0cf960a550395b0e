"""adv=margin (seed 004's margin-based adversarial training): the boundary search against a linear classifier's
exact distance, the margin update rules, the loss, state through checkpoints and resume, and every task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose_config
from medrobust.attacks import PGD
from medrobust.defenses import Adversary, MarginObjective
from medrobust.defenses.margin import boundary_search
from medrobust.runner import build_callbacks, build_data_and_module, build_trainer
from test_resume import assert_same_run, fit, stop_and_resume


class LinearBinary(nn.Module):
    """Logits ``[0, w.x + b]``: class 1 exactly where ``w.x + b > 0``, at L2 distance ``|w.x + b| / |w|``."""

    intensity, input_bounds = None, None

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)

    def attack_loss(self, output, batch):
        return F.cross_entropy(output, batch["label"], reduction="none")

    def is_correct(self, output, batch):
        return output.argmax(1) == batch["label"]

    def log(self, *args, **kwargs):  # Defense.log goes through LightningModule.log; no trainer here
        pass


def _linear_case():
    torch.manual_seed(0)
    w = torch.randn(12)
    model = LinearBinary(w, b=0.1)
    x = torch.randn(5, 1, 3, 4)
    label = (model(x).argmax(1)).clone()
    label[4] = 1 - label[4]  # the last sample is wrong on the clean image
    distance = (x.flatten(1) @ w + 0.1).abs() / w.norm()
    return model, x, {"image": x, "label": label, "id": [f"s{i}" for i in range(5)]}, distance


def test_bisection_finds_a_linear_classifiers_exact_distance_to_its_boundary():
    model, x, batch, distance = _linear_case()
    eps = distance * torch.tensor([2.0, 1.5, 3.0, 0.5, 2.0])  # sample 3's ball stops short of the boundary
    found = boundary_search(model, model, x, batch, eps, norm="l2", steps=20, rel_step=0.2, bounds=None,
                            bisection_steps=30)
    assert found.clean_correct.tolist() == [True, True, True, True, False]
    assert found.found.tolist() == [True, True, True, False, False]
    assert torch.allclose(found.distance[:3], distance[:3], rtol=1e-4)
    assert math.isinf(found.distance[3]) and math.isinf(found.distance[4])
    with torch.no_grad():  # the returned boundary points are on the wrong side, a hair from the boundary
        assert not model.is_correct(model(found.x_adv[:3]), {"label": batch["label"][:3]}).any()
    # the sample whose ball is too small ends on its surface, still correct
    assert torch.allclose((found.x_adv[3] - x[3]).norm(), eps[3], rtol=1e-4)


def test_margins_follow_the_update_rules():
    model, x, batch, distance = _linear_case()
    eps_max = 4 * float(distance.max())
    defense = MarginObjective(rel_margin_step=0.1, bisection_steps=30)
    delta = 0.1 * eps_max
    start = [1.5 * float(distance[0]), 0.5 * float(distance[1]), 0.5 * eps_max, 1.0, 1.0]
    defense.margins = {f"s{i}": m for i, m in enumerate(start)}
    adversary = Adversary(PGD(norm="l2", steps=20, rel_step_size=0.2, random_start=False), model, eps_max)
    loss = defense(model, batch, adversary)
    assert loss.dim() == 0 and torch.isfinite(loss)
    m = defense.margins
    # found at d < E: halfway to it; not found: + delta; wrong when clean: delta
    assert m["s0"] == pytest.approx(max((start[0] + float(distance[0])) / 2, delta), rel=1e-4)
    assert m["s1"] == pytest.approx(start[1] + delta, rel=1e-5)
    assert m["s4"] == pytest.approx(delta, rel=1e-6)
    assert all(0 <= v <= eps_max + 1e-6 for v in m.values())
    # a margin never passes eps_max
    defense.margins = {f"s{i}": eps_max for i in range(5)}
    defense(model, batch, Adversary(PGD(norm="l2", steps=2, rel_step_size=0.2, random_start=False), model, 1e-3))
    assert all(v <= 1e-3 + 1e-9 for v in defense.margins.values())


def test_loss_is_half_clean_half_at_the_correct_samples_adversarial_points():
    model, x, batch, distance = _linear_case()
    eps_max = 4 * float(distance.max())
    margins = torch.tensor([1.5, 1.5, 1.5, 0.5, 1.0]) * distance  # boundaries within reach but for sample 3
    defense = MarginObjective(rel_margin_step=0.1, bisection_steps=30)
    defense.margins = {f"s{i}": float(m) for i, m in enumerate(margins)}
    adversary = Adversary(PGD(norm="l2", steps=20, rel_step_size=0.2, random_start=False), model, eps_max)
    loss = defense(model, batch, adversary)
    search = boundary_search(model, model, x, batch, margins, norm="l2", steps=20, rel_step=0.2, bounds=None,
                             bisection_steps=30)
    correct = [0, 1, 2, 3]
    adversarial = model.attack_loss(model(search.x_adv[correct]), {"label": batch["label"][correct]})
    assert adversarial[:3] == pytest.approx([math.log(2)] * 3, abs=1e-3)  # at the boundary: equal logits
    expected = 0.5 * model.attack_loss(model(x), batch).mean() + 0.5 * adversarial.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_missing_sample_ids_name_what_is_needed():
    model, x, batch, _ = _linear_case()
    defense = MarginObjective()
    adversary = Adversary(PGD(norm="l2", steps=2, random_start=False), model, 1.0)
    with pytest.raises(KeyError, match=r"batch\['id'\]"):
        defense(model, {"image": x, "label": batch["label"]}, adversary)


@pytest.mark.parametrize(("kwargs", "key"), [(dict(rel_margin_step=0), "rel_margin_step"),
                                             (dict(bisection_steps=0), "bisection_steps"),
                                             (dict(clean_weight=1.0), "clean_weight")])
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        MarginObjective(**kwargs)


# every task trains with adv=margin in tests/test_contract.py; here a classifier and a dense task, looked into
@pytest.mark.parametrize("task", ["lidc", "afids"])
def test_margins_reach_the_checkpoint_and_their_figure(tiny_for, task, tmp_path):
    cfg = compose_config("train", [*tiny_for(task), "adv=margin", "adv.attack.steps=3", "eval=none",
                                   "trainer.max_epochs=2"], tmp_path)  # fmt: skip
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    trainer.fit(module, datamodule=datamodule)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("AdversarialTraining")]
    margins = state["defense"]["margins"]
    assert margins and all(0 <= v <= 0.5 + 1e-6 for v in margins.values())
    assert [epoch for epoch, _ in state["defense"]["history"]] == [0, 1]
    assert (tmp_path / "curves" / "train_margins.png").is_file()


@pytest.mark.slow
def test_margin_training_resumes_exactly(tiny_for, tmp_path):
    overrides = [*tiny_for("lidc"), "adv=margin", "adv.attack.steps=3", "trainer.deterministic=true",
                 "eval.eps=[0.0,0.004]", "test=false"]
    fit(overrides, tmp_path / "straight", max_epochs=2)
    stop_and_resume(overrides, tmp_path / "resumed")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow
def test_margins_merge_across_ddp_ranks(tiny_for, tmp_path):
    """Two ranks train on different samples; the checkpoint (rank 0's) holds the margins of both ranks' samples."""
    from hydra.utils import instantiate

    cfg = compose_config("train", [*tiny_for("lidc"), "adv=margin", "adv.attack.steps=3", "eval=none"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=False, strategy="ddp_spawn", devices=2)
    trainer.fit(module, datamodule=datamodule)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("AdversarialTraining")]
    per_rank = cfg.trainer.limit_train_batches * cfg.data.batch_size  # what one rank trained on
    assert len(state["defense"]["margins"]) == 2 * per_rank
