"""Compare the runs of a sweep: one row per job with its clean metric and each attack's metric at one eps, written
as ``comparison.md``, ``comparison.csv`` and ``comparison.png`` (clean value on x: generalizability; value under
attack on y: robustness; one point per run and attack).

Only what each job left on disk is read: ``robustness.csv`` (rows of ``ROW_KEYS``), ``.hydra/overrides.yaml`` and
``.hydra/hydra.yaml`` (the run's name), ``config.yaml`` (the task, for the default metric; the model, for its
parameter count). A job folder without ``robustness.csv`` (a failed or unfinished run) keeps its row, saying so.

    python -m medrobust.reporting.comparison <sweep_dir> [--metric dice] [--eps 0.004] [--label-key model]
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from medrobust.reporting.robustness import format_eps, is_cell_row, read_csv  # noqa: E402

log = logging.getLogger("medrobust")

RESULTS = "robustness.csv"
OUTPUTS = ("comparison.md", "comparison.csv", "comparison.png")
NO_RESULTS = f"no {RESULTS} (the run failed or has not finished)"


@dataclass
class RunResult:
    """One job's line: ``robust`` maps attack -> metric at the chosen eps; ``note`` says what is missing."""

    job: str
    label: str
    params: int | None = None
    clean: float | None = None
    robust: dict[str, float] = field(default_factory=dict)
    points: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class Comparison:
    sweep_dir: Path
    metric: str
    eps: float | None
    eps_unit: str
    split: str
    label_name: str
    attacks: list[str]
    runs: list[RunResult]

    @property
    def missing(self) -> list[RunResult]:
        return [run for run in self.runs if run.note]

    def column(self, attack: str) -> str:
        return f"{self.metric}_{attack}_eps{format_eps(self.eps or 0.0)}"


# -- the jobs and their names ---------------------------------------------------------------------------------
def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """The job folders under ``sweep_dir``: those holding ``.hydra/overrides.yaml``, in job-number order."""
    sweep_dir = Path(sweep_dir)
    jobs = {path.parent.parent for path in sweep_dir.rglob("overrides.yaml") if path.parent.name == ".hydra"}
    return sorted(jobs, key=lambda job: _natural(job.relative_to(sweep_dir).as_posix()))


def _natural(text: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def _overrides(job: Path) -> list[str]:
    return [str(item) for item in OmegaConf.load(job / ".hydra" / "overrides.yaml")]


def _choice(job: Path, key: str) -> str | None:
    """``key``'s value in the job's command-line overrides, else its config-group choice (``hydra.yaml``)."""
    for item in _overrides(job):
        name, _, value = item.partition("=")
        if name.lstrip("+~") == key:
            return value
    hydra_yaml = job / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        choices = OmegaConf.load(hydra_yaml).hydra.runtime.get("choices") or {}
        value = choices.get(key)
        return None if value is None else str(value)
    return None


def job_labels(jobs: list[Path], sweep_dir: Path, label_key: str | None) -> list[str]:
    """A name per job: ``label_key``'s value (``model`` -> ``unet_wide``); without one, the overrides that differ
    between the jobs (``adv=fgsm``). A name shared by several jobs gets the job folder added."""
    folders = [job.relative_to(sweep_dir).as_posix() or "." for job in jobs]
    if label_key is not None:
        labels = [_choice(job, label_key) or folder for job, folder in zip(jobs, folders)]
    else:
        overrides = [_overrides(job) for job in jobs]
        shared = set.intersection(*map(set, overrides)) if len(jobs) > 1 else set()
        labels = [" ".join(o for o in items if o not in shared) or folder for items, folder in zip(overrides, folders)]
    return [f"{label} ({folder})" if labels.count(label) > 1 else label for label, folder in zip(labels, folders)]


# -- what a job's config tells ---------------------------------------------------------------------------------
def _config(job: Path):
    path = job / "config.yaml"  # written resolved by train.py / eval.py
    return OmegaConf.load(path) if path.is_file() else None


def task_metric(job: Path) -> str | None:
    """The task's headline continuous metric (the first it declares its attack loss drives, segmentation's
    ``dice``), else its success metric (``accuracy``); ``None`` without a readable config."""
    from hydra.utils import get_class

    cfg = _config(job)
    target = OmegaConf.select(cfg, "module._target_") if cfg is not None else None
    if target is None:
        return None
    try:
        task = get_class(target)
    except (ImportError, ValueError):  # a task class from code not installed here: no default from it
        return None
    attacked = getattr(task, "attacked_metrics", None)
    return attacked[0] if isinstance(attacked, (tuple, list)) and attacked else task.success_metric


def count_parameters(job: Path) -> int | None:
    """Parameters of the job's network, built from its ``config.yaml`` (``None`` where it cannot be built)."""
    from hydra.utils import instantiate

    cfg = _config(job)
    if cfg is None or OmegaConf.select(cfg, "model._target_") is None:
        return None
    try:
        net = instantiate(cfg.model, _convert_="all")
    except Exception as error:  # a model needing data or a missing package: the table says n/a, not fail
        log.warning("comparison: cannot build the model of %s to count its parameters: %s", job, error)
        return None
    return sum(p.numel() for p in net.parameters())


# -- the table --------------------------------------------------------------------------------------------------
def _same_eps(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _read_run(run: RunResult, rows: list[dict], metric: str, eps: float, attacks: list[str]) -> None:
    """Fill ``run`` from its rows (one split, one epoch); what is missing goes to ``run.note``."""
    missing = []
    for attack in attacks:
        row = next((r for r in rows if r["attack"] == attack and r["metric"] == metric and _same_eps(r["eps"], eps)),
                   None)
        if row is None:
            missing.append(attack)
        else:
            run.robust[attack], run.points[attack] = row["value"], row.get("points") or ""
    clean = next((r for r in rows if r["metric"] == metric and r["eps"] == 0), None)
    run.clean = None if clean is None else clean["value"]
    run.flags = sorted({flag for r in rows for flag in (r.get("flags") or "").split(";") if flag})
    notes = [] if clean is not None else [f"no clean {metric} row"]
    notes += [f"no {metric} row at eps {eps:g} for {', '.join(missing)}"] if missing else []
    run.note = "; ".join(notes)


def compare_runs(sweep_dir: str | Path, metric: str | None = None, eps: float | None = None, split: str = "test",
                 label_key: str | None = None, attacks: list[str] | None = None,
                 count_params: bool = True) -> Comparison:
    """The comparison of every job under ``sweep_dir``.

    Args:
        metric: the metric compared (a ``metric`` of ``robustness.csv``); ``None``: the task's (:func:`task_metric`).
        eps: the attack strength of the robust column (the rows' unit); ``None``: the largest eps in the results.
        split: whose rows (``test``: the tested checkpoint; ``val``: the last evaluated epoch).
        label_key: names each run (a config group or key, e.g. ``model``); ``None``: the overrides that differ.
        attacks: the attacks (``dag_linf``, ``pgd10_linf``, ...) to show; ``None``: every attack in the results.
        count_params: build each job's network from its ``config.yaml`` to count its parameters.
    """
    sweep_dir = Path(sweep_dir)
    jobs = find_jobs(sweep_dir)
    if not jobs:
        log.warning("comparison: no job folders (with .hydra/overrides.yaml) under %s", sweep_dir)
    labels = job_labels(jobs, sweep_dir, label_key)
    runs, all_rows = [], {}
    for job, label in zip(jobs, labels):
        run = RunResult(job=job.relative_to(sweep_dir).as_posix() or ".", label=label)
        run.params = count_parameters(job) if count_params else None
        runs.append(run)
        if not (job / RESULTS).is_file():
            run.note = NO_RESULTS
            continue
        rows = [r for r in read_csv(job / RESULTS) if r["split"] == split and is_cell_row(r)]
        last = max((r["epoch"] for r in rows), default=None)
        all_rows[run.job] = [r for r in rows if r["epoch"] == last]
        if not rows:
            run.note = f"no {split} rows in {RESULTS}"
    found = [row for rows in all_rows.values() for row in rows]
    if metric is None:
        metric = next((m for m in map(task_metric, jobs) if m is not None), None) or "accuracy"
    if eps is None:
        eps = max((r["eps"] for r in found if r["metric"] == metric), default=None)
    if attacks is None:
        attacks = list(dict.fromkeys(r["attack"] for r in found if r["metric"] == metric and r["eps"] > 0))
    for run in runs:
        if all_rows.get(run.job):
            _read_run(run, all_rows[run.job], metric, eps if eps is not None else 0.0, attacks)
    unit = next((r["eps_unit"] for r in found), "model")
    for run in runs:
        if run.note:
            log.warning("comparison: job %s (%s): %s", run.job, run.label, run.note)
    return Comparison(sweep_dir, metric, eps, unit, split, label_key or "run", list(attacks), runs)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def comparison_markdown(comparison: Comparison) -> str:
    c = comparison
    eps = "-" if c.eps is None else f"{c.eps:g}"
    points = sorted({f"{attack}: {kind}" for run in c.runs for attack, kind in run.points.items() if kind})
    lines = [f"# Clean vs robust {c.metric} ({c.split} split)", "",
             f"Runs under {c.sweep_dir}. Robust {c.metric}: each attack's {c.metric} at eps {eps} ({c.eps_unit} "
             f"units); the points it was read at: " + ("; ".join(points) or "-") + ".", ""]
    if any(run.flags for run in c.runs):
        lines += ["flags: the run's own gradient-masking checks on these rows (its summary.md says more).", ""]
    if c.missing:
        lines += [f"**Missing results in {len(c.missing)} of {len(c.runs)} runs:**", "",
                  *(f"- {run.label} (job {run.job}): {run.note}" for run in c.missing), ""]
    header = [c.label_name, "job", "params", f"clean {c.metric}", *(f"{a} {c.metric} @ {eps}" for a in c.attacks),
              "flags", "note"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in c.runs:
        cells = [run.label, run.job, "" if run.params is None else f"{run.params:,}", _fmt(run.clean),
                 *(_fmt(run.robust.get(a)) for a in c.attacks), " ".join(run.flags), run.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(comparison: Comparison, path: Path) -> None:
    c = comparison
    fields = [c.label_name, "job", "params", f"clean_{c.metric}", *map(c.column, c.attacks), "flags", "note"]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for run in c.runs:
            writer.writerow([run.label, run.job, "" if run.params is None else run.params,
                             "" if run.clean is None else repr(run.clean),
                             *("" if run.robust.get(a) is None else repr(run.robust[a]) for a in c.attacks),
                             ";".join(run.flags), run.note])
    tmp.replace(path)  # a reader never sees half a file


def _plot(comparison: Comparison, path: Path) -> None:
    c = comparison
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=100)
    markers, colors = "osD^vP*X", plt.get_cmap("tab10")
    values = []
    for i, attack in enumerate(c.attacks):
        points = [(run.clean, run.robust[attack]) for run in c.runs
                  if run.clean is not None and run.robust.get(attack) is not None]
        if points:
            values += [v for point in points for v in point]
            ax.scatter(*zip(*points), marker=markers[i % len(markers)], color=colors(i % 10), label=attack, zorder=3)
    for run in c.runs:  # a run's attacks share its clean value: one line joins its points, one name labels them
        ys = [run.robust[a] for a in c.attacks if run.robust.get(a) is not None]
        if run.clean is not None and ys:
            ax.plot([run.clean] * len(ys), ys, color="lightgrey", lw=0.8, zorder=2)
            ax.annotate(run.label, (run.clean, max(ys)), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if values:  # robust = clean: how far below it each point lies is what the attack took
        low, high = min(values), max(values)
        pad = 0.05 * (high - low or 1.0)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], "--", color="grey", lw=0.8, label="robust = clean")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    eps = "-" if c.eps is None else f"{c.eps:g}"
    ax.set_xlabel(f"clean {c.metric} (generalizability)")
    ax.set_ylabel(f"{c.metric} under attack, eps {eps} {c.eps_unit} units (robustness)")
    ax.set_title(f"{c.split}: clean vs robust {c.metric}, one point per run and attack", fontsize=10)
    ax.grid(alpha=0.3)
    if c.missing:
        fig.text(0.01, 0.01, "missing results: " + ", ".join(run.label for run in c.missing), fontsize=7, color="red")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.92)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_comparison(comparison: Comparison, out_dir: str | Path | None = None) -> list[Path]:
    """``comparison.md``, ``comparison.csv`` and ``comparison.png`` in ``out_dir`` (default: the sweep folder)."""
    out = Path(out_dir or comparison.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, table, figure = (out / name for name in OUTPUTS)
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(comparison_markdown(comparison))
    tmp.replace(md)
    _write_csv(comparison, table)
    _plot(comparison, figure)
    return [md, table, figure]


def main(argv: list[str] | None = None) -> Comparison:
    parser = argparse.ArgumentParser(prog="python -m medrobust.reporting.comparison",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (its job folders hold robustness.csv)")
    parser.add_argument("--metric", help="the metric compared (default: the task's, e.g. dice)")
    parser.add_argument("--eps", type=float, help="the eps of the robust columns (default: the largest evaluated)")
    parser.add_argument("--split", default="test", help="the split whose rows are compared (default: test)")
    parser.add_argument("--label-key", help="names the runs, e.g. model (default: the overrides that differ)")
    parser.add_argument("--attacks", nargs="+", help="the attacks shown (default: all in the results)")
    parser.add_argument("--no-params", action="store_true", help="do not build the models to count parameters")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"no such folder: {args.sweep_dir}")
    comparison = compare_runs(args.sweep_dir, metric=args.metric, eps=args.eps, split=args.split,
                              label_key=args.label_key, attacks=args.attacks, count_params=not args.no_params)
    paths = write_comparison(comparison)
    print(comparison_markdown(comparison))
    print("written: " + ", ".join(map(str, paths)))
    return comparison


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    main()
