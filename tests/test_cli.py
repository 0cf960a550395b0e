"""The commands a user types, as real subprocesses on a tiny phantom."""

from __future__ import annotations

import json

import pytest

from medrobust.reporting import read_csv
from conftest import run_script

METRICS = {"accuracy", "auroc", "sensitivity", "specificity"}
EPS = {0.0, 0.001, 0.002, 0.004, 0.008}
ATTACKS = {"fgsm_linf", "pgd10_linf"}


def _assert_complete_curve(rows: list[dict], split: str, epochs: set[int]) -> None:
    cells = {(r["epoch"], r["attack"], r["eps"], r["metric"]) for r in rows if r["split"] == split}
    expected = {(e, a, eps, m) for e in epochs for a in ATTACKS for eps in EPS for m in METRICS}
    assert cells == expected
    assert len([r for r in rows if r["split"] == split]) == len(expected)  # no duplicates


@pytest.fixture(scope="module")
def trained_run(tiny, tmp_path_factory):
    """`python train.py task=lidc adv=pgd logger=wandb` for two tiny epochs."""
    run_dir = tmp_path_factory.mktemp("train_run")
    result = run_script(
        "train.py",
        ["task=lidc", "adv=pgd", "logger=wandb", *tiny, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"],
        cwd=run_dir,
    )  # the command line's max_epochs wins over debug=tiny's
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, result


@pytest.mark.slow
def test_train_writes_curves_checkpoints_and_summary(trained_run):
    run_dir, result = trained_run
    for name in ("config.yaml", "robustness.csv", "summary.md", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (run_dir / name).is_file(), name
    rows = read_csv(run_dir / "robustness.csv")
    _assert_complete_curve(rows, "val", {0, 1})
    test_epochs = {r["epoch"] for r in rows if r["split"] == "test"}
    assert len(test_epochs) == 1
    _assert_complete_curve(rows, "test", test_epochs)
    curves = {p.name for p in (run_dir / "curves").glob("*.png")}
    assert {f"{a}_{m}.png" for a in ATTACKS for m in METRICS} <= curves
    examples = {p.name for p in (run_dir / "examples").glob("*.png")}
    assert examples == {f"test_{a}_eps0p008.png" for a in ATTACKS}
    summary = (run_dir / "summary.md").read_text()
    assert "| clean | 0 |" in summary and "| pgd10_linf | 0.008 |" in summary
    assert f"Outputs: {run_dir}" in result.stdout and "| clean | 0 |" in result.stdout
    # the table is consistent with the csv: the clean test accuracy is the eps=0 row
    clean = next(r for r in rows if r["split"] == "test" and r["eps"] == 0 and r["metric"] == "accuracy")
    assert f"| clean | 0 | {clean['value']:.4f} |" in summary


def test_wandb_offline_tables_hold_the_curve(trained_run):
    run_dir, _ = trained_run
    tables = sorted((run_dir / "wandb").glob("offline-run-*/files/media/table/robustness/val_table_*.table.json"))
    assert tables, "no W&B table written"
    rows = read_csv(run_dir / "robustness.csv")
    table = json.loads(tables[-1].read_text())  # the last one logged holds the whole history
    got = {(int(r[0]), r[2], float(r[4]), r[6]): float(r[7]) for r in table["data"]}
    want = {(r["epoch"], r["attack"], r["eps"], r["metric"]): r["value"] for r in rows if r["split"] == "val"}
    assert table["columns"] == ["epoch", "split", "attack", "norm", "eps", "eps_unit", "metric", "value", "points",
                                "flags", "sample"]
    assert got == pytest.approx(want)
    # which points each metric was read at, as robustness.csv says (accuracy at first failures, the rest worst-case)
    points = {(int(r[0]), r[2], float(r[4]), r[6]): r[8] for r in table["data"]}
    assert points == {(r["epoch"], r["attack"], r["eps"], r["metric"]): r["points"] for r in rows if r["split"] == "val"}
    assert {r["points"] for r in rows if r["eps"] > 0 and r["metric"] == "accuracy"} == {"first_failure"}
    assert {r["points"] for r in rows if r["eps"] > 0 and r["metric"] == "auroc"} == {"worst_loss"}
    # the gradient-masking verdict of each split's last evaluation, as robustness.csv has it (offline runs keep
    # the W&B summary in their binary log; the flags table is the file they write)
    for split in ("val", "test"):
        flag_tables = sorted((run_dir / "wandb").glob(f"offline-run-*/files/media/table/robustness/"
                                                      f"{split}_flags_table_*.table.json"),
                             key=lambda p: int(p.name.split("_")[-2]))  # the step the table was logged at
        assert flag_tables, f"no {split} flags table written"
        last = max(r["epoch"] for r in rows if r["split"] == split)
        flags = {r["flags"] for r in rows if r["split"] == split and r["epoch"] == last}
        assert len(flags) == 1
        expected = [[flag] for flag in flags.pop().split(";") if flag] or [["none"]]
        assert json.loads(flag_tables[-1].read_text())["data"] == expected


@pytest.mark.slow
def test_eval_attacks_a_checkpoint_into_its_own_run_dir(tiny, trained_run, tmp_path):
    run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    result = run_script("eval.py", ["task=lidc", f"ckpt_path={ckpt}", *tiny, f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_csv(tmp_path / "robustness.csv")
    _assert_complete_curve(rows, "test", {r["epoch"] for r in rows if r["split"] == "test"})
    assert (tmp_path / "summary.md").is_file()


@pytest.mark.slow
def test_ddp_cpu_end_to_end(tiny, tmp_path):
    """`trainer=ddp_cpu`: two CPU processes through the real launcher, files written once."""
    result = run_script(
        "train.py", ["task=lidc", "adv=fgsm", "trainer=ddp_cpu", *tiny, f"hydra.run.dir={tmp_path}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_csv(tmp_path / "robustness.csv")
    _assert_complete_curve(rows, "val", {0})
    assert (tmp_path / "summary.md").is_file()


@pytest.mark.slow
def test_bad_values_fail_before_training_naming_the_key(tiny, tmp_path):
    result = run_script("train.py", ["adv=pgd", "adv.eps=-0.004", *tiny, f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode != 0
    assert "adv.eps must be >= 0, got -0.004" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_group_option_lists_the_options(tmp_path):
    result = run_script("train.py", ["adv=madry"], cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'adv/madry'" in result.stderr and "pgd" in result.stderr


@pytest.mark.slow
def test_multirun_sweep_gives_each_run_its_folder(tiny, tmp_path):
    """`python train.py -m adv=none,fgsm adv.eps=0.002`: two runs, each with its own curve and summary."""
    result = run_script(
        "train.py", ["-m", "adv=none,fgsm", "adv.eps=0.002", *tiny, f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for num, adv in enumerate(("none", "fgsm")):
        run = tmp_path / str(num)
        assert (run / "summary.md").is_file() and (run / "robustness.csv").is_file()
        assert f"- adv={adv}" in (run / ".hydra" / "overrides.yaml").read_text()
