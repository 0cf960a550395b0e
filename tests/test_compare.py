"""`python compare.py`: hand-written run folders from two sweeps with known answers (the table at every eps, the
overrides that tell runs apart, best epoch, run time, the most robust run in both metric directions, selection
errors), and a real tiny multirun: its printed summary names the most robust run, and compare.py on its run
folders reads the numbers each run wrote."""

from __future__ import annotations

import csv
import os

import pytest
from omegaconf import OmegaConf

from medrobust.reporting import format_eps, read_csv, write_csv
from medrobust.reporting.comparison import NO_RESULTS, compare_runs, main
from conftest import run_script

FGSM, PGD = "fgsm_linf", "pgd10_linf"


def _rows(split: str, epoch: int, metrics: dict[str, tuple[float, dict]]) -> list[dict]:
    """robustness.csv rows: per metric, its clean value at eps 0 of each attack and its value at each (attack, eps)."""
    rows = []
    for metric, (clean, robust) in metrics.items():
        for attack in sorted({a for a, _ in robust}):
            cells = [(0.0, clean)] + sorted((eps, v) for (a, eps), v in robust.items() if a == attack)
            rows += [{"epoch": epoch, "split": split, "attack": attack, "norm": "linf", "eps": eps,
                      "eps_unit": "model", "metric": metric, "value": v,
                      "points": "clean" if eps == 0 else "worst_loss"} for eps, v in cells]
    return rows


def _run(folder, overrides: list[str], rows: list[dict] | None, seed: int = 0, log: tuple[str, str] | None = None):
    """A run folder as train.py leaves it: Hydra's overrides and config, config.yaml (a segmentation task: dice
    higher is better, hd95 lower), robustness.csv written by the real writer, and a job log from ``log[0]`` to
    ``log[1]``."""
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    config = OmegaConf.create({"seed": seed, "adv": {"eps": 0.004} if "adv=none" not in overrides else {},
                               "module": {"_target_": "medrobust.tasks.SegmentationTask", "num_classes": 3},
                               "model": {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}})
    for path in (folder / ".hydra" / "config.yaml", folder / "config.yaml"):
        OmegaConf.save(config, path)
    if rows is not None:
        write_csv(rows, folder / "robustness.csv")
    if log is not None:
        (folder / "train.log").write_text(f"[{log[0]}][medrobust][INFO] - data\n[{log[1]}][medrobust][INFO] - done\n")
    return folder


@pytest.fixture
def runs(tmp_path):
    """Four runs of two sweeps. Worst dice at eps 0.008: A 0.5 and D 0.5 (a tie; D's clean dice is higher), B 0.4;
    worst hd95: A 6.0, B 5.5, D 7.0. C failed before writing robustness.csv. D has no PGD row at eps 0.004."""
    # validation rows with other numbers, so a wrong split shows
    val = _rows("val", 4, {"dice": (0.1, {(FGSM, 0.004): 0.1, (FGSM, 0.008): 0.1})})
    a = _run(tmp_path / "sweep_a" / "0", ["task=brainseg", "adv=pgd", "adv.eps=0.004"], val + _rows("test", 3, {
        "dice": (0.8, {(FGSM, 0.004): 0.7, (FGSM, 0.008): 0.6, (PGD, 0.004): 0.65, (PGD, 0.008): 0.5}),
        "hd95": (2.0, {(FGSM, 0.004): 3.0, (FGSM, 0.008): 4.0, (PGD, 0.004): 3.5, (PGD, 0.008): 6.0})}),
        log=("2026-01-01 10:00:00,000", "2026-01-01 10:02:30,500"))
    b = _run(tmp_path / "sweep_a" / "1", ["task=brainseg", "adv=none"], _rows("test", 1, {
        "dice": (0.9, {(FGSM, 0.004): 0.6, (FGSM, 0.008): 0.4, (PGD, 0.004): 0.55, (PGD, 0.008): 0.45}),
        "hd95": (1.5, {(FGSM, 0.004): 2.5, (FGSM, 0.008): 5.0, (PGD, 0.004): 3.0, (PGD, 0.008): 5.5})}))
    for path in b.rglob("*"):  # no job log: the run time comes from the file times, config to newest file
        os.utime(path, (1_000_000, 1_000_000 if path.name == "config.yaml" and path.parent.name == ".hydra"
                        else 1_000_042))
    c = _run(tmp_path / "sweep_b" / "0", ["task=brainseg", "adv=pgd", "adv.eps=0.002", "seed=1"], None, seed=1,
             log=("2026-01-02 10:00:00,000", "2026-01-02 10:00:05,250"))
    (c / "checkpoints").mkdir()
    for name in ("epoch007.ckpt", "last.ckpt"):
        (c / "checkpoints" / name).write_bytes(b"")
    d = _run(tmp_path / "sweep_b" / "3", ["task=brainseg", "adv=trades", "adv.eps=0.004"], _rows("test", 2, {
        "dice": (0.85, {(FGSM, 0.004): 0.7, (FGSM, 0.008): 0.5, (PGD, 0.008): 0.55}),
        "hd95": (1.8, {(FGSM, 0.004): 3.0, (FGSM, 0.008): 4.0, (PGD, 0.008): 7.0})}),
        log=("2026-01-03 01:00:00,000", "2026-01-03 02:30:00,000"))
    return [a, b, c, d]


def _table(path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_table_of_runs_from_two_sweeps_at_every_eps(runs, tmp_path, capsys):
    main([*map(str, runs), "--metric", "dice", "--out", str(tmp_path / "out"), "--no-params"])
    assert _table(tmp_path / "out" / "compare.csv") == [
        ["adv", "adv.eps", "seed", "run", "params", "clean_dice", "dice_fgsm_linf_eps0p004", "dice_fgsm_linf_eps0p008",
         "dice_pgd10_linf_eps0p004", "dice_pgd10_linf_eps0p008", "worst_dice_eps0p008", "strongest_attack",
         "most_robust", "best_epoch", "best_epoch_from", "run_time_s", "run_time_from", "flags", "note"],
        ["pgd", "0.004", "0", str(runs[0]), "", "0.8", "0.7", "0.6", "0.65", "0.5", "0.5", PGD, "", "3",
         "robustness.csv", "150.500", "train.log", "", ""],
        ["none", "-", "0", str(runs[1]), "", "0.9", "0.6", "0.4", "0.55", "0.45", "0.4", FGSM, "", "1",
         "robustness.csv", "42.000", "file times", "", ""],
        ["pgd", "0.002", "1", str(runs[2]), "", "", "", "", "", "", "", "", "", "7", "checkpoint name", "5.250",
         "train.log", "", NO_RESULTS],
        ["trades", "0.004", "0", str(runs[3]), "", "0.85", "0.7", "0.5", "", "0.55", "0.5", FGSM, "yes", "2",
         "robustness.csv", "5400.000", "train.log", "", f"no dice row at eps 0.004 for {PGD}"],
    ]
    md = (tmp_path / "out" / "compare.md").read_text()
    assert (f"| trades | 0.004 | 0 | {runs[3]} |  | 0.8500 | 0.7000 | 0.5000 |  | 0.5500 | 0.5000 ({FGSM}) | **yes** "
            f"| 2 | 90.0 min |  | no dice row at eps 0.004 for {PGD} |") in md
    verdict = (f"Most robust: adv=trades adv.eps=0.004 seed=0 (run {runs[3]}): dice 0.5000 under its strongest attack, "
               f"{FGSM}, at eps 0.008 (model units); clean 0.8500; higher is better")
    assert verdict in md and verdict in capsys.readouterr().out
    assert "Tied under attack with adv=pgd adv.eps=0.004 seed=0; chosen by its clean dice." in md
    assert sorted(p.name for p in (tmp_path / "out").glob("compare_*.png")) == [f"compare_{FGSM}_dice.png",
                                                                               f"compare_{PGD}_dice.png"]


def test_most_robust_follows_the_metric_direction(runs):
    hd95 = compare_runs(runs, metric="hd95", eps=0.008, count_params=False)  # the task's hd95: lower is better
    assert hd95.higher_is_better is False and hd95.most_robust is hd95.runs[1]
    assert [hd95.worst(run) for run in hd95.runs] == [(PGD, 6.0), (PGD, 5.5), None, (PGD, 7.0)]
    # dice ranked the other way round, as given: the lowest worst-case (the highest over attacks) wins
    dice = compare_runs(runs, metric="dice", count_params=False, higher_is_better=False)
    assert [dice.worst(run) for run in dice.runs] == [(FGSM, 0.6), (PGD, 0.45), None, (PGD, 0.55)]
    assert dice.most_robust is dice.runs[1] and "lower is better, as given" in dice.verdict
    # one eps selected: only its columns, ranked there (A beats B and D there: 0.65 vs 0.55; D has no PGD row)
    at_004 = compare_runs(runs[:2] + runs[3:], metric="dice", eps=0.004, count_params=False)
    assert at_004.eps_values == [0.004] and at_004.most_robust.label == "adv=pgd adv.eps=0.004"


@pytest.mark.parametrize("args, message", [
    (["--metric", "dise"], "metric dise not in the runs' robustness.csv (test split); there: dice, hd95"),
    (["--attack", "apgd_linf"], f"attack apgd_linf not in the runs' robustness.csv (test split) for dice; there: "
                                f"{FGSM}, {PGD}"),
    (["--eps", "0.002"], f"eps 0.002 not in the runs' robustness.csv (test split) for dice under {FGSM}, {PGD}; "
                         "there: 0.004, 0.008"),
    (["--split", "train"], "split train not in the runs' robustness.csv; there: test, val"),
])
def test_a_selection_no_run_has_fails_with_what_exists(runs, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as raised:
        main([str(runs[0]), str(runs[1]), "--no-params", "--out", str(tmp_path / "out"), *args])
    assert raised.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def multirun(tiny_for, tmp_path_factory):
    """One real tiny sweep, `python train.py -m task=brainage adv=none,fgsm`, shared by the tests below."""
    sweep = tmp_path_factory.mktemp("sweep")
    result = run_script("train.py", ["-m", *tiny_for("brainage"), "adv=none,fgsm", "adv.eps=0.002",
                                     f"hydra.sweep.dir={sweep}"], cwd=sweep)
    assert result.returncode == 0, result.stderr[-4000:]
    return sweep, result.stdout


@pytest.mark.slow
def test_multirun_prints_the_most_robust_run(multirun):
    """conf/hydra/default.yaml's CompareRuns: the sweep's compare.md, and its verdict printed at the end."""
    sweep, stdout = multirun
    md = (sweep / "compare.md").read_text()
    verdict = next(line for line in md.splitlines() if line.startswith("Most robust: adv="))
    assert verdict in stdout and "higher is better" in verdict  # brainage's default metric: accuracy
    assert not any((sweep / str(num) / "compare.md").exists() for num in (0, 1))  # the jobs write none of their own


@pytest.mark.slow
def test_compare_script_on_run_folders_reads_what_each_run_wrote(multirun, tmp_path):
    sweep, _ = multirun
    result = run_script("compare.py", [str(sweep / "0"), str(sweep / "1"), "--metric", "mae", "--attack", PGD,
                                       "--out", str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    with (tmp_path / "compare.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["adv"] for row in table] == ["none", "fgsm"]
    for num, row in enumerate(table):
        rows = [r for r in read_csv(sweep / str(num) / "robustness.csv")
                if r["split"] == "test" and r["metric"] == "mae" and r["attack"] == PGD]
        assert float(row["clean_mae"]) == next(r["value"] for r in rows if r["eps"] == 0)
        for r in (r for r in rows if r["eps"] > 0):
            assert float(row[f"mae_{PGD}_eps{format_eps(r['eps'])}"]) == r["value"]
        assert row["best_epoch"] == "0" and row["run_time_from"] == "train.log" and float(row["run_time_s"]) > 0
    worst = [float(row["worst_mae_eps0p008"]) for row in table]
    best = table[worst.index(min(worst))]  # mae: lower is better
    assert best["most_robust"] == "yes" and f"Most robust: adv={best['adv']} (run {best['run']})" in result.stdout
    assert (tmp_path / f"compare_{PGD}_mae.png").is_file() and not (sweep / "0" / "compare.md").exists()
