"""Adversarial examples of dense tasks in W&B: one ``wandb.Image`` per shown sample, the clean image with the ground
truth, clean and adversarial predictions as masks W&B can toggle (the plane the PNG grid shows)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from medrobust.reporting.examples import EXAMPLES_SHOWN, shown_planes
from medrobust.reporting.points import PointSet  # landmarks' points: PNG grids only, not W&B masks (yet)


def mask_key(name: str) -> str:
    """``"ground truth"`` -> ``"ground_truth"``: W&B mask keys are identifiers in its UI."""
    return "_".join(name.split())


def mask_images(x: torch.Tensor, masks: dict[str, torch.Tensor], class_names: Sequence[str] | None = None,
                caption: str = "", n: int = EXAMPLES_SHOWN) -> list:
    """``wandb.Image`` per sample among the first ``n`` of ``x`` ``(B, C, *spatial)`` (first channel), with every
    label map of ``masks`` (name -> ``(B, *spatial)``) as a mask. ``class_names[k]`` names label value ``k``
    (default ``class_k``)."""
    import wandb

    planes = shown_planes(x, masks, n)
    # the grid's grey scale (min..max over the shown samples) as uint8: W&B would clip z-scored images to [0, 1]
    low, high = float(x[: len(planes)].min()), float(x[: len(planes)].max())
    images = []
    for i, index in enumerate(planes):
        grey = (x[i, 0][index].detach().float().cpu().numpy() - low) / ((high - low) or 1.0)
        labels = {name: mask[i][index].detach().cpu().numpy() for name, mask in masks.items()}
        values = sorted(set().union(*(np.unique(plane).tolist() for plane in labels.values())))
        if values and (values[0] < 0 or values[-1] > 255):
            raise ValueError(f"W&B masks hold label values 0..255; sample {i} has {values[0]}..{values[-1]}")
        names = list(class_names or [])
        class_labels = {k: names[k] if k < len(names) else f"class_{k}" for k in range(max(len(names), values[-1] + 1))}
        where = f"sample {i}" + (f", slice {index[0]}" if index else "")
        images.append(wandb.Image(
            np.round(grey * 255).astype(np.uint8),
            masks={mask_key(name): {"mask_data": plane.astype(np.uint8), "class_labels": class_labels}
                   for name, plane in labels.items()},
            caption=f"{caption}: {where}" if caption else where,
        ))
    return images


def log_examples_to_wandb(loggers, examples: dict, split: str, class_names: Sequence[str] | None = None,
                          eps_unit: str = "model") -> None:
    """``examples/<split>_<attack>``: the mask images of each attack's example (``attack -> (eps, x, x_adv,
    masks)``, as ``RobustnessEvaluation`` keeps them) to every ``WandbLogger`` among ``loggers``. A no-op without
    W&B, and for examples without label maps (classification, regression and landmarks keep their PNG grids only)."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    payload = {f"examples/{split}_{label}": mask_images(x, maps, class_names, f"{label} at eps={eps:g} ({eps_unit})")
               for label, (eps, x, _, masks) in examples.items()
               for maps in [{k: m for k, m in (masks or {}).items() if not isinstance(m, PointSet)}] if maps}
    if not (wandb_loggers and payload):
        return
    for logger in wandb_loggers:
        logger.experiment.log(payload)
