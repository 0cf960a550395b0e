"""The comparison's figures (:mod:`medrobust.reporting.comparison`): clean vs robust, one point per run and attack
(``compare.png``), and each attack's curve of every run overlaid (``compare_<attack>_<metric>.png``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medrobust.reporting.robustness import _plot_lines  # noqa: E402


def plot_curves(comparison, out_dir: Path) -> list[Path]:
    """One PNG per attack: the metric vs eps (the clean value at eps 0), one line per run, named by its label."""
    c = comparison
    cmap = plt.get_cmap("tab10")
    written = []
    for attack in c.attacks:
        lines = []
        for i, run in enumerate(c.runs):
            points = sorted(run.curves.get(attack, {}).items())
            if points:
                lines.append((run.label, ([(0.0, run.clean)] if run.clean is not None else []) + points, cmap(i % 10)))
        if lines:
            written.append(_plot_lines(lines, out_dir / f"compare_{attack}_{c.metric}.png", c.metric, c.eps_unit,
                                       f"{c.split}: {c.metric} under {attack}, one line per run", c.bounded))
    return written


def plot_clean_vs_robust(comparison, path: Path) -> Path:
    """Clean metric on x (generalizability), metric under each attack at the ranking eps on y (robustness)."""
    c = comparison
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=100)
    markers, colors = "osD^vP*X", plt.get_cmap("tab10")
    values = []
    for i, attack in enumerate(c.attacks):
        points = [(run.clean, run.robust[attack]) for run in c.runs
                  if run.clean is not None and run.robust.get(attack) is not None]
        if points:
            values += [v for point in points for v in point]
            name = attack if c.headline_eps(attack) == c.eps else f"{attack} @ {c.headline_eps(attack):g}"
            ax.scatter(*zip(*points), marker=markers[i % len(markers)], color=colors(i % 10), label=name, zorder=3)
    for run in c.runs:  # a run's attacks share its clean value: one line joins its points, one name labels them
        ys = [run.robust[a] for a in c.attacks if run.robust.get(a) is not None]
        if run.clean is not None and ys:
            ax.plot([run.clean] * len(ys), ys, color="lightgrey", lw=0.8, zorder=2)
            name = run.label + (" (most robust)" if run is c.most_robust else "")
            ax.annotate(name, (run.clean, max(ys)), textcoords="offset points", xytext=(4, 3), fontsize=7)
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
    return path
