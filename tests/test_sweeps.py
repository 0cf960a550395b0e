"""Hyperparameter searches: the metric train.py hands a sweeper, an Optuna sweep (through the submitit launcher's local
processes, as it would run on SLURM), one trial of the W&B sweep, expanded as the W&B agent expands it, and how a job's
W&B run is grouped and named."""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig

from medrobust.reporting import read_csv
from medrobust.runner import (
    build_callbacks,
    build_data_and_module,
    build_loggers,
    build_trainer,
    finish_wandb_run,
    optimized_value,
)
from conftest import REPO, compose_config, run_script
from test_wandb_masks import _offline_run

ROBUST = "robust_val/pgd10_linf/accuracy_eps0p004"  # what sweep=optuna and the W&B sweep maximise
# less of the tiny run: one batch per split, the PGD curve only (the one the sweeps read)
SMALLER = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "~eval.attacks.fgsm"]
SEARCHED = {"module.optimizer.lr", "adv.eps", "adv.attack.steps", "adv.clean_weight", "adv.adv_weight"}


def _robust_accuracy(run_dir, epoch: int = 0) -> float:
    """The value robustness.csv holds for ROBUST: the file written beside the logged metric."""
    (row,) = [r for r in read_csv(run_dir / "robustness.csv") if r["split"] == "val" and r["epoch"] == epoch
              and r["attack"] == "pgd10_linf" and r["eps"] == 0.004 and r["metric"] == "accuracy"]
    return row["value"]


def test_optimized_value_is_the_logged_metric_and_a_wrong_name_lists_the_logged_ones(tiny, tmp_path):
    cfg = compose_config("train", ["task=lidc", *tiny, "test=false", "logger=none"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    trainer.fit(module, datamodule=datamodule)
    metrics = trainer.callback_metrics

    assert optimized_value(ROBUST, metrics) == pytest.approx(_robust_accuracy(tmp_path))
    pareto = optimized_value(["val/accuracy", ROBUST], metrics)  # a multi-objective sweep's list, in its order
    assert pareto == [pytest.approx(float(metrics["val/accuracy"])), pytest.approx(_robust_accuracy(tmp_path))]
    with pytest.raises(ValueError, match="robust_val/pgd10/accuracy_eps0p004 not logged") as error:
        optimized_value(["val/accuracy", "robust_val/pgd10/accuracy_eps0p004"], metrics)
    assert ROBUST in str(error.value) and "val/loss" in str(error.value)  # the names it could have been


@pytest.mark.slow
def test_optuna_sweep_through_submitit_local_processes(tiny, tmp_path):
    """`python train.py -m sweep=optuna hydra/launcher=submitit_local`: 2 trials, run side by side as submitit jobs."""
    sweep_dir = tmp_path / "sweep"
    result = run_script("train.py", ["-m", "sweep=optuna", "hydra/launcher=submitit_local", "task=lidc", *tiny,
                                     *SMALLER, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                                     f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    values = {}
    for job in ("0", "1"):
        for name in ("robustness.csv", "summary.md", "config.yaml"):
            assert (sweep_dir / job / name).is_file(), f"{job}/{name}"
        overrides = yaml.safe_load((sweep_dir / job / ".hydra" / "overrides.yaml").read_text())
        sampled = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in SEARCHED)
        assert set(sampled) == SEARCHED, overrides
        values[job] = (_robust_accuracy(sweep_dir / job), sampled)
    logs = list((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, sorted((sweep_dir / ".submitit").rglob("*"))

    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    best_value = max(value for value, _ in values.values())
    assert results["best_value"] == pytest.approx(best_value)
    best = [params for value, params in values.values() if value == best_value]  # both, on a tie
    assert {k: str(v) for k, v in results["best_params"].items()} in best


def _sample(parameters: dict, rng: random.Random) -> dict:
    """One parameter set from a W&B sweep's `parameters` (the distributions this project's sweeps use)."""
    draw = {
        "uniform": lambda p: rng.uniform(p["min"], p["max"]),
        "log_uniform_values": lambda p: math.exp(rng.uniform(math.log(p["min"]), math.log(p["max"]))),
        "int_uniform": lambda p: rng.randint(p["min"], p["max"]),
    }
    return {name: {"value": p["value"] if "value" in p else draw[p["distribution"]](p)}
            for name, p in parameters.items()}


def _agent_command(sweep: dict, args: dict) -> list[str]:
    """The command line the W&B agent runs for one parameter set (wandb_agent.Agent._command_run, outside W&B)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = create_sweep_command_args({"args": args})
    macros.update(env=["/usr/bin/env"], interpreter=[sys.executable], program=[str(REPO / sweep["program"])])
    command = []
    for chunk in map(str, create_sweep_command(list(sweep["command"]))):
        command += macros[chunk[2:-1]] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


@pytest.mark.slow
def test_wandb_sweep_trial_runs_and_logs_the_metric_the_sweep_optimises(tiny, tmp_path):
    sweep = yaml.safe_load((REPO / "sweeps" / "wandb_lidc.yaml").read_text())
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    args = _sample(sweep["parameters"], random.Random(0))
    command = _agent_command(sweep, args)
    assert command[:3] == ["/usr/bin/env", sys.executable, str(REPO / "train.py")]
    assert f"adv.eps={args['adv.eps']['value']}" in command and "logger=wandb" in command  # key=value, no hyphens

    run_dir = tmp_path / "trial"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([*command, *tiny, *SMALLER, "test=false", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history, _, _ = _offline_run(run_dir)
    metric = sweep["metric"]["name"]
    assert metric in history, sorted(history)
    assert history[metric] == pytest.approx(_robust_accuracy(run_dir))
    # train.py optimised (and printed) the same metric the sweep reads from W&B
    printed = re.search(rf"optimized_metric {re.escape(metric)} = (\S+)", result.stdout + result.stderr)
    assert printed and float(printed.group(1)) == pytest.approx(history[metric])


def test_wandb_run_is_grouped_by_sweep_time_named_by_overrides_and_finished(tmp_path, monkeypatch):
    """The W&B run a job starts: group <task>_<the sweep folder's time>, name <task>:<the job's overrides>; ended by
    train.py, so the next job of an in-process multirun gets its own run."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train", ["task=lidc", "logger=wandb", "adv=pgd", "adv.eps=0.002"], tmp_path)
    sweep_time = Path(HydraConfig.get().sweep.dir).name  # outputs/<task>/multirun/<time>, resolved in this config
    assert cfg.logger.wandb.group == f"lidc_{sweep_time}"
    assert cfg.logger.wandb.name == "lidc:adv.eps=0.002,adv=pgd,logger=wandb,task=lidc"
    (_, logger) = build_loggers(cfg)  # csv, then wandb
    assert (logger.experiment.group, logger.experiment.name) == (cfg.logger.wandb.group, cfg.logger.wandb.name)
    finish_wandb_run()
    assert wandb.run is None
