"""Segmentation metrics for clean and adversarial evaluation: Dice (mean foreground and per class), the
is-correct rate, HD95, false-positive volume and the prediction change under attack.

Every metric is updated with the same ``(preds, target)`` pair that :meth:`SegmentationTask.metric_inputs`
builds:

- ``preds``: ``(B, 2, *spatial)`` integer labels, channel 0 the prediction being evaluated, channel 1 the
  *reference* prediction for the same images (the clean one when the evaluated prediction is adversarial; the
  prediction itself on clean images, so the prediction change there is 0);
- ``target``: a :class:`SegmentationTarget`: the true labels ``(B, *spatial)``, the voxel spacing ``(B, D)`` in
  mm (or ``None``: voxel units) and the task's current threshold ``tau`` for the is-correct rate.

Conventions, per sample and evaluated class (the foreground classes, or all with ``include_background``):

- Dice is MONAI's ``compute_dice(ignore_empty=False)``: a class absent from both the label and the prediction
  scores 1, one absent from the label but predicted scores 0 (so a hallucinated structure counts as an error);
- HD95 is MONAI's ``compute_hausdorff_distance(percentile=95)`` (computed by our batched torch port in
  ``surface_distance.py``, tested equal to it), except where exactly one of prediction and
  label is empty: MONAI gives NaN / inf there, which a mean would drop (MONAI #9095) and an attack that erases a
  structure would look like an improvement; we score the image diagonal ``sqrt(sum((n_d * spacing_d)^2))``,
  longer than any distance inside the image. Both empty: 0.

States are sums with ``dist_reduce_fx="sum"``, so values reduce exactly across DDP ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from torch import Tensor
from torchmetrics import Metric


from medrobust.tasks.sample_mean import SampleMean
from medrobust.tasks.surface_distance import percentile_hausdorff


class SegmentationTarget(NamedTuple):
    """What the metrics compare predictions with: ``label`` ``(B, *spatial)`` int, ``spacing`` ``(B, D)`` mm or
    ``None`` (distances and volumes in voxels), ``tau`` the 0-d is-correct threshold on the mean Dice."""

    label: Tensor
    spacing: Tensor | None
    tau: Tensor


# -- functional forms: per sample (and class) -----------------------------------------------------------
def one_hot(labels: Tensor, num_classes: int, include_background: bool = True) -> Tensor:
    """``(B, *spatial)`` integer labels -> ``(B, C, *spatial)`` float one-hot; without background ``C = K - 1``."""
    encoded = F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()
    return encoded if include_background else encoded[:, 1:]


def dice_per_class(pred: Tensor, label: Tensor, num_classes: int, include_background: bool = False) -> Tensor:
    """Hard Dice ``(B, C)`` between integer masks ``(B, *spatial)``; empty in both: 1, empty label only: 0."""
    return compute_dice(one_hot(pred, num_classes), one_hot(label, num_classes),
                        include_background=include_background, ignore_empty=False)


def mean_dice(pred: Tensor, label: Tensor, num_classes: int, include_background: bool = False) -> Tensor:
    """Mean Dice over the evaluated classes, ``(B,)``: the task's per-sample success score."""
    return dice_per_class(pred, label, num_classes, include_background).mean(dim=1)


def image_diagonal(spatial_shape: tuple[int, ...], spacing: Tensor | None, batch_size: int) -> Tensor:
    """Per sample the image's diagonal ``sqrt(sum((n_d * spacing_d)^2))``, ``(B,)``, in mm (voxels without
    spacing): HD95's worst-case value."""
    extent = torch.tensor(spatial_shape, dtype=torch.float64)
    if spacing is not None:
        return (extent * spacing.double().cpu()).pow(2).sum(dim=1).sqrt()
    return extent.pow(2).sum().sqrt().expand(batch_size)


def hd95_per_class(pred: Tensor, label: Tensor, num_classes: int, include_background: bool = False,
                   spacing: Tensor | None = None) -> Tensor:
    """95th-percentile symmetric Hausdorff distance ``(B, C)`` (mm with ``spacing`` ``(B, D)``, else voxels), with
    the image diagonal where exactly one of prediction and label is empty and 0 where both are."""
    # our batched torch port of MONAI's compute_hausdorff_distance (tasks/surface_distance.py): same values,
    # on the masks' device, without MONAI's per-(sample, class) CPU loop that dominated evaluation time
    pred_hot = one_hot(pred, num_classes, include_background).bool()
    label_hot = one_hot(label, num_classes, include_background).bool()
    batch, classes = pred_hot.shape[:2]
    pair_spacing = None if spacing is None else spacing.to(pred.device).repeat_interleave(classes, dim=0)
    distance = percentile_hausdorff(pred_hot.flatten(0, 1), label_hot.flatten(0, 1), pair_spacing,
                                    percentile=95.0).view(batch, classes)
    pred_empty = pred_hot.flatten(2).sum(-1) == 0
    label_empty = label_hot.flatten(2).sum(-1) == 0
    diagonal = image_diagonal(tuple(pred.shape[1:]), spacing, batch).to(distance.device)[:, None]
    distance = torch.where(pred_empty ^ label_empty, diagonal.expand_as(distance), distance)
    return torch.where(pred_empty & label_empty, torch.zeros_like(distance), distance)


def false_positive_volume(pred: Tensor, label: Tensor, num_classes: int, include_background: bool = False,
                          spacing: Tensor | None = None) -> Tensor:
    """Predicted volume of the evaluated classes absent from the label, ``(B,)``: mL with ``spacing`` ``(B, D)``
    mm, else voxels. The Dice convention already scores such a class 0; this says how much was hallucinated."""
    absent = one_hot(label, num_classes, include_background).flatten(2).sum(-1) == 0
    predicted = one_hot(pred, num_classes, include_background).flatten(2).sum(-1)
    voxels = (predicted * absent).sum(dim=1).double()
    if spacing is None:
        return voxels
    return voxels * spacing.double().prod(dim=1) / 1000.0  # mm^3 -> mL


# -- torchmetrics wrappers ------------------------------------------------------------------------------
def _check_inputs(preds: Tensor, target: SegmentationTarget, num_classes: int) -> tuple[Tensor, Tensor]:
    if not isinstance(target, SegmentationTarget):
        raise TypeError(f"segmentation metrics take target as a SegmentationTarget(label, spacing, tau), "
                        f"got {type(target).__name__}")
    label = target.label
    if preds.ndim < 3 or preds.shape[1] != 2 or preds.shape[:1] + preds.shape[2:] != label.shape:
        raise ValueError(f"segmentation metrics take preds (B, 2, *spatial) [prediction, reference] and labels "
                         f"(B, *spatial), got {tuple(preds.shape)} and {tuple(label.shape)}")
    if num_classes < 2:
        raise ValueError(f"segmentation metrics need num_classes >= 2, got {num_classes!r}")
    return preds[:, 0], preds[:, 1]


class _SegmentationMean(SampleMean):
    """Mean over samples (or sample x class pairs) of a per-sample value; subclasses say which value."""

    def __init__(self, num_classes: int, include_background: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.include_background = int(num_classes), bool(include_background)

    def sample_values(self, preds: Tensor, target: SegmentationTarget) -> Tensor:
        return self.values(*_check_inputs(preds, target, self.num_classes), target)

    def values(self, pred: Tensor, reference: Tensor, target: SegmentationTarget) -> Tensor:
        raise NotImplementedError


class DiceScore(_SegmentationMean):
    """Mean Dice over samples: of the evaluated classes' mean (``class_index=None``) or of one class."""

    higher_is_better = True

    def __init__(self, num_classes: int, include_background: bool = False, class_index: int | None = None,
                 **kwargs) -> None:
        super().__init__(num_classes, include_background, **kwargs)
        first = 0 if include_background else 1
        if class_index is not None and not first <= class_index < num_classes:
            raise ValueError(f"class_index must be an evaluated class in [{first}, {num_classes}), got {class_index!r}")
        self.class_index = class_index

    def values(self, pred, reference, target):
        dice = dice_per_class(pred, target.label, self.num_classes, self.include_background)
        if self.class_index is None:
            return dice.mean(dim=1)
        return dice[:, self.class_index - (0 if self.include_background else 1)]


class DiceAccuracy(_SegmentationMean):
    """Fraction of samples whose mean Dice reaches ``target.tau``: the task's ``is_correct`` rate."""

    higher_is_better = True

    def values(self, pred, reference, target):
        dice = mean_dice(pred, target.label, self.num_classes, self.include_background)
        return dice >= target.tau.to(dice.device, dice.dtype)


class HausdorffDistance95(_SegmentationMean):
    """Mean HD95 over (sample, evaluated class) pairs; mm with spacing, else voxels (see the module notes)."""

    higher_is_better = False

    def values(self, pred, reference, target):
        return hd95_per_class(pred, target.label, self.num_classes, self.include_background, target.spacing)


class FalsePositiveVolume(_SegmentationMean):
    """Mean predicted volume of classes absent from the label; mL with spacing, else voxels."""

    higher_is_better = False

    def values(self, pred, reference, target):
        return false_positive_volume(pred, target.label, self.num_classes, self.include_background, target.spacing)


class PredictionChange(_SegmentationMean):
    """``1 - Dice(prediction, reference)``, mean over samples: how much of the clean prediction an attack
    changed (0: unchanged, so 0 on clean images). Not an error against the truth (changing a wrong voxel counts
    too), so no side is worse and the worst-case checks skip it, as they skip a regression's shift."""

    higher_is_better = None

    def values(self, pred, reference, target):
        return 1.0 - mean_dice(pred, reference, self.num_classes, self.include_background)


def segmentation_metrics(num_classes: int, class_names: list[str], include_background: bool = False
                         ) -> dict[str, Metric]:
    """``accuracy`` (mean Dice >= tau), ``dice`` (mean over the evaluated classes), ``dice_<class name>`` per
    evaluated class, ``hd95``, ``fp_volume`` and ``pred_change``. ``class_names``: one per label value."""
    common = {"num_classes": num_classes, "include_background": include_background}
    metrics: dict[str, Metric] = {"accuracy": DiceAccuracy(**common), "dice": DiceScore(**common)}
    for index in range(0 if include_background else 1, num_classes):
        metrics[f"dice_{class_names[index]}"] = DiceScore(class_index=index, **common)
    metrics.update(hd95=HausdorffDistance95(**common), fp_volume=FalsePositiveVolume(**common),
                   pred_change=PredictionChange(**common))
    return metrics
