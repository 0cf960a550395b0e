"""The sweep comparison (medrobust.reporting.comparison) on a segmentation sweep: hand-written job folders with
known numbers, and the segmentation experiment's real multirun writing its table and plots (tests/test_compare.py:
run lists, every eps, the most robust run, selection errors)."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf

from medrobust.hydra_callbacks import CompareRuns
from medrobust.reporting import read_csv, write_csv
from medrobust.reporting.comparison import NO_RESULTS, SelectionError, compare_runs, main, write_comparison
from conftest import run_script

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(split: str, epoch: int, clean: float, robust: dict[tuple[str, float], float], flags: str = "") -> list[dict]:
    """robustness.csv rows: dice at eps 0 for each attack (the clean value), dice at each (attack, eps), and an
    accuracy row per cell that the comparison must not pick up."""
    rows = []
    for attack in sorted({a for a, _ in robust}):
        cells = [(0.0, clean)] + [(eps, value) for (a, eps), value in robust.items() if a == attack]
        for eps, value in cells:
            for metric, v in (("accuracy", 1.0 - eps), ("dice", value)):
                rows.append({"epoch": epoch, "split": split, "attack": attack, "norm": "linf", "eps": eps,
                             "eps_unit": "model", "metric": metric, "value": v,
                             "points": "clean" if eps == 0 else "worst_loss", "flags": flags})
    return rows


def _job(sweep, folder: str, model: str, rows: list[dict] | None, with_config: bool = True):
    job = sweep / folder
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create([f"model={model}", "debug=tiny"]), job / ".hydra" / "overrides.yaml")
    if with_config:  # as train.py writes it, resolved: the task (default metric) and the net (parameter count)
        OmegaConf.save(OmegaConf.create({
            "module": {"_target_": "medrobust.tasks.SegmentationTask", "num_classes": 5},
            "model": {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2},  # 3 * 2 + 2 = 8
        }), job / "config.yaml")
    if rows is not None:
        write_csv(rows, job / "robustness.csv")


@pytest.fixture
def sweep(tmp_path):
    """Three jobs: net_a and net_b with results (validation rows of two epochs, test rows of one), and, in folder
    10 (after 1 in job order, not before it), net_c, a run that failed before writing robustness.csv."""
    a = {("dag_linf", 0.004): 0.5, ("dag_linf", 0.008): 0.25,
         ("pgd10_linf", 0.004): 0.625, ("pgd10_linf", 0.008): 0.375}
    b = {("dag_linf", 0.004): 0.75, ("dag_linf", 0.008): 0.5, ("pgd10_linf", 0.004): 0.6875, ("pgd10_linf", 0.008): 0.5}
    # validation rows: other numbers, so a wrong split or epoch shows
    _job(tmp_path, "0", "net_a", _rows("val", 0, 0.3, dict.fromkeys(a, 0.1))
         + _rows("val", 1, 0.4, dict.fromkeys(a, 0.2))
         + _rows("test", 1, 0.875, a, flags="weaker_attack_wins"))
    _job(tmp_path, "1", "net_b", _rows("val", 0, 0.3, dict.fromkeys(a, 0.1)) + _rows("test", 0, 0.8125, b))
    _job(tmp_path, "10", "net_c", None, with_config=False)
    return tmp_path


def test_table_holds_the_known_numbers_and_names_the_failed_run(sweep, caplog):
    comparison = compare_runs(sweep, eps=0.004, label_key="model")  # metric: the task's (segmentation: dice)
    md, table, figure, *curves = write_comparison(comparison)
    assert comparison.metric == "dice" and comparison.attacks == ["dag_linf", "pgd10_linf"]
    assert [path.name for path in curves] == ["compare_dag_linf_dice.png", "compare_pgd10_linf_dice.png"]
    columns = ["model", "run", "params", "clean_dice", "dice_dag_linf_eps0p004", "dice_pgd10_linf_eps0p004",
               "worst_dice_eps0p004", "strongest_attack", "most_robust", "best_epoch", "flags", "note"]
    with table.open(newline="") as handle:
        assert [[row[key] for key in columns] for row in csv.DictReader(handle)] == [
            ["net_a", "0", "8", "0.875", "0.5", "0.625", "0.5", "dag_linf", "", "1", "weaker_attack_wins", ""],
            ["net_b", "1", "8", "0.8125", "0.75", "0.6875", "0.6875", "pgd10_linf", "yes", "0", "", ""],
            ["net_c", "10", "", "", "", "", "", "", "", "", "", NO_RESULTS],
        ]
    text = md.read_text()
    assert ("| model | run | params | clean dice | dag_linf dice @ 0.004 | pgd10_linf dice @ 0.004 "
            "| worst dice @ 0.004 | most robust | best epoch | run time | flags | note |\n") in text
    assert "| net_a | 0 | 8 | 0.8750 | 0.5000 | 0.6250 | 0.5000 (dag_linf) |  | 1 | " in text
    assert "| net_b | 1 | 8 | 0.8125 | 0.7500 | 0.6875 | 0.6875 (pgd10_linf) | **yes** | 0 | " in text
    assert f"|  |  |  | {NO_RESULTS} |\n" in text
    assert "Most robust: net_b (run 1): dice 0.6875 under its strongest attack, pgd10_linf, at eps 0.004" in text
    assert f"- net_c (run 10): {NO_RESULTS}" in text and "Missing results in 1 of 3 runs" in text
    assert "eps 0.004 (model units)" in text and "dag_linf: worst_loss" in text
    assert f"run 10 (net_c): {NO_RESULTS}" in caplog.text  # the warning, not only the table
    assert figure.read_bytes().startswith(PNG)


def test_defaults_take_the_largest_eps_and_name_runs_by_what_differs(sweep):
    comparison = compare_runs(sweep, count_params=False)
    assert comparison.eps == 0.008 and comparison.eps_values == [0.004, 0.008]
    assert [(r.label, r.params, r.clean, r.robust) for r in comparison.runs] == [
        ("model=net_a", None, 0.875, {"dag_linf": 0.25, "pgd10_linf": 0.375}),
        ("model=net_b", None, 0.8125, {"dag_linf": 0.5, "pgd10_linf": 0.5}),
        ("model=net_c", None, None, {}),
    ]
    # another split (its last epoch in each job), metric and choice of attacks
    val = compare_runs(sweep, split="val", eps=0.004, attacks=["pgd10_linf"], count_params=False)
    assert [(r.clean, r.robust) for r in val.runs[:2]] == [(0.4, {"pgd10_linf": 0.2}), (0.3, {"pgd10_linf": 0.1})]
    accuracy = compare_runs(sweep, metric="accuracy", eps=0.008, count_params=False)
    assert accuracy.runs[0].robust == {"dag_linf": 0.992, "pgd10_linf": 0.992}


def test_an_eps_not_evaluated_fails_with_those_evaluated(sweep):
    with pytest.raises(SelectionError, match=r"eps 0.002 not in .* for dice under dag_linf, pgd10_linf; there: "
                                             r"0.004, 0.008$"):
        compare_runs(sweep, eps=0.002, label_key="model", count_params=False)


def test_cli_writes_the_three_files(sweep, capsys):
    main([str(sweep), "--label-key", "model", "--eps", "0.004", "--no-params"])
    out = capsys.readouterr().out
    assert "| net_b | 1 |  | 0.8125 | 0.7500 | 0.6875 | 0.6875 (pgd10_linf) | **yes** |" in out
    assert all((sweep / name).is_file() for name in ("compare.md", "compare.csv", "compare.png"))


def test_hydra_callback_writes_after_each_job_of_a_multirun_only(sweep):
    """The callback as Hydra calls it, with the sweep's config; a single run (mode RUN) writes nothing."""
    callback = CompareRuns(label_key="model", eps=0.004, count_params=False)
    single = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "sweep": {"dir": str(sweep)}}})
    callback.on_job_end(config=single, job_return=None)
    assert not (sweep / "compare.md").exists()
    multi = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)}}})
    callback.on_job_end(config=multi, job_return=None)
    assert f"| net_c | 10 |  |  |  |  |  |  |  |  |  | {NO_RESULTS} |" in (sweep / "compare.md").read_text()


@pytest.mark.slow
def test_seg_experiment_sweep_writes_one_table_and_plot_of_its_runs(tiny_for, tmp_path):
    """`python train.py -m experiment=seg_generalizability_vs_robustness`, cut to two cheap models, two eps and
    two-step attacks on the test split only: compare.md / .csv / .png in the sweep folder, their numbers those of
    each job's robustness.csv, and the most robust model printed."""
    models = ["basic_unet", "unet"]
    result = run_script("train.py", [
        "-m", "experiment=seg_generalizability_vs_robustness", *tiny_for("brainseg"),
        f"hydra.sweeper.params.model='{','.join(models)}'", "eval.eps=[0,0.004]",
        "eval.attacks.dag.steps=2", "eval.attacks.pgd.steps=2", "eval.every_n_epochs=2",  # no validation attacks
        f"hydra.sweep.dir={tmp_path}",
    ], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG)
    with (tmp_path / "compare.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    md = (tmp_path / "compare.md").read_text()
    best = next(row for row in table if row["most_robust"] == "yes")
    worst = float(best["worst_dice_eps0p004"])
    assert f"Most robust: {best['model']} (run {best['run']}): dice {worst:.4f}" in result.stdout
    assert [row["model"] for row in table] == models and "Missing results" not in md
    for num, row in enumerate(table):
        assert OmegaConf.load(tmp_path / str(num) / "config.yaml").eval.attacks.dag.target == "swap:3,4"
        rows = [r for r in read_csv(tmp_path / str(num) / "robustness.csv")
                if r["split"] == "test" and r["metric"] == "dice"]
        attacks = sorted({r["attack"] for r in rows})
        assert attacks == ["dag_linf", "pgd2_linf"]
        assert float(row["clean_dice"]) == next(r["value"] for r in rows if r["eps"] == 0)
        cells = [f"{float(row['clean_dice']):.4f}"]
        for attack in attacks:
            value = next(r["value"] for r in rows if r["attack"] == attack and r["eps"] == 0.004)
            assert float(row[f"dice_{attack}_eps0p004"]) == value
            cells.append(f"{value:.4f}")
        state = torch.load(tmp_path / str(num) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        params = sum(v.numel() for k, v in state["state_dict"].items() if k.startswith("net."))
        assert int(row["params"]) == params  # the trained weights' count (these nets have no buffers)
        assert f"| {row['model']} | {num} | {params:,} | " + " | ".join(cells) + " |" in md
