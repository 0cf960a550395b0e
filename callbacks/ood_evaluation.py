"""OODEvaluation (``eval=ood``): seed 002's out-of-distribution attack on a shape-reconstruction network.

At test time, images that are not nodule patches (:mod:`medrobust.evaluation.ood_sources`: noise, nodule-free lung,
brain MRI) are perturbed within an L2 budget so the network outputs a chosen in-distribution shape: source image
``i`` gets the outline and mask of test sample ``i`` (:class:`~medrobust.attacks.shape.OODShapeAttack`). Per source
and budget (0 always, the "no attack" row): the MRSE and Dice to the target, the success rate (MRSE <= the task's
``radius_px``) and how often a reconstruction check flags the output. The check scores each prediction twice,
``1 - Dice(polygon of its points, its mask)`` (the two heads disagree) and the outline's residual from the
training shapes' PCA (:meth:`~medrobust.data.shape_pca.ShapeModel.residual`, px: a shape the model cannot explain),
and flags it when either is above its ``check_quantile`` quantile over the clean test predictions.

Rank 0 does the work on the whole test split (other ranks skip it; no collective call) and writes ``ood.csv``,
its ``summary.md`` section and ``examples/ood_<source>.png``; the numbers go to every logger as
``ood/<source>/budget_<b>/<metric>``.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

from medrobust.attacks.core.session import eval_mode  # noqa: E402
from medrobust.attacks.shape import OODShapeAttack, mean_point_error  # noqa: E402
from medrobust.data.shape_outline import polygon_mask  # noqa: E402
from medrobust.evaluation.ood_sources import SOURCES, ood_sources  # noqa: E402
from medrobust.reporting import format_eps, write_summary_section  # noqa: E402
from medrobust.reporting.atomic import atomic_path, save_figure_atomic  # noqa: E402
from medrobust.tasks.base import lacking  # noqa: E402

log = logging.getLogger("medrobust")

KEYS = ("source", "budget", "n", "mrse_to_target", "dice_to_target", "success_rate", "flagged_rate", "mean_l2")
METRICS = KEYS[3:]
IN_DISTRIBUTION = "in_distribution"  # ood.csv's row of the clean test predictions against their own truth
EXAMPLE_COLUMNS = 4


class OODEvaluation(Callback):
    """Make a shape network output target shapes from out-of-distribution images (module docstring).

    Args:
        sources: OOD sources, from ``noise``, ``lung``, ``other``.
        budgets: L2 budgets in model units (0 is always added: the no-attack row).
        n_targets: targets (the first test samples) and images per source.
        steps, lr, dice_weight: the attack's (:class:`~medrobust.attacks.shape.OODShapeAttack`).
        check_modes: PCA modes the reconstruction check's residual keeps (capped by the shape model's).
        check_quantile: the check's thresholds are this quantile of each score over the clean test predictions.
        seed: the OOD source images.
        output_dir: where files go; default the trainer's ``default_root_dir``.
        test_max_batches: at most this many test batches for the targets and the check's calibration (None: all).
        max_batches: unused (RobustnessEvaluation's per-epoch cap, which task configs set for every eval).
    """

    requires = ("radius_px", "point_errors")  # a shape task (ShapeTask): what setup checks, as attacks declare theirs

    def __init__(self, sources: Sequence[str] = SOURCES, budgets: Sequence[float] = (0.0, 7.5, 15.0),
                 n_targets: int = 8, steps: int = 300, lr: float = 0.01, dice_weight: float = 1.0,
                 check_modes: int = 10, check_quantile: float = 0.95, seed: int = 0, output_dir: str | None = None,
                 test_max_batches: int | None = None, max_batches: int | None = None) -> None:
        sources = [sources] if isinstance(sources, str) else list(sources)
        if not sources or any(s not in SOURCES for s in sources) or len(set(sources)) < len(sources):
            raise ValueError(f"eval.sources must list distinct sources from {list(SOURCES)}, got {sources}")
        try:
            values = [float(b) for b in budgets]
        except (TypeError, ValueError):
            raise ValueError(f"eval.budgets must be a list of numbers >= 0, got {budgets!r}") from None
        if any(not math.isfinite(b) or b < 0 for b in values):
            raise ValueError(f"eval.budgets must be finite L2 sizes >= 0 (model units), got {values}")
        for key, value, low in (("n_targets", n_targets, 1), ("check_modes", check_modes, 1), ("seed", seed, 0),
                                ("test_max_batches", 1 if test_max_batches is None else test_max_batches, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"eval.{key} must be an integer >= {low}, got {value!r}")
        if isinstance(check_quantile, bool) or not isinstance(check_quantile, (int, float)) \
                or not 0 < check_quantile < 1:
            raise ValueError(f"eval.check_quantile must be a fraction in (0, 1), got {check_quantile!r}")
        self.attack = OODShapeAttack(steps, lr, dice_weight)  # checks eval.steps, eval.lr, eval.dice_weight
        self.sources, self.budgets = sources, sorted({0.0, *values})
        self.n_targets, self.check_modes, self.check_quantile = n_targets, check_modes, float(check_quantile)
        self.seed, self.output_dir, self.test_max_batches = seed, output_dir, test_max_batches
        self.rows: list[dict] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        missing = lacking(pl_module, self.requires)
        if missing or getattr(pl_module, "label_key", None) != "points":
            raise TypeError(f"eval=ood needs a shape task (task=lidc_shape): a module with {list(self.requires)} whose "
                            f"network outputs {{'points', 'mask'}}; {type(pl_module).__name__} is not one"
                            + (f" (it lacks {missing})" if missing else ""))
        if trainer.datamodule is not None and not hasattr(trainer.datamodule, "shape_model"):
            raise TypeError(f"eval=ood's reconstruction check needs the data's shape model (data=lidc_shape); "
                            f"{type(trainer.datamodule).__name__} has no shape_model")
        if hasattr(pl_module, "bind_data"):  # callbacks set up before the module: bounds and window from the data
            pl_module.bind_data(trainer.datamodule)

    def run_dir(self, trainer: Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:  # no collective inside: the attack calls pl_module, not the DDP wrapper
            return
        datamodule = trainer.datamodule
        if datamodule is None or getattr(datamodule, "shape_model", None) is None:
            raise RuntimeError("eval=ood takes its targets and its shape model from the datamodule (data=lidc_shape, "
                               "set up); this run has none")
        with eval_mode(pl_module), torch.inference_mode(False):
            clean = self._clean_predictions(datamodule, pl_module)
            modes = min(self.check_modes, datamodule.shape_model.n_modes)
            scores = check_scores(clean["points"], clean["mask"], datamodule.shape_model, modes)
            thresholds = tuple(float(np.quantile(s, self.check_quantile)) for s in scores)
            n = min(self.n_targets, len(clean["image"]))
            flagged = flags(scores, thresholds)
            rows = [summary_row(IN_DISTRIBUTION, 0.0, clean["points"], clean["true_points"], clean["mask"],
                                clean["true_mask"], flagged, torch.zeros(len(flagged)), pl_module.radius_px)]
            target_points, target_mask = clean["true_points"][:n], clean["true_mask"][:n]
            images = ood_sources(self.sources, n, clean["image"][:n], tuple(clean["image"].shape[-2:]),
                                 getattr(pl_module, "intensity", None) or getattr(datamodule, "intensity", None),
                                 pl_module.input_bounds, self.seed, spacing_mm=getattr(datamodule, "spacing_mm", 1.0),
                                 cache_dir=getattr(datamodule, "cache_dir", None))
            examples = {}
            for source, x_source in images.items():
                x_source = x_source.to(pl_module.device)
                for budget in self.budgets:
                    x_adv = self.attack(pl_module, x_source, target_points.to(pl_module.device), target_mask,
                                        budget=budget, bounds=pl_module.input_bounds)
                    out = _predict(pl_module, x_adv)
                    flagged = flags(check_scores(out["points"], out["mask"], datamodule.shape_model, modes), thresholds)
                    l2 = (x_adv - x_source).flatten(1).norm(dim=1).cpu()
                    rows.append(summary_row(source, budget, out["points"], target_points, out["mask"], target_mask,
                                            flagged, l2, pl_module.radius_px))
                examples[source] = (x_source.cpu(), x_adv.cpu(), out["points"], target_points, target_mask)
        self.rows = rows
        self._write(trainer, examples, clean_count=len(clean["image"]), thresholds=thresholds, modes=modes,
                    radius=pl_module.radius_px)

    def _clean_predictions(self, datamodule, pl_module) -> dict[str, torch.Tensor]:
        """Every test sample (up to ``test_max_batches`` batches): images, true and predicted points and masks."""
        whole = hasattr(datamodule, "whole_loader")  # every sample, not this rank's shard
        loader = datamodule.whole_loader("test") if whole else datamodule.test_dataloader()
        parts: dict[str, list] = {key: [] for key in ("image", "true_points", "true_mask", "points", "mask")}
        for i, batch in enumerate(loader):
            if self.test_max_batches is not None and i >= self.test_max_batches:
                break
            out = _predict(pl_module, batch["image"].to(pl_module.device))
            mask = batch["mask"][:, 0] if batch["mask"].ndim == 4 else batch["mask"]
            for key, value in (("image", batch["image"]), ("true_points", batch["points"]), ("true_mask", mask.bool()),
                               ("points", out["points"]), ("mask", out["mask"])):
                parts[key].append(value.detach().cpu())
        if not parts["image"]:
            raise RuntimeError("eval=ood: the test split is empty, so there are no targets to attack towards")
        return {key: torch.cat(values) for key, values in parts.items()}

    def _write(self, trainer: Trainer, examples: dict, *, clean_count: int, thresholds: tuple[float, float],
               modes: int, radius: float) -> None:
        out = self.run_dir(trainer)
        with atomic_path(out / "ood.csv") as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=KEYS)
            writer.writeheader()
            writer.writerows(self.rows)
        metrics = {f"ood/{row['source']}/budget_{format_eps(row['budget'])}/{key}": float(row[key])
                   for row in self.rows for key in METRICS}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        text = summary_section(self.rows, attack=self.attack, clean_count=clean_count, thresholds=thresholds,
                               modes=modes, quantile=self.check_quantile, radius=radius)
        write_summary_section(out, "ood", text)
        for source, example in examples.items():
            plot_example(*example, out / "examples" / f"ood_{source}.png",
                         title=f"OOD attack from {source} images, L2 budget {self.budgets[-1]:g}")
        log.info("OOD attack: ood.csv and the summary section written to %s", out)


def _predict(pl_module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"points": (B, K, 2), "mask": (B, H, W) bool}`` on the CPU, from a no-grad forward."""
    with torch.no_grad():
        output = pl_module(x)
    return {"points": output["points"].float().cpu(), "mask": (output["mask"][:, 0] > 0).cpu()}


def _dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dice ``(B,)`` of boolean masks ``(B, H, W)``; 1 where both are empty."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    total = a.sum(dim=1) + b.sum(dim=1)
    return torch.where(total > 0, 2 * (a * b).sum(dim=1) / total.clamp_min(1), torch.ones_like(total))


def check_scores(points: torch.Tensor, mask: torch.Tensor, shape_model, modes: int) -> tuple[np.ndarray, np.ndarray]:
    """The reconstruction check's scores ``(B,)`` each: inconsistency ``1 - Dice(polygon(points), mask)`` and
    implausibility, the outline's RMS residual (px) from ``modes`` PCA modes; ``points (B, K, 2)``,
    ``mask (B, H, W)``."""
    shape = tuple(mask.shape[-2:])
    polygons = torch.from_numpy(np.stack([polygon_mask(p, shape) for p in points.numpy()]))
    inconsistency = (1 - _dice(polygons, mask)).numpy()
    implausibility = np.array([shape_model.residual(p, modes) for p in points.numpy().astype(np.float64)])
    return inconsistency, implausibility


def flags(scores: tuple[np.ndarray, np.ndarray], thresholds: tuple[float, float]) -> torch.Tensor:
    """Flagged ``(B,)`` bool: either score above its threshold."""
    return torch.from_numpy((scores[0] > thresholds[0]) | (scores[1] > thresholds[1]))


def summary_row(source: str, budget: float, points, target_points, mask, target_mask, flagged, l2,
                radius: float) -> dict:
    """One ``ood.csv`` row: means over the samples of the predictions against their targets."""
    error = mean_point_error(points, target_points.to(points.device))
    return {"source": source, "budget": budget, "n": len(points), "mrse_to_target": float(error.mean()),
            "dice_to_target": float(_dice(mask, target_mask.to(mask.device)).mean()),
            "success_rate": float((error <= radius).float().mean()), "flagged_rate": float(flagged.float().mean()),
            "mean_l2": float(l2.mean())}


def summary_section(rows: list[dict], *, attack: OODShapeAttack, clean_count: int, thresholds: tuple[float, float],
                    modes: int, quantile: float, radius: float) -> str:
    """``summary.md``'s "Out-of-distribution attack" section: how it was run, the table, a sentence per source."""
    clean = next(row for row in rows if row["source"] == IN_DISTRIBUTION)
    lines = ["## Out-of-distribution attack", "",
             f"Images that are not nodule patches, perturbed within an L2 budget (model units) so the network outputs "
             f"the shape of test sample i (outline and mask) for source image i: Adamax, {attack.steps} steps, "
             f"lr {attack.lr:g}, mask weight {attack.dice_weight:g}. Success: MRSE to the target <= {radius:g} px.",
             "",
             f"Reconstruction check: a prediction is flagged when 1 - Dice(polygon of its points, its mask) > "
             f"{thresholds[0]:.3f} or its outline's residual from {modes} PCA modes of the training shapes > "
             f"{thresholds[1]:.2f} px. Thresholds are the {quantile:g} quantiles of the two scores over the clean "
             f"predictions on the {clean_count} test patches, and are calibrated on those same patches: they flag "
             f"{100 * clean['flagged_rate']:.1f} % of them (the in_distribution row, its MRSE and Dice against their "
             f"own truth), not a held-out false-flag rate.", "",
             "| source | budget | n | MRSE to target (px) | Dice to target | success | flagged | mean L2 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['budget']:g} | {r['n']} | {r['mrse_to_target']:.2f} | {r['dice_to_target']:.3f} "
              f"| {100 * r['success_rate']:.0f} % | {100 * r['flagged_rate']:.0f} % | {r['mean_l2']:.2f} |"
              for r in rows]
    largest = max(row["budget"] for row in rows)
    lines.append("")
    lines += [f"- From {r['source']} images, budget {r['budget']:g} makes the network output the target shape for "
              f"{100 * r['success_rate']:.0f} % of them (MRSE <= {radius:g} px); the reconstruction check flags "
              f"{100 * r['flagged_rate']:.0f} %." for r in rows if r["source"] != IN_DISTRIBUTION
              and r["budget"] == largest]
    return "\n".join(lines) + "\n"


def plot_example(x_source, x_adv, points, target_points, target_mask, path: Path, title: str) -> None:
    """Rows: source image, adversarial image with the target (green) and predicted (red) outlines, target mask."""
    columns = min(EXAMPLE_COLUMNS, len(x_source))
    low, high = float(min(x_source.min(), x_adv.min())), float(max(x_source.max(), x_adv.max()))  # one grey scale
    fig, axes = plt.subplots(3, columns, figsize=(2.2 * columns, 6.6), dpi=100, squeeze=False)
    for j in range(columns):
        for row, (image, label) in enumerate(((x_source[j, 0], "source"), (x_adv[j, 0], "adversarial"),
                                              (target_mask[j].float(), "target mask"))):
            ax = axes[row, j]
            ax.imshow(image.numpy(), cmap="gray", **({} if row == 2 else {"vmin": low, "vmax": high}))
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label)
        for outline, colour in ((target_points[j], "lime"), (points[j], "red")):
            closed = torch.cat([outline, outline[:1]]).numpy()
            axes[1, j].plot(closed[:, 1], closed[:, 0], color=colour, lw=1)
    fig.suptitle(title + "\ngreen: target outline, red: predicted", fontsize=8)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
