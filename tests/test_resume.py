"""A run stopped and resumed from last.ckpt ends where the uninterrupted run ends: same weights, same rows.

The runs are built as train.py builds them (seed, config, callbacks) and run in-process, except the one that the
kill test stops: a real ``python train.py``, stopped with a real SIGKILL, then resumed in the same run folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, compose_config
from medrobust.reporting import read_csv
from medrobust.runner import build_callbacks, build_data_and_module, build_trainer

# PGD adversarial training and a two-eps robustness evaluation, deterministic kernels, no test stage
RUN = ["adv=pgd", "trainer.deterministic=true", "eval.eps=[0.0,0.004]", "test=false"]


def fit(overrides: list[str], run_dir: Path, max_epochs: int, ckpt_path: str | None = None) -> None:
    """What train.py does up to fit, in this process."""
    cfg = compose_config("train", [*overrides, f"trainer.max_epochs={max_epochs}"], run_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def cells(rows: list[dict]) -> list[tuple]:
    return [(r["epoch"], r["split"], r["attack"], r["eps"], r["metric"], r["sample"]) for r in rows]


def assert_same_run(straight: Path, resumed: Path) -> None:
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"weights differ after the resume: {different[:5]}"
    rows_a, rows_b = read_csv(straight / "robustness.csv"), read_csv(resumed / "robustness.csv")
    assert len(set(cells(rows_b))) == len(rows_b), "robustness.csv holds a cell twice"
    assert rows_a == rows_b


@pytest.fixture(scope="module")
def straight(tiny_for, tmp_path_factory) -> tuple[list[str], Path]:
    """Two epochs of task=lidc adv=pgd, uninterrupted: ``(overrides, run folder)``."""
    overrides = [*tiny_for("lidc"), *RUN]
    run_dir = tmp_path_factory.mktemp("straight")
    fit(overrides, run_dir, max_epochs=2)
    return overrides, run_dir


def stop_and_resume(overrides: list[str], run_dir: Path) -> None:
    """One epoch, then a second one resumed from last.ckpt in a fresh trainer (a new process would do the same)."""
    fit(overrides, run_dir, max_epochs=1)
    fit(overrides, run_dir, max_epochs=2, ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"))


def test_stopped_and_resumed_run_ends_with_the_straight_runs_weights_and_rows(straight, tmp_path):
    overrides, straight_dir = straight
    stop_and_resume(overrides, tmp_path)
    assert {row["epoch"] for row in read_csv(tmp_path / "robustness.csv")} == {0, 1}
    assert_same_run(straight_dir, tmp_path)


def test_dense_task_resumes_exactly(tiny_for, tmp_path):
    """afids (landmarks on mid-sagittal slices): a dense task, with PGD training and its own evaluation."""
    overrides = [*tiny_for("afids"), *RUN]
    fit(overrides, tmp_path / "straight", max_epochs=2)
    stop_and_resume(overrides, tmp_path / "resumed")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_clean_training_with_dropout_resumes_exactly(tiny_for, tmp_path):
    """No attack seeds the step here: the dropout masks come from the global RNG, seeded per batch (BatchSeeding)."""
    overrides = [*tiny_for("lidc"), *RUN, "adv=none", "model.dropout=0.5"]
    fit(overrides, tmp_path / "straight", max_epochs=2)
    stop_and_resume(overrides, tmp_path / "resumed")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow
def test_kill_9_mid_run_resumes_without_losing_or_duplicating_rows(straight, tmp_path):
    """SIGKILL once robustness.csv holds epoch 1's rows (usually before last.ckpt holds epoch 1: those rows are then
    newer than the checkpoint); the resume in the same folder must end with the straight run's rows, once each."""
    overrides, straight_dir = straight
    args = [*overrides, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # one thread, as in this process (conftest): a float sum depends on the thread count
    csv_path = tmp_path / "robustness.csv"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (csv_path.exists() and any(row["epoch"] == 1 for row in read_csv(csv_path))):
            assert process.poll() is None, f"train.py ended before the kill:\n{process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "train.py wrote no epoch-1 rows within 240 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    before = read_csv(csv_path)  # whole, though the writer was killed
    checkpoint_epoch = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    assert checkpoint_epoch in (0, 1)
    fit(overrides, tmp_path, max_epochs=2, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    after = read_csv(csv_path)
    assert [row for row in after if row["epoch"] == 1] == [row for row in before if row["epoch"] == 1]
    assert_same_run(straight_dir, tmp_path)
