"""Every task x adv x eval config composes, instantiates and runs one tiny fit + test (3-D tasks: every adv and every eval)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from medrobust.reporting import read_csv
from medrobust.runner import build_callbacks, build_data_and_module, build_loggers, build_trainer
from conftest import CONF, compose_config


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


REGRESSION_ONLY = {"age_shift"}  # evaluations whose attacks shift a regressor's predictions
CLASSIFICATION_TASKS = {"lidc"}
FULL_CROSS = {"lidc"}  # every adv x eval; the 3-D tasks (slower): every adv and every eval, not each pair
DEFAULT_EVAL = {"brainage": "age_shift"}


def _combos() -> list[tuple[str, str, str]]:
    combos = []
    for task in _options("task"):
        evals = [e for e in _options("eval") if not (task in CLASSIFICATION_TASKS and e in REGRESSION_ONLY)]
        if task in FULL_CROSS:
            combos += list(itertools.product([task], _options("adv"), evals))
        else:
            combos += [(task, "none", e) for e in evals]
            combos += [(task, adv, DEFAULT_EVAL[task]) for adv in _options("adv") if adv != "none"]
    return combos


COMBOS = _combos()


@pytest.mark.parametrize(("task", "adv", "evaluation"), COMBOS, ids=["-".join(c) for c in COMBOS])
def test_config_composes_instantiates_and_fits(tiny_for, task, adv, evaluation, tmp_path):
    cfg = compose_config("train", [*tiny_for(task), f"adv={adv}", f"eval={evaluation}"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    callbacks = build_callbacks(cfg)
    names = {type(cb).__name__ for cb in callbacks}
    assert ("AdversarialTraining" in names) == (adv != "none")
    assert ("RobustnessEvaluation" in names) == (evaluation != "none")
    trainer = build_trainer(cfg, callbacks, build_loggers(cfg))
    trainer.fit(module, datamodule=datamodule)
    assert trainer.state.finished
    trainer.test(module, datamodule=datamodule, ckpt_path="best")
    assert "test/accuracy" in trainer.callback_metrics
    if evaluation != "none":
        assert (Path(tmp_path) / "robustness.csv").is_file()
        assert (Path(tmp_path) / "summary.md").is_file()
    if evaluation.startswith("curve"):  # the minimum-norm suite's per-sample radii (robustness.csv rows), histogram
        rows = read_csv(Path(tmp_path) / "robustness.csv")
        radii = [r for r in rows if r["metric"] == "radius" and r["split"] == "test"]
        evaluated = min(cfg.data.batch_size, len(datamodule.data_test))  # test_max_batches=1
        assert len(radii) == len({r["sample"] for r in radii}) == evaluated
        assert all(r["value"] >= 0 for r in radii) and all(r["eps"] == "" for r in radii)
        norm = cfg.eval.attacks.curve.minimum_norm.norm
        assert (Path(tmp_path) / "curves" / f"test_fmn-curve_{norm}_radii.png").is_file()


def test_a_regression_only_evaluation_on_a_classifier_fails_at_setup(tiny_for, tmp_path):
    cfg = compose_config("train", [*tiny_for("lidc"), "eval=age_shift"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    with pytest.raises(TypeError, match=r"directional_up_linf needs a task module with \['prediction'\]"):
        trainer.fit(module, datamodule=datamodule)


# the hybrid needs anatomical features from the data: it runs in the brain-age experiment test
IMAGE_ONLY_MODELS = [m for m in _options("model") if m != "brain_hybrid"]


@pytest.mark.parametrize("model", IMAGE_ONLY_MODELS)
def test_every_model_runs_2d_and_3d(model, tmp_path):
    """Each image-only model config builds for 2-D and 3-D input and gives logits (B, num_classes)."""
    import torch
    from hydra.utils import instantiate

    for dims, shape in ((2, (2, 1, 32, 32)), (3, (2, 1, 32, 32, 32))):
        cfg = compose_config("train", [f"model={model}", f"data.spatial_dims={dims}"], tmp_path)
        net = instantiate(cfg.model).eval()
        with torch.no_grad():
            assert net(torch.rand(shape)).shape == (2, cfg.module.num_classes)


def test_3d_patches_train_attack_and_test(tiny, tmp_path):
    """data.spatial_dims=3: 3-D patches through adversarial training, the evaluation and the test."""
    cfg = compose_config("train", [*tiny, "adv=pgd", "data.spatial_dims=3", "data.patch_size=24"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, ckpt_path="best")
    assert next(iter(datamodule.test_dataloader()))["image"].shape[1:] == (1, 24, 24, 24)
    from medrobust.reporting import read_csv

    rows = read_csv(Path(tmp_path) / "robustness.csv")
    assert {r["split"] for r in rows} == {"val", "test"} and len(rows) == 2 * 2 * 5 * 4
    assert (Path(tmp_path) / "examples" / "test_pgd10_linf_eps0p008.png").is_file()
