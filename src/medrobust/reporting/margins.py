"""The per-sample margins of margin-based adversarial training, per epoch: a PNG of their distribution over the
epochs (so a user sees them grow) and a W&B histogram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medrobust.reporting.atomic import save_figure_atomic  # noqa: E402


def plot_margins(history: list[tuple[int, list[float]]], path: Path) -> Path:
    """``path``: one histogram outline per epoch of ``history`` (``(epoch, margins)``), later epochs darker."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    values = [v for _, margins in history for v in margins]
    bins = 30 if not values or max(values) > min(values) else 1
    cmap = plt.get_cmap("viridis")
    for k, (epoch, margins) in enumerate(history):
        ax.hist(margins, bins=bins, range=(min(values), max(values)) if values else None, histtype="step",
                color=cmap(k / max(1, len(history) - 1)), label=f"epoch {epoch}")
    ax.set_xlabel("margin (model units of the attack's norm)")
    ax.set_ylabel("training samples")
    ax.set_title("margin-based adversarial training: per-sample margins")
    if len(history) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure_atomic(fig, path)
    plt.close(fig)
    return path


def log_margins_to_wandb(loggers, margins: list[float]) -> None:
    """``train/margin_histogram`` to every W&B logger (none: nothing)."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    if not wandb_loggers or not margins:
        return
    import wandb

    for logger in wandb_loggers:
        logger.experiment.log({"train/margin_histogram": wandb.Histogram(margins)})
