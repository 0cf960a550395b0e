"""Compare runs (the jobs of a sweep, or any run folders): one row per run with the overrides that tell the runs
apart, its clean metric, each attack's metric at each eps, its best epoch and run time; the curves of all runs
overlaid; and the most robust run named. Written as ``compare.md``, ``compare.csv``, ``compare.png`` (clean vs
robust, one point per run and attack) and ``compare_<attack>_<metric>.png`` (metric vs eps, one line per run).

Only what each run left on disk is read (:mod:`medrobust.reporting.comparison_runs`): ``robustness.csv`` (rows of
``ROW_KEYS``), ``config.yaml`` or ``.hydra/``, its job log and checkpoint names. A run folder without
``robustness.csv`` (a failed or unfinished run) keeps its row, saying so.

    python compare.py <sweep_dir> [--metric dice] [--eps 0.004] [--attack pgd10_linf]
    python compare.py runA runB runC --out comparison/
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from medrobust.reporting import comparison_runs as runs_on_disk
from medrobust.reporting.comparison_runs import RESULTS
from medrobust.reporting.robustness import format_eps, is_cell_row, read_csv

log = logging.getLogger("medrobust")

NO_RESULTS = f"no {RESULTS} (the run failed or has not finished)"


class SelectionError(ValueError):
    """A metric, attack, eps or split asked for that no run has; the message lists those that exist."""


@dataclass
class RunResult:
    """One run's line. ``curves`` maps attack -> {eps: metric}; ``robust`` attack -> metric at its headline eps;
    ``note`` says what is missing."""

    job: str
    label: str
    settings: dict[str, str] = field(default_factory=dict)
    params: int | None = None
    clean: float | None = None
    curves: dict[str, dict[float, float]] = field(default_factory=dict)
    robust: dict[str, float] = field(default_factory=dict)
    points: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    best_epoch: int | None = None
    epoch_from: str = ""
    seconds: float | None = None
    time_from: str = ""
    note: str = ""

    def value(self, attack: str, eps: float) -> float | None:
        return next((v for e, v in self.curves.get(attack, {}).items() if _same_eps(e, eps)), None)


@dataclass
class Comparison:
    sweep_dir: Path | None
    metric: str
    eps_values: list[float]
    eps_unit: str
    split: str
    keys: list[str]
    attacks: list[str]
    runs: list[RunResult]
    higher_is_better: bool | None = None
    direction_from: str = ""
    bounded: bool = False
    most_robust: RunResult | None = None
    verdict: str = ""
    eps_of: dict[str, list[float]] = field(default_factory=dict)  # each attack's eps among eps_values
    ranked: list[str] = field(default_factory=list)  # the attacks the runs are ranked by: the first one's norm
    rank_norm: str = ""

    @property
    def eps(self) -> float | None:
        """The eps the runs are ranked at: the largest of the ranked attacks' (all eps where none is known)."""
        values = [e for a in self.ranked for e in self.eps_of.get(a, [])] or self.eps_values
        return max(values) if values else None

    def headline_eps(self, attack: str) -> float | None:
        """The eps an attack's robust value is read at: the ranking eps for the ranked attacks, an attack of another
        norm its own largest."""
        if attack in self.ranked or not self.eps_of.get(attack):
            return self.eps
        return max(self.eps_of[attack])

    def cells(self) -> list[tuple[str, float]]:
        """The robust columns: (attack, eps) for each attack, each of its eps."""
        return [(attack, eps) for attack in self.attacks for eps in self.eps_of.get(attack, self.eps_values)]

    @property
    def missing(self) -> list[RunResult]:
        return [run for run in self.runs if run.note]

    def column(self, attack: str, eps: float | None = None) -> str:
        return f"{self.metric}_{attack}_eps{format_eps(self.eps if eps is None else eps)}"

    def worst(self, run: RunResult) -> tuple[str, float] | None:
        """The strongest attack on ``run`` at the ranking eps and its value (the worst over attacks); ``None``
        unless every attack has a value there or the direction is unknown."""
        attacks = self.ranked or self.attacks
        if self.higher_is_better is None or not attacks or any(a not in run.robust for a in attacks):
            return None
        pick = min if self.higher_is_better else max
        attack = pick(attacks, key=lambda a: run.robust[a])
        return attack, run.robust[attack]


def _same_eps(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# -- reading the runs ----------------------------------------------------------------------------------------------
def _run_paths(paths: Sequence[str | Path]) -> tuple[Path | None, list[Path]]:
    """``(sweep_dir, run folders)``: one folder that is not itself a run is a sweep, searched for its runs;
    otherwise each path must be a run folder."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_dir():
            raise SelectionError(f"no such folder: {path}")
    if len(paths) == 1 and not runs_on_disk.is_run(paths[0]):
        jobs = runs_on_disk.find_jobs(paths[0])
        if not jobs:
            raise SelectionError(f"no run folders (with config.yaml or .hydra/overrides.yaml) under {paths[0]}")
        return paths[0], jobs
    not_runs = [str(p) for p in paths if not runs_on_disk.is_run(p)]
    if not_runs:
        raise SelectionError("not run folders (no config.yaml or .hydra/overrides.yaml): " + ", ".join(not_runs))
    return None, paths


def _labels(jobs: list[Path], names: list[str], settings: list[dict[str, str]], label_key: str | None) -> list[str]:
    """A name per run: ``label_key``'s value; without one, the settings that differ (``adv=fgsm adv.eps=0.004``),
    else the folder. A name shared by several runs gets the folder added."""
    if label_key is not None:
        labels = [runs_on_disk.setting(job, label_key) or name for job, name in zip(jobs, names)]
    else:
        labels = [" ".join(f"{k}={v}" for k, v in s.items()) or name for s, name in zip(settings, names)]
    return [f"{label} ({name})" if labels.count(label) > 1 else label for label, name in zip(labels, names)]


def _check(kind: str, asked: Sequence, found: Sequence, where: str, same=lambda a, b: a == b) -> None:
    unknown = [a for a in asked if not any(same(a, f) for f in found)]
    if unknown and found:  # nothing found at all (no run finished yet): the table says so per run instead
        listed = ", ".join(f"{f:g}" if isinstance(f, float) else str(f) for f in found)
        raise SelectionError(f"{kind} {', '.join(map(str, unknown))} not in {where}; there: {listed}")


def _fill(run: RunResult, rows: list[dict], metric: str, eps_of: dict[str, list[float]],
          headline: dict[str, float | None]) -> None:
    """Fill ``run`` from its rows (one split, one epoch); what is missing goes to ``run.note``."""
    for row in rows:
        if row["metric"] == metric and row["attack"] in eps_of and row["eps"] > 0:
            run.curves.setdefault(row["attack"], {})[row["eps"]] = row["value"]
            eps = headline[row["attack"]]
            if eps is not None and _same_eps(row["eps"], eps):
                run.robust[row["attack"]], run.points[row["attack"]] = row["value"], row.get("points") or ""
    clean = next((r for r in rows if r["metric"] == metric and r["eps"] == 0), None)
    run.clean = None if clean is None else clean["value"]
    run.flags = sorted({flag for r in rows for flag in (r.get("flags") or "").split(";") if flag})
    notes = [] if clean is not None else [f"no clean {metric} row"]
    for eps in sorted({e for values in eps_of.values() for e in values}):
        lacking = [a for a, values in eps_of.items() if eps in values and run.value(a, eps) is None]
        notes += [f"no {metric} row at eps {eps:g} for {', '.join(lacking)}"] if lacking else []
    run.note = "; ".join(notes)


def compare_runs(runs: str | Path | Sequence[str | Path], metric: str | None = None,
                 eps: float | Sequence[float] | None = None, split: str = "test", label_key: str | None = None,
                 attacks: Sequence[str] | None = None, count_params: bool = True,
                 higher_is_better: bool | None = None) -> Comparison:
    """The comparison of the runs in a sweep folder, or of the given run folders.

    Args:
        runs: a sweep folder (its job folders are found), or run folders (from any sweeps or machines).
        metric: the metric compared (a ``metric`` of ``robustness.csv``); ``None``: the task's (``task_metric``).
        eps: the eps (one or more, the rows' unit) of the table's robust columns; the runs are ranked at the largest.
            ``None``: every evaluated eps.
        split: whose rows (``test``: the tested checkpoint; ``val``: the last evaluated epoch).
        label_key: names each run (a config group or key, e.g. ``model``); ``None``: the overrides that differ.
        attacks: the attacks (``dag_linf``, ``pgd10_linf``, ...) to show; ``None``: every attack in the results.
        count_params: build each run's network from its config to count its parameters.
        higher_is_better: the metric's direction; ``None``: the task's (its torchmetrics' ``higher_is_better``).

    Raises:
        SelectionError: a folder that is no run (or holds none), or a metric / attack / eps / split no run has.
    """
    sweep_dir, jobs = _run_paths([runs] if isinstance(runs, (str, Path)) else list(runs))
    names = [job.relative_to(sweep_dir).as_posix() or "." if sweep_dir else str(job) for job in jobs]
    settings = runs_on_disk.differing_settings(jobs)
    keys = list(dict.fromkeys(([label_key] if label_key else []) + [k for s in settings for k in s]))
    labels = _labels(jobs, names, settings, label_key)
    results, rows_of, all_rows = [], {}, []
    for job, name, label in zip(jobs, names, labels):
        run = RunResult(job=name, label=label, settings={k: runs_on_disk.setting(job, k) or "-" for k in keys})
        run.params = runs_on_disk.count_parameters(job) if count_params else None
        run.seconds, run.time_from = runs_on_disk.run_time(job)
        results.append(run)
        if not (job / RESULTS).is_file():
            run.note = NO_RESULTS
            run.best_epoch, run.epoch_from = runs_on_disk.best_epoch(job, [])
            continue
        cells = [r for r in read_csv(job / RESULTS) if is_cell_row(r)]
        all_rows += cells
        run.best_epoch, run.epoch_from = runs_on_disk.best_epoch(job, [r for r in cells if r["split"] == "test"])
        mine = [r for r in cells if r["split"] == split]
        last = max((r["epoch"] for r in mine), default=None)
        rows_of[name] = [r for r in mine if r["epoch"] == last]
        if not mine:
            run.note = f"no {split} rows in {RESULTS}"
    _check("split", [split], sorted({r["split"] for r in all_rows}), f"the runs' {RESULTS}")
    found = [row for rows in rows_of.values() for row in rows]
    where = f"the runs' {RESULTS} ({split} split)"
    if metric is None:
        metric = next((m for m in map(runs_on_disk.task_metric, jobs) if m is not None), None) or "accuracy"
        if found and metric not in {r["metric"] for r in found}:  # the task's metric not evaluated: the first one
            metric = found[0]["metric"]
    _check("metric", [metric], sorted({r["metric"] for r in found}), where)
    found = [r for r in found if r["metric"] == metric]
    present = list(dict.fromkeys(r["attack"] for r in found if r["eps"] > 0))
    attacks = list(attacks) if attacks is not None else present
    _check("attack", attacks, present, f"{where} for {metric}")
    present = sorted({r["eps"] for r in found if r["eps"] > 0 and r["attack"] in attacks})
    eps_values = present if eps is None else [float(e) for e in ([eps] if isinstance(eps, (int, float)) else eps)]
    _check("eps", eps_values, present, f"{where} for {metric} under {', '.join(attacks)}", same=_same_eps)
    comparison = Comparison(sweep_dir, metric, eps_values, next((r["eps_unit"] for r in found), "model"), split,
                            keys, attacks, results)
    _threat_models(comparison, found)
    for run in results:
        if rows_of.get(run.job):
            _fill(run, rows_of[run.job], metric, comparison.eps_of,
                  {attack: comparison.headline_eps(attack) for attack in attacks})
    _direction(comparison, jobs, higher_is_better)
    comparison.most_robust, comparison.verdict = rank(comparison)
    for run in results:
        if run.note:
            log.warning("comparison: run %s (%s): %s", run.job, run.label, run.note)
    return comparison


def _threat_models(comparison: Comparison, rows: list[dict]) -> None:
    """Each attack's own eps (an L2 attack evaluated beside Linf ones has its own list), and the attacks the runs
    are ranked by: those in the first attack's norm (a worst over attacks of different norms at one eps compares
    nothing)."""
    c = comparison
    norms = {row["attack"]: row.get("norm") or "" for row in rows}
    c.eps_of = {a: [e for e in c.eps_values if any(r["attack"] == a and _same_eps(r["eps"], e) for r in rows)]
                for a in c.attacks}
    c.rank_norm = norms.get(c.attacks[0], "") if c.attacks else ""
    c.ranked = [a for a in c.attacks if norms.get(a, "") == c.rank_norm and c.eps_of[a]]


def _direction(comparison: Comparison, jobs: list[Path], higher_is_better: bool | None) -> None:
    """The metric's direction and whether it lives in [0, 1], from the first run whose task module builds."""
    facts = next((f for f in map(runs_on_disk.metric_facts, jobs) if f is not None), None)
    if facts is not None:
        comparison.higher_is_better = facts[0].get(comparison.metric)
        comparison.bounded = comparison.metric in facts[1]
        comparison.direction_from = "the task's metric declares (higher_is_better)"
    if higher_is_better is not None:
        comparison.higher_is_better, comparison.direction_from = higher_is_better, "given"


# -- the most robust run --------------------------------------------------------------------------------------------
def rank(comparison: Comparison) -> tuple[RunResult | None, str]:
    """The run with the best worst-over-attacks metric at the ranking eps, ties broken by the clean metric, and a
    sentence saying so (or why there is none)."""
    c = comparison
    if c.higher_is_better is None:
        return None, (f"Most robust: not chosen, {c.metric} has no better direction known "
                      "(give one with --higher-is-better / --lower-is-better).")
    ranked = [(run, c.worst(run)) for run in c.runs if c.worst(run) is not None]
    if not ranked:
        return None, f"Most robust: not chosen, no run has {c.metric} under every attack at eps {c.eps or 0:g}."
    sign = 1.0 if c.higher_is_better else -1.0
    def goodness(item):  # under attack first, then clean; a run without a clean value loses a tie
        run, (_, worst) = item
        return sign * worst, -math.inf if run.clean is None else sign * run.clean

    best, (attack, value) = max(ranked, key=goodness)
    tied = [run for run, (_, v) in ranked if v == value and run is not best]
    clean = "-" if best.clean is None else f"{best.clean:.4f}"
    text = (f"Most robust: {best.label} (run {best.job}): {c.metric} {value:.4f} under its strongest attack, "
            f"{attack}, at eps {c.eps:g} ({c.eps_unit} units); clean {clean}; "
            f"{'higher' if c.higher_is_better else 'lower'} is better, as {c.direction_from}.")
    if tied:
        fully = [run.label for run in tied if run.clean == best.clean]
        text += (f" Tied under attack with {', '.join(run.label for run in tied)}; chosen by its clean {c.metric}"
                 + (f" (tied there too with {', '.join(fully)}: the first in the table)." if fully else "."))
    return best, text


def write_comparison(comparison: Comparison, out_dir: str | Path | None = None) -> list[Path]:
    """``compare.md``, ``compare.csv``, ``compare.png`` and ``compare_<attack>_<metric>.png`` in ``out_dir``
    (default: the sweep folder, or the current folder for a list of runs)."""
    from medrobust.reporting.comparison_plots import plot_clean_vs_robust, plot_curves
    from medrobust.reporting.comparison_table import write_csv, write_markdown

    out = Path(out_dir or comparison.sweep_dir or ".")
    out.mkdir(parents=True, exist_ok=True)
    return [write_markdown(comparison, out / "compare.md"), write_csv(comparison, out / "compare.csv"),
            plot_clean_vs_robust(comparison, out / "compare.png"), *plot_curves(comparison, out)]


def main(argv: list[str] | None = None, prog: str = "python compare.py") -> Comparison:
    from medrobust.reporting.comparison_table import comparison_markdown

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="a sweep folder (outputs/<task>/multirun/<time>), or run folders from any sweeps")
    parser.add_argument("--out", type=Path, help="where to write (default: the sweep folder, or the current folder)")
    parser.add_argument("--metric", help="the metric compared (default: the task's, e.g. dice, mae, accuracy)")
    parser.add_argument("--eps", type=float, nargs="+", help="the eps of the robust columns; the runs are ranked "
                                                             "at the largest (default: every evaluated eps)")
    parser.add_argument("--attack", "--attacks", dest="attacks", nargs="+",
                        help="the attacks compared (default: all in the results)")
    parser.add_argument("--split", default="test", help="the split whose rows are compared (default: test)")
    parser.add_argument("--label-key", help="names the runs, e.g. model (default: the overrides that differ)")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", dest="higher", action="store_true", default=None,
                           help="rank by this direction (default: the task's metric says)")
    direction.add_argument("--lower-is-better", dest="higher", action="store_false")
    parser.add_argument("--no-params", action="store_true", help="do not build the models to count parameters")
    args = parser.parse_args(argv)
    try:
        comparison = compare_runs(args.runs, metric=args.metric, eps=args.eps, split=args.split,
                                  label_key=args.label_key, attacks=args.attacks, count_params=not args.no_params,
                                  higher_is_better=args.higher)
    except SelectionError as error:
        parser.error(str(error))
    paths = write_comparison(comparison, args.out)
    print(comparison_markdown(comparison))
    print("written: " + ", ".join(map(str, paths)))
    return comparison


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    main(prog="python -m medrobust.reporting.comparison")
