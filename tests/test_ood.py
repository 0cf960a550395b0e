"""Seed 002's out-of-distribution attack: known answers on a linear shape network, the OOD sources, and eval=ood
end to end on a tiny task=lidc_shape run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from medrobust.attacks.shape import OODShapeAttack, mean_point_error
from medrobust.data.intensity import IntensityWindow
from medrobust.evaluation.ood_sources import ood_sources
from conftest import compose_config

SIDE, K = 16, 4  # 16 x 16 images (N = 256), 4 outline points: A is 8 x 256


def dense_rows() -> torch.Tensor:
    """``(2K, N)`` orthonormal rows, dense (every pixel moves every coordinate)."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(SIDE * SIDE, 2 * K, dtype=torch.float64, generator=gen))
    return q.T.float().contiguous()


def block_rows() -> torch.Tensor:
    """``(2K, N)`` orthonormal rows on disjoint pixel blocks."""
    a, width = torch.zeros(2 * K, SIDE * SIDE), SIDE * SIDE // (2 * K)
    for i in range(2 * K):
        a[i, i * width:(i + 1) * width] = width**-0.5
    return a


class LinearShapeNet(nn.Module):
    """points = A @ x.flatten() + b; a mask head that ignores x (dice_weight=0 in the known-answer tests)."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(rows), nn.Parameter(torch.full((2 * K,), 8.0))
        self.mask_bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        points = (x.flatten(1) @ self.a.T + self.b).view(-1, K, 2)
        return {"points": points, "mask": self.mask_bias.expand(len(x), 1, SIDE, SIDE)}


def problem(rows: torch.Tensor, batch: int = 3):
    """Model, images in [0, 1], targets, and the residual norms ``||r|| = ||t - (A x + b)||`` ``(B,)``."""
    gen = torch.Generator().manual_seed(1)
    model = LinearShapeNet(rows)
    x = torch.rand(batch, 1, SIDE, SIDE, generator=gen)
    targets = torch.randn(batch, K, 2, generator=gen) * 2 + 8
    with torch.no_grad():
        residual = (targets - model(x)["points"]).flatten(1).norm(dim=1)
    return model, x, targets, torch.zeros(batch, SIDE, SIDE), residual


def test_reaches_the_target_when_the_budget_covers_the_minimum_norm():
    """Rows on disjoint blocks: Adamax's per-coordinate steps stay in A's row space, so 1.01 x the min-norm ||r||
    suffices. Dense rows: Adamax's coordinate-wise scaling also moves x where A does not look (about a fifth more
    norm than the min-norm perturbation here), so the target is reached at 1.5 ||r||, not at 1.01 ||r||."""
    for rows, factor in ((block_rows(), 1.01), (dense_rows(), 1.5)):
        model, x, targets, mask, residual = problem(rows)
        x_adv = OODShapeAttack(steps=300, lr=0.05, dice_weight=0.0)(model, x, targets, mask, budget=residual * factor)
        with torch.no_grad():
            assert mean_point_error(model(x_adv)["points"], targets).max() < 1e-2
        assert ((x_adv - x).flatten(1).norm(dim=1) <= residual * factor * (1 + 1e-5)).all()


def test_half_the_budget_gets_as_close_as_the_ball_allows():
    """With budget ||r|| / 2 the best reachable point error (norm over all coordinates) is ||r|| - budget."""
    model, x, targets, mask, residual = problem(dense_rows())
    budget = residual / 2
    x_adv = OODShapeAttack(steps=300, lr=0.01, dice_weight=0.0)(model, x, targets, mask, budget=budget)
    with torch.no_grad():
        error = (model(x_adv)["points"] - targets).flatten(1).norm(dim=1)
    assert (error <= (residual - budget) * 1.02).all(), (error / (residual - budget)).tolist()


def test_budget_zero_bounds_ball_and_modes():
    model, x, targets, mask, residual = problem(dense_rows())
    model.train()
    attack = OODShapeAttack(steps=30, lr=0.05, dice_weight=1.0)
    assert torch.equal(attack(model, x, targets, mask, budget=0.0, bounds=(0.0, 1.0)), x)
    budget = torch.tensor([0.0, 2.0, 50.0])  # per sample; 50 pushes many pixels against the bounds
    x_adv = attack(model, x, targets, mask, budget=budget, bounds=(0.0, 1.0))
    assert torch.equal(x_adv[0], x[0])
    assert ((x_adv - x).flatten(1).norm(dim=1) <= budget * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    with torch.no_grad():  # the best point kept is never farther from the target than the start
        before, after = (mean_point_error(model(image)["points"], targets) for image in (x, x_adv))
        assert (after <= before).all()


def test_bad_arguments_name_their_key():
    for kwargs, key in (({"steps": 0}, "eval.steps"), ({"lr": 0.0}, "eval.lr"),
                        ({"dice_weight": -1.0}, "eval.dice_weight")):
        with pytest.raises(ValueError, match=key):
            OODShapeAttack(**kwargs)
    model, x, targets, mask, _ = problem(dense_rows())
    with pytest.raises(ValueError, match="inside bounds"):
        OODShapeAttack(steps=2)(model, x + 2, targets, mask, budget=1.0, bounds=(0.0, 1.0))


def test_sources_have_the_shape_bounds_and_seed():
    reference = torch.rand(4, 1, 32, 32) * 0.4 + 0.1
    window = IntensityWindow(-1000.0, 400.0)
    made = [ood_sources(["noise", "lung", "other"], 3, reference, (32, 32), window, (0.0, 1.0), seed)
            for seed in (0, 0, 1)]
    for name, images in made[0].items():
        assert images.shape == (3, 1, 32, 32) and images.dtype == torch.float32, name
        assert images.min() >= 0 and images.max() <= 1, name
        assert torch.equal(images, made[1][name]) and not torch.equal(images, made[2][name]), name
        assert images.std() > 0.01, name  # not a constant image
    assert abs(float(made[0]["noise"].mean()) - float(reference.mean())) < 0.05
    with pytest.raises(ValueError, match="choose from"):
        ood_sources(["nois"], 1, reference, (32, 32), window, (0.0, 1.0), 0)


def test_the_callback_checks_its_arguments_and_the_task():
    from types import SimpleNamespace

    from medrobust.callbacks import OODEvaluation

    for kwargs, key in (({"sources": ["noise", "mri"]}, "eval.sources"), ({"budgets": [1.0, -1.0]}, "eval.budgets"),
                        ({"check_quantile": 1.0}, "eval.check_quantile"), ({"steps": 0}, "eval.steps")):
        with pytest.raises(ValueError, match=key):
            OODEvaluation(**kwargs)
    assert OODEvaluation(budgets=[15.0, 7.5]).budgets == [0.0, 7.5, 15.0]  # the no-attack row always
    with pytest.raises(TypeError, match=r"eval=ood needs a shape task \(task=lidc_shape\)"):
        OODEvaluation().setup(SimpleNamespace(datamodule=None), nn.Linear(2, 2), "test")


def test_eval_ood_writes_its_table_and_section(tiny_for, tmp_path):
    from medrobust.runner import build_callbacks, build_data_and_module, build_loggers, build_trainer

    cfg = compose_config("train", [*tiny_for("lidc_shape"), "eval=ood", "eval.steps=20", "eval.n_targets=2",
                                   "eval.budgets=[0.0,1.0,4.0]"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    trainer.test(module, datamodule=datamodule)  # untrained weights: what is tested is the wiring
    with open(Path(tmp_path) / "ood.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = {(r["source"], float(r["budget"])): r for r in rows}
    expected = {(s, b) for s in ("noise", "lung", "other") for b in (0.0, 1.0, 4.0)} | {("in_distribution", 0.0)}
    assert set(table) == expected
    for source in ("noise", "lung", "other"):
        assert float(table[source, 0.0]["mean_l2"]) == 0
        assert int(table[source, 4.0]["n"]) == 2 and float(table[source, 4.0]["mean_l2"]) <= 4.0 + 1e-4
        for budget in (1.0, 4.0):
            assert float(table[source, budget]["mrse_to_target"]) <= float(table[source, 0.0]["mrse_to_target"]) + 1e-5
    summary = (Path(tmp_path) / "summary.md").read_text()
    assert "## Out-of-distribution attack" in summary and "from lung images, budget 4" in summary.lower()
    assert all((Path(tmp_path) / "examples" / f"ood_{s}.png").is_file() for s in ("noise", "lung", "other"))
