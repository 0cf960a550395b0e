"""Accuracy without the most attack-sensitive samples on disk: ``robustness.csv`` rows, a curve PNG per attack and
a ``summary.md`` section (the numbers: :mod:`medrobust.evaluation.sensitivity`).

The rows are cells of their own metric, :data:`SENSITIVITY_METRIC`, one per (epoch, split, attack, eps), so
loggers, W&B and ``compare.py --metric accuracy_sensitive_removed`` read them like any other metric. The
robustness table and the per-metric PNGs leave them out (:func:`main_rows`): they have their own section and PNG.
"""

from __future__ import annotations

from pathlib import Path

from medrobust.evaluation.sensitivity import SensitivityCurve
from medrobust.evaluation.worst_case import CLEAN, FIRST_FAILURE
from medrobust.reporting.robustness import _plot_lines

SENSITIVITY_METRIC = "accuracy_sensitive_removed"
SECTION = "sensitivity"
SECTION_ORDER = 15  # right after the robustness table (10), before the universal perturbations (20)


def main_rows(rows: list[dict]) -> list[dict]:
    """``rows`` without the sensitivity rows: what the robustness table and the per-metric curves read."""
    return [row for row in rows if row["metric"] != SENSITIVITY_METRIC]


def sensitivity_rows(curve: SensitivityCurve, *, epoch: int, split: str, attack: str, norm: str,
                     eps_unit: str) -> list[dict]:
    """One row per eps: the accuracy on the kept samples, read at the radii's first-failure points (as the
    attack's own accuracy rows)."""
    return [{"epoch": epoch, "split": split, "attack": attack, "norm": norm, "eps": eps, "eps_unit": eps_unit,
             "metric": SENSITIVITY_METRIC, "value": value, "points": FIRST_FAILURE if eps > 0 else CLEAN}
            for eps, value in zip(curve.eps, curve.kept)]


def _percent(drop: float) -> str:
    return f"{100 * drop:g} %"


def plot_sensitivity(out_dir: Path, attack: str, split: str, epoch: int, curve: SensitivityCurve,
                     eps_unit: str) -> Path:
    """``curves/<split>_<attack>_accuracy_sensitive_removed.png``: accuracy vs eps on all samples and on the kept
    ones (not ``..._sensitivity.png``: that is the classifiers' sensitivity curve at test time)."""
    lines = [(f"all {curve.samples} samples", list(zip(curve.eps, curve.all)), "#4477aa"),
             (f"without the most sensitive {_percent(curve.drop)} ({curve.samples_kept} kept)",
              list(zip(curve.eps, curve.kept)), "#cc6677")]
    path = Path(out_dir) / "curves" / f"{split}_{attack}_{SENSITIVITY_METRIC}.png"
    return _plot_lines(lines, path, "accuracy", eps_unit, f"{split}: {attack}, epoch {epoch}", bounded=True)


def sensitivity_markdown(curves: dict[str, SensitivityCurve], split: str, epoch: int, eps_unit: str) -> str:
    """The section: per attack, accuracy at each eps on all samples and without the most sensitive ones."""
    drops = sorted({_percent(curve.drop) for curve in curves.values()})
    lines = ["# Accuracy without the most attack-sensitive samples", "",
             f"Split: {split} (epoch {epoch}); eps in {eps_unit} units. Per attack, the {' / '.join(drops)} of the "
             "samples with the smallest radius (the smallest perturbation found that makes them wrong; 0: wrong "
             "when clean) are set aside (Joel et al.); accuracy at eps is the fraction with radius > eps.", ""]
    for attack, curve in curves.items():
        lines += [f"## {attack}", "",
                  f"| eps | accuracy all | accuracy without the most sensitive {_percent(curve.drop)} | samples kept |",
                  "|---|---|---|---|"]
        lines += [f"| {eps:g} | {a:.4f} | {k:.4f} | {curve.samples_kept} of {curve.samples} |"
                  for eps, a, k in zip(curve.eps, curve.all, curve.kept)]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
