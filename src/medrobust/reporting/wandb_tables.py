"""Robustness curves in W&B: a table of all rows and a line-series chart per (attack, metric)."""

from __future__ import annotations

from medrobust.reporting.robustness import ROW_KEYS, curve_series


def log_robustness_to_wandb(loggers, rows: list[dict], split: str, flags: list[str] = ()) -> None:
    """Log to every ``WandbLogger`` among ``loggers``; a no-op when W&B is not a logger of this run.

    ``flags``: the gradient-masking flags of this evaluation; they go to the run summary
    (``robustness/<split>_masking_flags``, ``"none"`` when clean) so a flagged run says so on its overview page,
    and to the table ``robustness/<split>_flags_table``."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    if not wandb_loggers:
        return
    import wandb

    split_rows = [row for row in rows if row["split"] == split]  # the table keeps the radius rows too
    payload = {f"robustness/{split}_table": wandb.Table(columns=list(ROW_KEYS), data=[[r.get(k, "") for k in ROW_KEYS] for r in split_rows])}
    for (attack, metric), by_epoch in curve_series(split_rows, split).items():
        epochs = sorted(by_epoch)
        xs = [eps for eps, _ in by_epoch[epochs[-1]]]
        ys = [[value for _, value in by_epoch[epoch]] for epoch in epochs]
        payload[f"robustness/{split}_{attack}_{metric}"] = wandb.plot.line_series(
            xs=xs, ys=ys, keys=[f"epoch {epoch}" for epoch in epochs],
            title=f"{split}: {metric} vs eps ({attack})", xname="eps",
        )
    # the flags as a table too: its media file is on disk in offline runs, where the summary is not
    payload[f"robustness/{split}_flags_table"] = wandb.Table(columns=["flag"], data=[[f] for f in flags] or [["none"]])
    for logger in wandb_loggers:
        logger.experiment.log(payload)
        logger.experiment.summary[f"robustness/{split}_masking_flags"] = ";".join(flags) or "none"
