"""What :class:`~medrobust.callbacks.RobustnessEvaluation` writes on rank 0: the long CSV, the curves, the example
grids, the radii and sensitivity plots, the curves metrics draw (a detector's FROC), W&B's tables and images, and
``summary.md``."""

from __future__ import annotations

import logging

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_only

from medrobust.datamodules.base import SplitDataModule
from medrobust.evaluation.worst_case import CLEAN, points_note
from medrobust.reporting import format_eps, plot_curves, summary_markdown, write_csv, write_summary_section
from medrobust.reporting.examples import save_example_grid
from medrobust.reporting.metric_curves import SECTION as CURVES_SECTION
from medrobust.reporting.metric_curves import SECTION_ORDER as CURVES_ORDER
from medrobust.reporting.metric_curves import log_metric_curves_to_wandb, metric_curves_markdown, write_metric_curves
from medrobust.reporting.radii import plot_radii
from medrobust.reporting.sensitivity import SECTION, SECTION_ORDER, main_rows, plot_sensitivity, sensitivity_markdown
from medrobust.reporting.wandb_examples import log_examples_to_wandb
from medrobust.reporting.wandb_tables import log_robustness_to_wandb

log = logging.getLogger("medrobust")


@rank_zero_only
def write_files(evaluation, trainer: Trainer, split: str) -> None:
    """``robustness.csv``, the curves (PNG and W&B), the radii and sensitivity plots of the latest evaluation."""
    out = evaluation.run_dir(trainer)
    write_csv(evaluation.history, out / "robustness.csv")
    module = trainer.lightning_module
    extra = [name for attack in evaluation.attacks.values() for name in attack.extra_metrics]
    plot_curves(main_rows(evaluation.history), out / "curves", split=split,
                prefix="" if split == "val" else f"{split}_",
                metrics=None if module.curve_metrics is None else [*module.curve_metrics, *extra],
                bounded=module.bounded_metrics)
    epoch = evaluation.history[-1]["epoch"]
    log_robustness_to_wandb(trainer.loggers, evaluation.history, split,
                            flags=[flag.name for flag in evaluation.flags.get((split, epoch), [])])
    for label, values in (evaluation.last.radii if evaluation.last else {}).items():
        plot_radii(out, label, split, epoch, values.cpu())
    for label, curve in (evaluation.last.sensitivity if evaluation.last else {}).items():
        plot_sensitivity(out, label, split, epoch, curve, evaluation.eps_unit)
    if evaluation.last is not None and evaluation.last.curves:  # a detector's FROC per attack and eps
        settings = {"split": split, "epoch": evaluation.last.rows[0]["epoch"], "eps_unit": evaluation.eps_unit}
        write_metric_curves(out, evaluation.last.curves, **settings)
        log_metric_curves_to_wandb(trainer.loggers, evaluation.last.curves, **settings)


@rank_zero_only
def write_examples(evaluation, trainer: Trainer, split: str) -> None:
    """``examples/<split>_<attack>_eps<eps>.png`` of the latest evaluation, and the W&B images."""
    examples = evaluation.last.examples if evaluation.last else {}
    for label, example in examples.items():
        path = evaluation.run_dir(trainer) / "examples" / f"{split}_{label}_eps{format_eps(example.eps)}.png"
        save_example_grid(example.x, example.x_adv, path, masks=example.masks, captions=example.captions,
                          title=f"{split}: {label} at eps={example.eps:g} ({evaluation.eps_unit} units)")
    log_examples_to_wandb(trainer.loggers, examples, split, trainer.lightning_module.class_names, evaluation.eps_unit)


@rank_zero_only
def write_summary(evaluation, trainer: Trainer) -> None:
    """``summary.md``'s robustness section (and the sensitivity section) from the test rows."""
    net = getattr(trainer.lightning_module, "net", None)
    notes = [f"Model: {type(net).__name__}"] if net is not None else []
    notes += [f"Checkpoint: {trainer.ckpt_path}"] if trainer.ckpt_path else []
    if evaluation.objective is not None:
        notes.append(f"Attacks climb the task's `{evaluation.objective}` objective (eval.objective), not its "
                     f"training loss; the worst-loss points are those of that objective")
    if isinstance(trainer.datamodule, SplitDataModule):
        notes += trainer.datamodule.summary_notes("test")
    success = trainer.lightning_module.success_metric
    history = main_rows(evaluation.history)  # the sensitivity rows have a section of their own
    points = {row["attack"]: row["points"] for row in history  # what the non-success metrics were read at
              if row["split"] == "test" and row["metric"] != success and row.get("points") not in (None, "", CLEAN)}
    notes += ["", points_note(points, success)] if points else []
    test_flags = [flags for (split, _), flags in evaluation.flags.items() if split == "test" and flags]
    warnings = []
    if test_flags:
        warnings = ["**Gradient masking suspected: these numbers may overstate robustness.**\n" +
                    "\n".join(f"- {flag.name}: {flag.message}" for flag in test_flags[-1])]
    text = summary_markdown(history, "test", title="Robustness summary", notes=notes, warnings=warnings,
                            success_metric=success, shift_metric=trainer.lightning_module.shift_metric)
    path = write_summary_section(evaluation.run_dir(trainer), "robustness", text)
    if evaluation.last is not None and evaluation.last.curves:
        text = metric_curves_markdown(evaluation.last.curves, split="test", epoch=evaluation.last.rows[0]["epoch"],
                                      eps_unit=evaluation.eps_unit, success_metric=success)
        write_summary_section(evaluation.run_dir(trainer), CURVES_SECTION, text, order=CURVES_ORDER)
    if evaluation.last is not None and evaluation.last.sensitivity:
        text = sensitivity_markdown(evaluation.last.sensitivity, "test", evaluation.last.rows[0]["epoch"],
                                    evaluation.eps_unit)
        write_summary_section(evaluation.run_dir(trainer), SECTION, text, order=SECTION_ORDER)
    log.info("robustness summary written to %s", path)
