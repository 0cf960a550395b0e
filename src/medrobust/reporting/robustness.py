"""Robustness results on disk: the long-format CSV, metric-vs-eps curves and the summary table.

A result row is a plain dict with the keys of ``ROW_KEYS``: one metric value for one
(epoch, split, attack, norm, eps) cell, so a whole training run's curve history is one table.

Minimum-norm suites also write one row per sample (``metric="radius"``, ``sample`` its index in the
evaluation, ``eps`` empty, ``value`` the smallest adversarial perturbation found, ``inf`` where none): the
per-sample robustness radii, from which robust accuracy at any eps is ``1 - CDF``. Curves and summaries
read the per-cell rows only (:func:`is_cell_row`).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medrobust.reporting.atomic import atomic_path, save_figure_atomic  # noqa: E402

BOUNDED_YLIM = (-0.02, 1.02)  # a metric in [0, 1], with room for the markers at its ends
ROW_KEYS = ("epoch", "split", "attack", "norm", "eps", "eps_unit", "metric", "value", "points", "flags", "sample")


def is_cell_row(row: dict) -> bool:
    """A metric at one eps (not a per-sample radius row)."""
    return row.get("sample") in (None, "")


def radius_rows(radii, *, epoch: int, split: str, attack: str, norm: str, eps_unit: str) -> list[dict]:
    """One row per sample: its robustness radius (model units; ``inf`` = no adversarial point found)."""
    return [{"epoch": epoch, "split": split, "attack": attack, "norm": norm, "eps": "", "eps_unit": eps_unit,
             "metric": "radius", "value": float(r), "sample": i} for i, r in enumerate(radii)]


def format_eps(eps: float) -> str:
    """An eps as a key fragment without dots (W&B and CSV-logger keys split on dots): 0.004 -> '0p004'."""
    return f"{eps:g}".replace(".", "p").replace("-", "m")


def write_csv(rows: list[dict], path: Path) -> None:
    """Write all rows (the whole history, so a resumed run rewrites a consistent file); atomically: a run killed
    mid-write, or a row that fails to serialise, leaves the previous file readable."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_KEYS)
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in ROW_KEYS} for row in rows)


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["epoch"] = int(row["epoch"])
        row["value"] = float(row["value"])
        if is_cell_row(row):
            row["eps"] = float(row["eps"])
        else:
            row["sample"] = int(row["sample"])
    return rows


def curve_series(rows: list[dict], split: str) -> dict[tuple[str, str], dict[int, list[tuple[float, float]]]]:
    """``{(attack, metric): {epoch: [(eps, value), ...] sorted by eps}}`` for one split."""
    series: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["split"] == split and is_cell_row(row):
            series[(row["attack"], row["metric"])][row["epoch"]].append((row["eps"], row["value"]))
    return {key: {epoch: sorted(points) for epoch, points in by_epoch.items()} for key, by_epoch in series.items()}


def plot_curves(rows: list[dict], out_dir: Path, split: str, prefix: str = "",
                metrics: Sequence[str] | None = None, bounded: Collection[str] = ()) -> list[Path]:
    """One PNG per (attack, metric): metric vs eps, one line per epoch. A family of sub-metrics named
    ``<metric>_<part>`` (a shift per target band) shares one PNG, ``<attack>_<metric>_by_part.png``: one line
    per part, at the last epoch. ``metrics``: the metrics (and their families) to draw; ``None``: all (the task's
    ``curve_metrics``). ``bounded``: metrics in [0, 1], drawn on a fixed y-axis (the task's ``bounded_metrics``).
    Returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series = curve_series(rows, split)
    if metrics is not None:
        series = {(a, m): by for (a, m), by in series.items() if any(m == k or m.startswith(k + "_") for k in metrics)}
    unit = rows[0]["eps_unit"] if rows else "model"
    written = []
    for (attack, metric), by_epoch in sorted(series.items()):
        family = next((base for a, base in series if a == attack and metric.startswith(base + "_")), None)
        if family is not None:
            continue  # drawn with its family below
        epochs = sorted(by_epoch)
        cmap = plt.get_cmap("viridis")
        lines = [(f"epoch {epoch}", by_epoch[epoch], cmap(i / max(len(epochs) - 1, 1))) for i, epoch in enumerate(epochs)]
        fixed = metric in bounded
        written.append(_plot_lines(lines, out_dir / f"{prefix}{attack}_{metric}.png", metric, unit,
                                   f"{split}: {metric} under {attack}", fixed))
        parts = {m[len(metric) + 1:]: series[a, m] for a, m in series if a == attack and m.startswith(metric + "_")}
        if parts:
            last = max(epochs)
            cmap = plt.get_cmap("tab10")
            lines = [(part, by[last], cmap(i % 10)) for i, (part, by) in enumerate(sorted(parts.items())) if last in by]
            written.append(_plot_lines(lines, out_dir / f"{prefix}{attack}_{metric}_by_part.png", metric, unit,
                                       f"{split}: {metric} under {attack}, epoch {last}", fixed))
    return written


def _plot_lines(lines: list[tuple[str, list, object]], path: Path, metric: str, unit: str, title: str,
                bounded: bool) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    for label, points, color in lines:
        eps, values = zip(*points)
        ax.plot(eps, values, marker="o", color=color, label=label)
    ax.set_xlabel(f"eps ({unit} units)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    if bounded:
        ax.set_ylim(*BOUNDED_YLIM)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(lines) > 6 else 1)
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.14, top=0.9)  # fixed: tight_layout draws twice
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def summary_markdown(rows: list[dict], split: str, title: str, notes: list[str] | None = None,
                     warnings: list[str] | None = None, success_metric: str = "accuracy",
                     shift_metric: str | None = None) -> str:
    """A clean-vs-robust table: one line per (attack, eps), one column per metric, for the last epoch, then one
    sentence per attack on how much of ``success_metric`` survives its largest eps (and, with ``shift_metric``,
    how far it moves the predictions). Both come from the task (``success_metric``, ``shift_metric``)."""
    selected = [row for row in rows if row["split"] == split and is_cell_row(row)]
    if not selected:
        return f"# {title}\n\nNo robustness results for split '{split}'.\n"
    last_epoch = max(row["epoch"] for row in selected)
    selected = [row for row in selected if row["epoch"] == last_epoch]
    metrics = list(dict.fromkeys(row["metric"] for row in selected))
    cells: dict = defaultdict(dict)
    for row in selected:
        cells[(row["attack"], row["eps"])][row["metric"]] = row["value"]
    unit = selected[0]["eps_unit"]
    lines = [f"# {title}", "", *(f"{w}\n" for w in warnings or []),
             f"Split: {split} (epoch {last_epoch}); eps in {unit} units.", ""]
    lines.append("| attack | eps | " + " | ".join(metrics) + " |")
    lines.append("|---|---|" + "---|" * len(metrics))
    clean_done = False
    for (attack, eps), values in sorted(cells.items(), key=lambda item: (item[0][1] != 0, item[0][0], item[0][1])):
        if eps == 0:
            if clean_done:  # eps 0 is the same clean evaluation for every attack
                continue
            clean_done, attack = True, "clean"
        # a metric only some attacks report (a targeted attack's success rate) is left blank elsewhere
        lines.append(f"| {attack} | {eps:g} | " + " | ".join(f"{values[m]:.4f}" if m in values else "" for m in metrics)
                     + " |")
    lines.extend(["", *_survival_lines(cells, success_metric, shift_metric), *(notes or [])])
    return "\n".join(lines).rstrip() + "\n"


def _survival_lines(cells: dict, metric: str, shift_metric: str | None) -> list[str]:
    """One sentence per attack: how much of the clean metric survives at the largest eps."""
    clean = next((values[metric] for (_, eps), values in cells.items() if eps == 0 and metric in values), None)
    if not clean:
        return []
    lines = []
    for attack in sorted({attack for attack, _ in cells}):
        eps = max(e for a, e in cells if a == attack)
        value = cells[attack, eps].get(metric)
        if eps > 0 and value is not None:
            shift = cells[attack, eps].get(shift_metric) if shift_metric else None
            moved = f"; predictions shift by {shift:.2f} on average" if shift is not None else ""
            lines.append(f"- {attack} at eps={eps:g}: {metric} {value:.4f} vs {clean:.4f} clean "
                         f"({100 * value / clean:.0f} % survives){moved}")
    return [*lines, ""] if lines else []
