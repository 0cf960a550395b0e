"""UniversalShiftEvaluation: how far one perturbation per group of images moves a regressor's predictions.

At test time (the weights under test), for each eps and direction, one universal perturbation is fitted on
groups of growing size drawn from the validation split and applied to the test split, which it never saw
(:func:`medrobust.attacks.regression.universal_shift.universal_shift`, after Li et al., Neurocomputing 2020). Rank 0 does the work on the
whole splits (the datamodule's ``whole_loader``, not the sharded ones) and writes ``universal.csv``,
``curves/test_universal_shift.png`` and its section of ``summary.md`` (after the robustness table, whichever
callback writes first: :func:`medrobust.reporting.write_summary_section`); logged scalars go to every logger.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

from medrobust.attacks import EPS_UNITS, DEFAULT_GROUP_SIZES, universal_shift  # noqa: E402
from medrobust.attacks.core.session import eval_mode  # noqa: E402
from medrobust.reporting import format_eps, write_summary_section  # noqa: E402
from medrobust.reporting.atomic import atomic_path, save_figure_atomic  # noqa: E402

log = logging.getLogger("medrobust")

RESULT_KEYS = ("group_size", "repeat", "fit_shift", "heldout_shift", "heldout_correct")  # universal_shift's
KEYS = ("epoch", "direction", "eps", "eps_unit", "eps_model", *RESULT_KEYS)


class UniversalShiftEvaluation(Callback):
    """Fit universal perturbations on validation groups and report the shift they cause on the test split.

    Args:
        eps: perturbation sizes in ``eps_unit`` (one fitted perturbation per eps, direction and group).
        eps_unit: ``model``, ``native`` or ``range`` (a fraction of the least contrasted image's range).
        directions: ``up`` and / or ``down``.
        group_sizes: images per group, capped by the validation split's size.
        repeats: groups drawn per size.
        epochs: passes over the group while fitting.
        max_heldout_batches: at most this many test batches as held-out images (``None``: all).
        output_dir: where files go; default the trainer's ``default_root_dir``.
        seed: the groups drawn.
    """

    def __init__(
        self,
        eps: Sequence[float] = (0.004,),
        eps_unit: str = "range",
        directions: Sequence[str] = ("up", "down"),
        group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
        repeats: int = 2,
        epochs: int = 5,
        max_heldout_batches: int | None = None,
        output_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        eps = [float(e) for e in eps]
        if not eps or any(e <= 0 for e in eps):
            raise ValueError(f"universal_shift.eps must be a non-empty list of values > 0, got {eps}")
        if eps_unit not in EPS_UNITS:
            raise ValueError(f"universal_shift.eps_unit must be one of {EPS_UNITS}, got {eps_unit!r}")
        directions = list(directions)
        if not directions or any(d not in ("up", "down") for d in directions):
            raise ValueError(f"universal_shift.directions must be 'up' and / or 'down', got {directions}")
        if max_heldout_batches is not None and max_heldout_batches < 1:
            raise ValueError(f"universal_shift.max_heldout_batches must be >= 1 or null, got {max_heldout_batches!r}")
        self.eps, self.eps_unit, self.directions = eps, eps_unit, directions
        self.group_sizes, self.repeats, self.epochs = list(group_sizes), repeats, epochs
        self.max_heldout_batches, self.output_dir, self.seed = max_heldout_batches, output_dir, seed
        self.rows: list[dict] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "prediction"):
            raise TypeError(f"UniversalShiftEvaluation needs a regression task (prediction(output, batch)); "
                            f"{type(pl_module).__name__} has none")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:  # no collective inside: the attack calls pl_module, not the DDP wrapper
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("UniversalShiftEvaluation draws its groups from the datamodule's validation split; "
                               "this run has no datamodule")
        heldout = self._heldout(datamodule.whole_loader("test"))
        epoch = trainer.current_epoch
        rows = []
        with eval_mode(pl_module), torch.inference_mode(False), torch.enable_grad():
            for eps in self.eps:
                for direction in self.directions:
                    found = universal_shift(
                        pl_module, datamodule.whole_loader("val"), heldout, pl_module, eps=eps,
                        eps_unit=self.eps_unit, intensity=pl_module.intensity, bounds=pl_module.input_bounds,
                        direction=direction, group_sizes=self.group_sizes, repeats=self.repeats,
                        epochs=self.epochs, seed=self.seed, device=pl_module.device)
                    rows += [{"epoch": epoch, "direction": direction, "eps": eps, "eps_unit": self.eps_unit,
                              "eps_model": row["eps"], **{k: row[k] for k in RESULT_KEYS}} for row in found]
        self.rows = rows
        self._log(trainer)
        self._write(trainer)

    def run_dir(self, trainer: Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir)

    def _heldout(self, loader) -> list[dict]:
        if self.max_heldout_batches is None:
            return loader
        return [batch for _, batch in zip(range(self.max_heldout_batches), loader)]

    def _log(self, trainer: Trainer) -> None:
        means = mean_shifts(self.rows)
        metrics = {f"universal/heldout_shift_{d}_eps{format_eps(e)}_g{g}": v for (d, e, g), v in means.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _write(self, trainer: Trainer) -> None:
        out = self.run_dir(trainer)
        with atomic_path(out / "universal.csv") as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=KEYS)
            writer.writeheader()
            writer.writerows(self.rows)
        plot_shift_vs_group_size(self.rows, out / "curves" / "test_universal_shift.png")
        write_summary_section(out, "universal_shift", summary_section(self.rows))
        log.info("universal perturbations: %s", "; ".join(
            f"{d} eps={e:g} group {g}: {v:+.2f}" for (d, e, g), v in mean_shifts(self.rows).items()))


def mean_shifts(rows: list[dict]) -> dict[tuple[str, float, int], float]:
    """Mean held-out shift over the repeats: ``{(direction, eps, group_size): shift}``."""
    groups: dict = defaultdict(list)
    for row in rows:
        groups[row["direction"], row["eps"], row["group_size"]].append(row["heldout_shift"])
    return {key: sum(values) / len(values) for key, values in sorted(groups.items())}


def summary_section(rows: list[dict]) -> str:
    lines = ["## Universal perturbations (one per group, fitted on validation images, applied to test images)", "",
             f"eps in {rows[0]['eps_unit']} units; mean over repeats of the held-out shift (signed, target units).",
             "", "| direction | eps | group size | held-out shift |", "|---|---|---|---|"]
    lines += [f"| {d} | {e:g} | {g} | {v:+.3f} |" for (d, e, g), v in mean_shifts(rows).items()]
    return "\n".join(lines) + "\n"


def plot_shift_vs_group_size(rows: list[dict], path: Path) -> None:
    series: dict = defaultdict(list)
    for (direction, eps, size), shift in mean_shifts(rows).items():
        series[direction, eps].append((size, shift))
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    for (direction, eps), points in sorted(series.items()):
        ax.plot(*zip(*points), marker="o", label=f"{direction}, eps={eps:g}")
    ax.set_xscale("log")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("images per universal perturbation (group size)")
    ax.set_ylabel("mean shift on held-out images")
    ax.set_title("test: universal perturbation shift")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
