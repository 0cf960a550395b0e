"""Curves a metric draws (:mod:`medrobust.evaluation.metric_curves`: a detector's FROC), on disk and in W&B.

For the latest evaluation of a split: ``curves/<prefix><attack>_<kind>.png`` (one line per eps, clean first),
``curves/<prefix><kind>.csv`` (every point of every curve), a ``summary.md`` section reading each curve at its
marks (LUNA16's table: sensitivity at 1/8 ... 8 false positives per scan, and the CPM), and a W&B table. The prefix
is the split's, as for the metric-vs-eps curves (``""`` for validation, ``test_`` ...).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medrobust.evaluation.metric_curves import MetricCurve  # noqa: E402
from medrobust.evaluation.worst_case import CLEAN, points_note  # noqa: E402
from medrobust.reporting.atomic import atomic_path, save_figure_atomic  # noqa: E402

CSV_KEYS = ("epoch", "split", "attack", "eps", "eps_unit", "metric", "points", "x", "y", "threshold")
SECTION = "metric_curves"  # summary.md's section
SECTION_ORDER = 12  # after the robustness table (10), before the sensitivity section (15)

# (attack, eps) -> metric -> (curve, the kind of points it was read at), as the evaluation gives them
Curves = dict[tuple[str, float], dict[str, tuple[MetricCurve, str]]]


def _by_metric(curves: Curves) -> dict[str, dict[tuple[str, float], tuple[MetricCurve, str]]]:
    grouped: dict[str, dict] = defaultdict(dict)
    for cell, by_metric in curves.items():
        for metric, entry in by_metric.items():
            grouped[metric][cell] = entry
    return grouped


def _prefix(split: str) -> str:
    return "" if split == "val" else f"{split}_"


def _lines_by_attack(cells: dict[tuple[str, float], tuple[MetricCurve, str]]) -> dict[str, list]:
    """One metric's cells as ``{attack: [(eps, curve, points), ...]}``, each attack's lines by eps, clean first."""
    by_attack: dict[str, list] = defaultdict(list)
    for (attack, eps), entry in cells.items():
        by_attack[attack].append((eps, *entry))
    return {attack: sorted(lines, key=lambda line: line[0]) for attack, lines in by_attack.items()}


def _entries(cells: dict[tuple[str, float], tuple[MetricCurve, str]]) -> list[tuple[str, float, MetricCurve, str]]:
    """One metric's cells as ``(attack, eps, curve, points)``, the clean curve (every attack's eps 0 holds it)
    once, as attack ``clean``, where it first appears."""
    entries, clean_done = [], False
    for (attack, eps), (curve, points) in cells.items():
        if eps == 0:
            if clean_done:
                continue
            clean_done, attack = True, "clean"
        entries.append((attack, eps, curve, points))
    return entries


def curve_rows(metric: str, cells: dict, *, split: str, epoch: int, eps_unit: str) -> list[dict]:
    """One row per point of each of ``metric``'s curves (``CSV_KEYS``), the clean curve once."""
    rows = []
    for attack, eps, curve, points in _entries(cells):
        thresholds = list(curve.thresholds) or [""] * len(curve.x)
        rows += [{"epoch": epoch, "split": split, "attack": attack, "eps": eps, "eps_unit": eps_unit,
                  "metric": metric, "points": points, "x": float(x), "y": float(y), "threshold": threshold}
                 for x, y, threshold in zip(curve.x, curve.y, thresholds)]
    return rows


def write_metric_curves(out_dir: Path, curves: Curves, *, split: str, epoch: int, eps_unit: str) -> list[Path]:
    """The PNGs and CSVs of this evaluation's curves (module docstring); the paths written."""
    folder, written = Path(out_dir) / "curves", []
    folder.mkdir(parents=True, exist_ok=True)
    for metric, cells in _by_metric(curves).items():
        kind = next(iter(cells.values()))[0].kind
        for attack, lines in _lines_by_attack(cells).items():
            path = folder / f"{_prefix(split)}{attack}_{kind}.png"
            written.append(_plot(lines, path, eps_unit, f"{split}: {kind.upper()} under {attack}, epoch {epoch}"))
        rows = curve_rows(metric, cells, split=split, epoch=epoch, eps_unit=eps_unit)
        path = folder / f"{_prefix(split)}{kind}.csv"
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(CSV_KEYS))
            writer.writeheader()
            writer.writerows(rows)
        written.append(path)
    return written


def _plot(lines: list[tuple[float, MetricCurve, str]], path: Path, eps_unit: str, title: str) -> Path:
    """One line per eps; each curve continues flat to the right edge, as it is read beyond its last point."""
    first = lines[0][1]
    marks = [x for x, _ in first.marks]
    right = max(marks) * 1.5 if marks else None
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    attacked = [eps for eps, _, _ in lines if eps > 0]
    shades = dict(zip(attacked, plt.get_cmap("plasma")(np.linspace(0.1, 0.85, len(attacked)))))
    for eps, curve, _ in lines:
        x, y = list(curve.x), list(curve.y)
        if right is not None and x and x[-1] < right:
            x, y = x + [right], y + [y[-1]]
        colour = shades.get(eps, "k")  # clean: black
        label = "clean" if eps == 0 else f"eps {eps:g}"
        ax.plot(x, y, color=colour, label=f"{label} ({curve.summary_name} {curve.summary:.3f})")
    if first.log_x:
        ax.set_xscale("log")
    if marks:
        ax.set_xlim(min(marks) / 1.5, right)
        ax.set_xticks(marks, [f"{x:g}" for x in marks])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(first.x_name)
    ax.set_ylabel(first.y_name)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=f"eps in {eps_unit} units", title_fontsize=7)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.9)
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def metric_curves_markdown(curves: Curves, *, split: str, epoch: int, eps_unit: str, success_metric: str) -> str:
    """The section: per curve kind, one line for the clean curve and one per (attack, eps), read at its marks."""
    sections = []
    for metric, cells in _by_metric(curves).items():
        first = next(iter(cells.values()))[0]
        header = [f"{x:g}" for x, _ in first.marks]
        lines = [f"# {first.kind.upper()} ({metric})", "",
                 f"Split: {split} (epoch {epoch}); eps in {eps_unit} units. {first.y_name.capitalize()} at "
                 f"{', '.join(header)} {first.x_name}, and their mean, the {first.summary_name}. The curves: "
                 f"`curves/{_prefix(split)}<attack>_{first.kind}.png` and `curves/{_prefix(split)}{first.kind}.csv`.",
                 "", f"| attack | eps | {' | '.join(header)} | {first.summary_name} |",
                 "|---|---|" + "---|" * (len(header) + 1)]
        points = {}
        for attack, eps, curve, kind in _entries(cells):
            if kind != CLEAN:
                points[attack] = kind
            values = " | ".join(f"{y:.3f}" for _, y in curve.marks)
            lines.append(f"| {attack} | {eps:g} | {values} | {curve.summary:.3f} |")
        if points:
            lines += ["", points_note(points, success_metric)]
        sections.append("\n".join(lines))
    return "\n\n".join(sections).rstrip() + "\n"


def log_metric_curves_to_wandb(loggers, curves: Curves, *, split: str, epoch: int, eps_unit: str) -> None:
    """Every point as a W&B table ``robustness/<split>_<kind>_table`` and, per attack, a line-series chart
    ``robustness/<split>_<attack>_<kind>`` (one line per eps); a no-op without a ``WandbLogger``."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    if not wandb_loggers or not curves:
        return
    import wandb

    payload = {}
    for metric, cells in _by_metric(curves).items():
        kind = next(iter(cells.values()))[0].kind
        rows = curve_rows(metric, cells, split=split, epoch=epoch, eps_unit=eps_unit)
        payload[f"robustness/{split}_{kind}_table"] = wandb.Table(
            columns=list(CSV_KEYS), data=[[row[key] for key in CSV_KEYS] for row in rows])
        for attack, lines in _lines_by_attack(cells).items():
            payload[f"robustness/{split}_{attack}_{kind}"] = wandb.plot.line_series(
                xs=[curve.x.tolist() for _, curve, _ in lines], ys=[curve.y.tolist() for _, curve, _ in lines],
                keys=["clean" if eps == 0 else f"eps {eps:g}" for eps, _, _ in lines],
                title=f"{split}: {kind.upper()} under {attack}", xname=lines[0][1].x_name)
    for logger in wandb_loggers:
        logger.experiment.log(payload)
