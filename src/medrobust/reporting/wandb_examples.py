"""Adversarial examples of dense tasks in W&B: one ``wandb.Image`` per shown sample, the clean image with the ground
truth, clean and adversarial predictions W&B can toggle (the plane the PNG grid shows): label maps as masks,
landmarks (:class:`PointSet`) as small named boxes, one box group per point set."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from medrobust.reporting.examples import EXAMPLES_SHOWN, shown_planes
from medrobust.reporting.points import PointSet

POINT_BOX_HALF = 1.5  # pixels: a landmark is drawn as a 3 x 3 box around its position


def mask_key(name: str) -> str:
    """``"ground truth"`` -> ``"ground_truth"``: W&B mask keys are identifiers in its UI."""
    return "_".join(name.split())


def mask_images(x: torch.Tensor, masks: dict[str, torch.Tensor], class_names: Sequence[str] | None = None,
                caption: str = "", n: int = EXAMPLES_SHOWN, captions: Sequence[str] | None = None) -> list:
    """``wandb.Image`` per sample among the first ``n`` of ``x`` ``(B, C, *spatial)`` (first channel), with every
    label map of ``masks`` (name -> ``(B, *spatial)``) as a mask and every :class:`PointSet` ``(B, K, D)`` as boxes
    captioned with the point names. ``class_names[k]`` names label value ``k`` (default ``class_k``); ``captions``:
    a line per sample (the predicted classes) added to its caption."""
    import wandb

    points = {name: mask for name, mask in masks.items() if isinstance(mask, PointSet)}
    maps = {name: mask for name, mask in masks.items() if name not in points}
    planes = shown_planes(x, maps or points, n)
    # the grid's grey scale (min..max over the shown samples) as uint8: W&B would clip z-scored images to [0, 1]
    low, high = float(x[: len(planes)].min()), float(x[: len(planes)].max())
    images = []
    for i, index in enumerate(planes):
        grey = (x[i, 0][index].detach().float().cpu().numpy() - low) / ((high - low) or 1.0)
        where = f"sample {i}" + (f", slice {index[0]}" if index else "")
        where += (": " + captions[i].replace("\n", ", ")) if captions else ""
        images.append(wandb.Image(
            np.round(grey * 255).astype(np.uint8),
            masks={mask_key(name): _mask_entry(mask[i][index], class_names, i) for name, mask in maps.items()} or None,
            boxes={mask_key(name): _point_boxes(mask[i], len(index)) for name, mask in points.items()} or None,
            caption=f"{caption}: {where}" if caption else where,
        ))
    return images


def _mask_entry(plane: torch.Tensor, class_names: Sequence[str] | None, sample: int) -> dict:
    plane = plane.detach().cpu().numpy()
    values = np.unique(plane).tolist()
    if values and (values[0] < 0 or values[-1] > 255):
        raise ValueError(f"W&B masks hold label values 0..255; sample {sample} has {values[0]}..{values[-1]}")
    names = list(class_names or [])
    count = max(len(names), int(values[-1]) + 1 if values else 0)
    return {"mask_data": plane.astype(np.uint8),
            "class_labels": {k: names[k] if k < len(names) else f"class_{k}" for k in range(count)}}


def _point_boxes(points: PointSet, leading: int) -> dict:
    """One sample's points ``(K, D)`` as W&B pixel boxes on the shown plane: the axes after the ``leading`` ones
    that chose the plane (rows, then columns: W&B's y and x)."""
    names = list(points.point_names) or [f"L{k}" for k in range(points.shape[0])]
    boxes = []
    for k, point in enumerate(points.detach().float().cpu().tolist()):
        row, column = point[leading:leading + 2]
        boxes.append({"position": {"minX": column - POINT_BOX_HALF, "maxX": column + POINT_BOX_HALF,
                                   "minY": row - POINT_BOX_HALF, "maxY": row + POINT_BOX_HALF},
                      "domain": "pixel", "class_id": k, "box_caption": names[k]})
    return {"box_data": boxes, "class_labels": dict(enumerate(names))}


def log_examples_to_wandb(loggers, examples: dict, split: str, class_names: Sequence[str] | None = None,
                          eps_unit: str = "model") -> None:
    """``examples/<split>_<attack>``: the images of each attack's example (``attack ->``
    :class:`~medrobust.reporting.examples.Example`, as ``RobustnessEvaluation`` keeps them) to every ``WandbLogger``
    among ``loggers``, with their label maps, points or captions (predicted classes). A no-op without W&B, and for
    examples with none of them."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    payload = {f"examples/{split}_{label}": mask_images(e.x, e.masks or {}, class_names,
                                                        f"{label} at eps={e.eps:g} ({eps_unit})", captions=e.captions)
               for label, e in examples.items() if e.masks or e.captions}
    if not (wandb_loggers and payload):
        return
    for logger in wandb_loggers:
        logger.experiment.log(payload)
