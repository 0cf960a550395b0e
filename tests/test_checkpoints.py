"""Checkpoints and run files that a stop cannot corrupt, and checkpoints that load safely or fail clearly."""

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

from conftest import REPO, compose_config, run_script
from medrobust.callbacks import AtomicCheckpointIO
from medrobust.checkpoints import RUN_KEY, CheckpointError, check_checkpoint, load_checkpoint
from medrobust.reporting import plot_curves, read_csv, write_csv, write_summary_section
from medrobust.runner import build_callbacks, build_data_and_module, build_trainer

ROW = {"epoch": 0, "split": "val", "attack": "pgd", "norm": "linf", "eps": 0.004, "eps_unit": "model",
       "metric": "accuracy", "value": 0.5, "points": "first_failure", "flags": ""}


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("cannot serialise this value")


def leftovers(folder: Path) -> list[str]:
    """Temporary files of interrupted atomic writes."""
    return sorted(p.name for p in folder.rglob(".*.tmp*"))


@pytest.fixture(scope="module")
def lidc_checkpoint(tiny_for, tmp_path_factory) -> Path:
    """last.ckpt of one tiny epoch of task=lidc with PGD training and a robustness evaluation (their states in it)."""
    run_dir = tmp_path_factory.mktemp("lidc_run")
    cfg = compose_config("train", [*tiny_for("lidc"), "adv=pgd", "eval.eps=[0.0,0.004]", "trainer.max_epochs=1"],
                         run_dir)
    L.seed_everything(cfg.seed)
    datamodule, module = build_data_and_module(cfg)
    build_trainer(cfg, build_callbacks(cfg), []).fit(module, datamodule=datamodule)
    return run_dir / "checkpoints" / "last.ckpt"


# -- atomic writers: a failure midway leaves the previous file -----------------------------------------------------
def test_csv_writer_that_fails_midway_leaves_the_previous_file(tmp_path):
    path = tmp_path / "robustness.csv"
    write_csv([ROW], path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot serialise"):
        write_csv([ROW, {**ROW, "value": Unprintable()}], path)  # the first row is written, then it fails
    assert path.read_bytes() == before and read_csv(path)[0]["value"] == 0.5
    assert leftovers(tmp_path) == []


def test_curve_and_summary_writers_that_fail_midway_leave_the_previous_files(tmp_path):
    rows = [ROW, {**ROW, "eps": 0.0}]
    (png,) = plot_curves(rows, tmp_path, split="val")
    before = png.read_bytes()
    with pytest.raises(ValueError):  # the same file, with a title matplotlib cannot draw: fails while saving
        plot_curves([{**row, "split": r"$\frac$"} for row in rows], tmp_path, split=r"$\frac$")
    assert png.read_bytes() == before
    summary = write_summary_section(tmp_path, "robustness", "# first\n")
    with pytest.raises(UnicodeEncodeError):  # the file is open when the text fails to encode
        write_summary_section(tmp_path, "robustness", "# second\n\ud800")
    assert summary.read_text() == "# first\n" and leftovers(tmp_path) == []


def test_checkpoint_write_that_fails_midway_leaves_the_previous_checkpoint(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)
    with pytest.raises(Exception):  # pickling stops at the lambda, after the tensors went out
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "hook": lambda: None}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert leftovers(tmp_path) == []


# -- safe loading ------------------------------------------------------------------------------------------------
def test_a_runs_checkpoint_loads_with_weights_only_and_says_which_task_wrote_it(lidc_checkpoint):
    checkpoint = torch.load(lidc_checkpoint, weights_only=True)
    assert checkpoint[RUN_KEY] == {"task_name": "lidc", "module": "medrobust.tasks.classification.ClassificationTask"}
    states = {key.split("{")[0]: value for key, value in checkpoint["callbacks"].items()}
    assert states["AdversarialTraining"]["eps_history"] == [(0, pytest.approx(0.002))]  # warm-up: half of eps
    assert {row["epoch"] for row in states["RobustnessEvaluation"]["history"]} == {0}
    assert "ModelCheckpoint" in states  # RunCheckpoint keeps ModelCheckpoint's state key


def test_truncated_unsafe_and_foreign_checkpoints_fail_naming_the_file(lidc_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(lidc_checkpoint.read_bytes()[: lidc_checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt' is not a readable checkpoint .*truncated"):
        load_checkpoint(truncated)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "callback": Unprintable()}, unsafe)
    with pytest.raises(CheckpointError, match=r"unsafe\.ckpt' holds objects other than tensors"):
        load_checkpoint(unsafe)
    # without the task tag, the weights themselves show that a brain-age model cannot take them
    untagged = tmp_path / "untagged.ckpt"
    checkpoint = torch.load(lidc_checkpoint, weights_only=True)
    del checkpoint[RUN_KEY]
    torch.save(checkpoint, untagged)
    cfg = compose_config("eval", ["task=brainage", f"ckpt_path={untagged}"], tmp_path / "run")
    _, brainage = build_data_and_module(cfg)
    with pytest.raises(CheckpointError, match=r"untagged\.ckpt' does not fit task=brainage's model"):
        check_checkpoint(untagged, "brainage", brainage)


@pytest.mark.slow
def test_eval_refuses_a_checkpoint_of_another_task(lidc_checkpoint, tmp_path):
    result = run_script("eval.py", ["task=brainage", "debug=tiny", f"ckpt_path={lidc_checkpoint}",
                                    f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode != 0
    assert (f"checkpoint '{lidc_checkpoint}' was written by task=lidc, not task=brainage: evaluate it with task=lidc"
            in result.stderr)


# -- stopped runs --------------------------------------------------------------------------------------------------
EPOCHS = 6  # room to stop in: the signal comes after epoch 0's checkpoint, the run must end before the last epoch


@pytest.mark.slow
def test_sigterm_and_sigint_stop_training_leaving_readable_files(tiny_for, tmp_path):
    """Both signals reach a real train.py (concurrently: the two start-ups overlap) once its first checkpoint is
    written; each stops before its last epoch and leaves whole files behind."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        run_dir = tmp_path / sig.name
        args = [*tiny_for("lidc"), "adv=pgd", "eval.eps=[0.0,0.004]", f"trainer.max_epochs={EPOCHS}",
                f"hydra.run.dir={run_dir}"]
        # SIGINT back to its default in the child: a shell's background job starts with it ignored, and Python then
        # installs no KeyboardInterrupt handler (the test failed that way when the suite itself ran in the background)
        runs[sig] = run_dir, subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # both runs watched at once: each gets its signal as soon as its first checkpoint is there (one after the
        # other, the second run could finish while the first one starts up on a loaded machine)
        deadline, waiting = time.monotonic() + 240, dict(runs)
        while waiting:
            for sig, (run_dir, process) in list(waiting.items()):
                assert process.poll() is None, f"train.py ended before {sig.name}:\n{process.stderr.read()[-3000:]}"
                if (run_dir / "checkpoints" / "last.ckpt").exists():
                    process.send_signal(sig)
                    del waiting[sig]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        module = build_data_and_module(compose_config("train", tiny_for("lidc"), tmp_path / "module"))[1]
        for sig, (run_dir, process) in runs.items():
            process.wait(timeout=120)
            stderr = process.stderr.read()
            if sig == signal.SIGINT:
                assert process.returncode != 0 and "KeyboardInterrupt" in stderr, stderr[-3000:]
            assert f"training stopped by {sig.name}" in stderr and "resume with ckpt_path=" in stderr, stderr[-3000:]
            rows = read_csv(run_dir / "robustness.csv")
            assert max(row["epoch"] for row in rows) < EPOCHS - 1, f"{sig.name} did not stop the run"
            for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):
                check_checkpoint(checkpoint, "lidc", module)
            if (run_dir / "summary.md").exists():
                assert (run_dir / "summary.md").read_text().startswith("#")
            assert leftovers(run_dir) == []
    finally:
        for _, process in runs.values():
            if process.poll() is None:
                process.kill()
            process.stderr.close()
