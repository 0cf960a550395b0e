"""The comparison's table (:mod:`medrobust.reporting.comparison`) as ``compare.md`` and ``compare.csv``: one row per
run, one robust column per (attack, eps), the worst over attacks at the ranking eps, best epoch and run time."""

from __future__ import annotations

import csv
from pathlib import Path

from medrobust.reporting.robustness import format_eps


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def _ranked(c) -> str:
    """Which attacks the worst is over, where the comparison mixes norms."""
    return "" if c.ranked == c.attacks or not c.ranked else f"{c.rank_norm} ({', '.join(c.ranked)}) "


def comparison_markdown(comparison) -> str:
    c = comparison
    eps = "-" if c.eps is None else f"{c.eps:g}"
    where = f"Runs under {c.sweep_dir}" if c.sweep_dir else "Runs " + ", ".join(run.job for run in c.runs)
    points = sorted({f"{attack}: {kind}" for run in c.runs for attack, kind in run.points.items() if kind})
    times = sorted({run.time_from for run in c.runs if run.time_from})
    lines = [f"# Clean vs robust {c.metric} ({c.split} split)", "", c.verdict, "",
             f"{where}. Robust {c.metric}: each attack's {c.metric} at each eps ({c.eps_unit} units); worst: the "
             f"strongest {_ranked(c)}attack's at eps {eps}, what the runs are ranked by; the points it was read at: "
             + ("; ".join(points) or "-") + ". Best epoch: the epoch of the tested weights. Run time: from "
             + (" / ".join(times) or "-") + " (the log's first to last line; file times: config to newest file).",
             ""]
    if any(run.flags for run in c.runs):
        lines += ["flags: the run's own gradient-masking checks on these rows (its summary.md says more).", ""]
    if c.missing:
        lines += [f"**Missing results in {len(c.missing)} of {len(c.runs)} runs:**", "",
                  *(f"- {run.label} (run {run.job}): {run.note}" for run in c.missing), ""]
    header = [*c.keys, "run", "params", f"clean {c.metric}", *(f"{a} {c.metric} @ {e:g}" for a, e in c.cells()),
              f"worst {c.metric} @ {eps}", "most robust", "best epoch", "run time", "flags", "note"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in c.runs:
        worst = c.worst(run)
        cells = [*(run.settings.get(k, "-") for k in c.keys), run.job, "" if run.params is None else f"{run.params:,}",
                 _fmt(run.clean), *(_fmt(run.value(a, e)) for a, e in c.cells()),
                 "" if worst is None else f"{worst[1]:.4f} ({worst[0]})", "**yes**" if run is c.most_robust else "",
                 "" if run.best_epoch is None else str(run.best_epoch), _duration(run.seconds),
                 " ".join(run.flags), run.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(comparison, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(comparison_markdown(comparison))
    tmp.replace(path)  # a reader never sees half a file
    return path


def write_csv(comparison, path: Path) -> Path:
    c = comparison
    rank_eps = format_eps(c.eps or 0.0)
    fields = [*c.keys, "run", "params", f"clean_{c.metric}", *(c.column(a, e) for a, e in c.cells()),
              f"worst_{c.metric}_eps{rank_eps}", "strongest_attack", "most_robust", "best_epoch", "best_epoch_from",
              "run_time_s", "run_time_from", "flags", "note"]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for run in c.runs:
            worst = c.worst(run) or ("", None)
            numbers = [run.clean, *(run.value(a, e) for a, e in c.cells()), worst[1]]
            writer.writerow([*(run.settings.get(k, "-") for k in c.keys), run.job,
                             "" if run.params is None else run.params,
                             *("" if v is None else repr(v) for v in numbers), worst[0],
                             "yes" if run is c.most_robust else "",
                             "" if run.best_epoch is None else run.best_epoch, run.epoch_from,
                             "" if run.seconds is None else f"{run.seconds:.3f}", run.time_from,
                             ";".join(run.flags), run.note])
    tmp.replace(path)
    return path
