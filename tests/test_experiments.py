"""Every experiment config (conf/experiment/*.yaml): each job of its sweep composes and builds its parts; the seed
protocols' own sweep runs once for real (debug=tiny) and ends with its comparison."""

from __future__ import annotations

import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF, DEBUG, compose_config, run_script
from medrobust.runner import build_callbacks, build_data_and_module

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _jobs(experiment: str) -> list[list[str]]:
    """The overrides of each job of ``experiment``'s sweep (``hydra.sweeper.params``: comma-separated choices)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.get("params") or {})
    choices = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    return [list(job) for job in itertools.product(*choices)]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_job_of_the_experiment_composes_and_builds(tiny_for, experiment, tmp_path):
    jobs = _jobs(experiment)
    assert jobs, f"experiment={experiment} sweeps nothing"
    for k, job in enumerate(jobs):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            task = compose("train", overrides=[f"experiment={experiment}", *job],
                           return_hydra_config=True).hydra.runtime.choices.task
        cfg = compose_config("train", [f"experiment={experiment}", *tiny_for(task)[1:], *job], tmp_path / str(k))
        datamodule, module = build_data_and_module(cfg)
        assert build_callbacks(cfg), job


ATTACK_THE_TRAINED_MODEL = [e for e in EXPERIMENTS if e.startswith(("seed004", "seed002")) or "generalizability" in e]


@pytest.mark.parametrize("experiment", ATTACK_THE_TRAINED_MODEL)
def test_protocols_that_attack_the_trained_model_evaluate_once_at_the_end(experiment, tmp_path):
    """Their expensive suites run after the last epoch only, whatever the task's own eval schedule (landmarks: every
    epoch)."""
    for job in _jobs(experiment):
        cfg = compose_config("train", [f"experiment={experiment}", *job], tmp_path)
        assert cfg.eval.every_n_epochs == cfg.trainer.max_epochs, job


@pytest.mark.slow
def test_seed000_protocol_sweeps_naive_and_iterative_training_into_one_comparison(tiny_for, tmp_path):
    """`python train.py -m experiment=seed000_lidc`: both runs selected on robust accuracy, both curves in one
    plot, each summary with its sensitivity table."""
    sweep = tmp_path / "sweep"
    run = run_script("train.py", ["-m", "experiment=seed000_lidc", *tiny_for("lidc")[1:], "trainer.max_epochs=2",
                                  f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Most robust:" in run.stdout
    table = (sweep / "compare.md").read_text()
    assert "| none |" in table and "| iterative |" in table
    assert (sweep / "compare_fmn-curve_linf_accuracy.png").is_file()
    for job in ("0", "1"):
        summary = (sweep / job / "summary.md").read_text()
        assert "without the most sensitive 20 %" in summary
        assert list((sweep / job / "checkpoints").glob("epoch*.ckpt"))  # the robust metric was there to monitor
