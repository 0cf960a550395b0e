"""task=brainage end to end: age is learnable, the hybrid-vs-CNN experiment runs, 3-D DDP matches one process."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config, run_script
from medrobust.attacks import PGD, Directional
from medrobust.callbacks import RobustnessEvaluation
from medrobust.reporting import read_csv
from medrobust.runner import build_data_and_module
from medrobust.tasks import BrainAgeTask
from test_regression_task import BRAIN_AGE_METRICS


def test_a_few_epochs_beat_predicting_the_mean_age(data_dir, tmp_path):
    cfg = compose_config("train", ["task=brainage", "data.num_subjects=160", "data.image_size=16",
                                   "data.batch_size=16", "model.dropout=0.0", "trainer.max_epochs=16"], tmp_path)
    torch.manual_seed(0)  # before the model is built: its initialisation must not depend on earlier tests
    # 8 epochs ended at 0.83x the mean predictor's MAE with this seed (above the 0.8 bar); 16 end at 0.44-0.54x (seeds 0-2)
    datamodule, module = build_data_and_module(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=cfg.trainer.max_epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    module.eval()
    errors, baseline = [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            errors.append(module.error(module(batch["image"]), batch).abs())
            baseline.append((batch["label"] - datamodule.age_mean).abs())
    mae, mean_mae = torch.cat(errors).mean().item(), torch.cat(baseline).mean().item()
    assert mae < 0.8 * mean_mae, (mae, mean_mae)


@pytest.mark.slow
def test_hybrid_vs_cnn_experiment_runs_both_models(tiny_for, tmp_path):
    """`python train.py -m experiment=brainage_hybrid_vs_cnn`: two runs, each summary names its model."""
    overrides = [o for o in tiny_for("brainage") if not o.startswith("task=")]
    result = run_script("train.py", ["-m", "experiment=brainage_hybrid_vs_cnn", *overrides, "trainer.max_epochs=1",
                                     f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "summary.md").exists())
    assert len(runs) == 2
    models = {}
    for run in runs:
        summary = (run / "summary.md").read_text()
        models[run.name] = next(line for line in summary.splitlines() if line.startswith("Model: "))
        rows = read_csv(run / "robustness.csv")
        attacks = {r["attack"] for r in rows if r["split"] == "test"}
        assert attacks == {"pgd10_linf", "directional_up_linf", "directional_down_linf"}
        assert {r["metric"] for r in rows} >= {"mae", "rmse", "r2", "accuracy", "age_shift"}
        assert any(r["metric"].startswith("age_shift_") for r in rows)  # at least one populated age band
        with (run / "universal.csv").open() as handle:
            universal = list(csv.DictReader(handle))
        assert {row["direction"] for row in universal} == {"up", "down"}
        assert "## Universal perturbations" in summary
    assert sorted(models.values()) == ["Model: HybridRegressor", "Model: SmallCNN"]


@pytest.mark.slow
def test_ddp_spawn_3d_matches_one_process(tiny_for, tmp_path):
    """Two CPU ranks attack their own shards of 3-D volumes; the reduced metrics equal one process's."""
    cfg = compose_config("train", [*tiny_for("brainage"), "data.num_subjects=52"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    datamodule.prepare_data()
    datamodule.setup("validate")
    if len(datamodule.data_val) % 2:
        pytest.fail(f"the test needs an even validation split to avoid the sampler's padding, got "
                    f"{len(datamodule.data_val)}")
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    results = {}
    for name, strategy, devices in (("one", "auto", 1), ("ddp", "ddp_spawn", 2)):
        module.load_state_dict(state, strict=False)  # target_mean / std are set from the data at setup
        evaluation = RobustnessEvaluation([PGD(steps=3), Directional("up")], eps=[0.0, 0.004], eps_unit="range",
                                          max_batches=None, output_dir=str(tmp_path / name))
        trainer = instantiate(cfg.trainer, callbacks=[evaluation], logger=False, strategy=strategy, devices=devices,
                              limit_val_batches=None, default_root_dir=str(tmp_path / name))
        trainer.validate(module, datamodule=datamodule)
        results[name] = {(r["attack"], r["eps"], r["metric"]): r["value"]
                         for r in read_csv(tmp_path / name / "robustness.csv")}
    assert results["one"].keys() == results["ddp"].keys()
    assert ("directional_up_linf", 0.004, "age_shift") in results["one"]
    for key, value in results["one"].items():
        assert results["ddp"][key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


def test_brainage_config_builds_the_brain_age_task(tmp_path):
    """task=brainage keeps every brain-age metric name (robustness.csv rows, PNG names, README figures)."""
    cfg = compose_config("train", ["task=brainage"], tmp_path)
    task = instantiate(cfg.module, net=torch.nn.Linear(1, 1), _convert_="all")
    assert type(task) is BrainAgeTask and set(task.robust_metrics()) == BRAIN_AGE_METRICS
    assert task.curve_metrics == ("accuracy", "mae", "age_shift") and task.shift_metric == "age_shift"
