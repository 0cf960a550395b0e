"""The detection task's torchmetrics: per-image detections and boxes gathered across batches and DDP ranks, scored
at epoch end by :mod:`medrobust.tasks.detection_metrics` (FROC / CPM, COCO mAP, mean IoU per box, attack outcomes).

``update(preds, target)`` takes :meth:`DetectionTask.metric_inputs`' pair: :class:`DetectionPreds` (the padded
detections of the evaluated output and of its clean reference) and :class:`DetectionTarget` (the batch's padded
boxes, masks, and the task's per-sample loss terms and verdict).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from medrobust.evaluation.metric_curves import MetricCurve
from medrobust.tasks.detection_metrics import attack_detection_outcome, coco_map, froc, mean_gt_iou
from medrobust.tasks.landmark_metrics import loss_threshold
from medrobust.tasks.sample_mean import SampleMean

COCO_KEYS = ("map_50", "map_50_95", "map_75")
_KEY_STRIDE = 2**40  # image keys: rank * _KEY_STRIDE + the image's index on that rank (exact in float64)


class DetectionPreds(NamedTuple):
    """Padded detections ``(B, K, 2d)`` / ``(B, K)`` of the evaluated output and of its reference (the clean one)."""

    boxes: Tensor
    labels: Tensor
    scores: Tensor
    valid: Tensor
    reference_boxes: Tensor
    reference_labels: Tensor
    reference_scores: Tensor
    reference_valid: Tensor


class DetectionTarget(NamedTuple):
    """The batch's padded boxes ``(B, N, 2d)``, labels, ``valid`` and ``target`` masks ``(B, N)``, and per sample the
    task's loss terms ``(B, 3)`` and verdict ``correct`` ``(B,)``."""

    boxes: Tensor
    labels: Tensor
    valid: Tensor
    target: Tensor
    terms: Tensor
    correct: Tensor


def _check(preds: DetectionPreds, target: DetectionTarget) -> None:
    if not isinstance(preds, DetectionPreds) or not isinstance(target, DetectionTarget):
        raise TypeError(f"detection metrics take (DetectionPreds, DetectionTarget), got ({type(preds).__name__}, "
                        f"{type(target).__name__})")
    if preds.boxes.shape[0] != target.boxes.shape[0] or preds.boxes.shape[-1] != target.boxes.shape[-1]:
        raise ValueError(f"detections {tuple(preds.boxes.shape)} and boxes {tuple(target.boxes.shape)} must be "
                         f"(B, K, 2d) and (B, N, 2d) for the same B and d")


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def _rows(keys: Tensor, boxes: Tensor, labels: Tensor, last: Tensor, keep: Tensor) -> Tensor:
    """float64 rows ``[key, box (2d), label, last]`` of the kept entries."""
    b, n = keep.shape
    table = torch.cat([keys[:, None, None].expand(b, n, 1).double(), boxes.double(), labels[..., None].double(),
                       last[..., None].double()], dim=-1)
    return table[keep.bool()].detach()


def _cat(state, width: int) -> np.ndarray:
    """A ``cat`` state (a list before a sync, a tensor after) as a float64 numpy array ``(n, width)``; ``width``
    only shapes an empty state (a gathered one has its rows' own width, also on a rank that saw no batch)."""
    if isinstance(state, list) and not state:
        return np.zeros((0, width))
    values = dim_zero_cat(state).detach().cpu().double().numpy()
    return values.reshape(-1, values.shape[-1] if values.ndim == 2 else width)


class _DetectionAccumulator(Metric):
    """Keeps every image's detections (and its reference's) and boxes, keyed per image across batches and DDP
    ranks (``rank * 2**40 + index``: ``cat`` gathers pad and concatenate, so the key says whose row is whose);
    :meth:`per_image` regroups them at compute. Empty (``skip_when_empty``) without a target box."""

    full_state_update = False
    skip_when_empty = True  # see medrobust.tasks.base.compute_metrics
    uses_reference = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("images", default=[], dist_reduce_fx="cat")
        self.add_state("detections", default=[], dist_reduce_fx="cat")
        self.add_state("references", default=[], dist_reduce_fx="cat")
        self.add_state("truths", default=[], dist_reduce_fx="cat")
        self.dims = 0

    def update(self, preds: DetectionPreds, target: DetectionTarget) -> None:
        _check(preds, target)
        self.dims = preds.boxes.shape[-1] // 2
        seen = sum(len(keys) for keys in self.images)
        batch = preds.boxes.shape[0]
        device = preds.boxes.device
        keys = (torch.arange(batch, device=device, dtype=torch.float64) + seen) + _rank() * float(_KEY_STRIDE)
        self.images.append(keys)
        self.detections.append(_rows(keys, preds.boxes, preds.labels, preds.scores, preds.valid))
        if self.uses_reference:
            self.references.append(_rows(keys, preds.reference_boxes, preds.reference_labels,
                                         preds.reference_scores, preds.reference_valid))
        self.truths.append(_rows(keys, target.boxes, target.labels, target.target.float(), target.valid))

    def per_image(self) -> tuple[list[dict], list[dict], list[dict]]:
        """``(predictions, references, targets)``, one entry per image (detection_metrics' mappings); a target
        holds the target boxes and, as ``irrelevant_boxes``, the other valid boxes."""
        width = 2 * self.dims + 3  # rows: key, box (2d), label, score / is-target
        keys = _cat(self.images, 1)[:, 0]
        order = np.sort(keys)

        def split(rows: np.ndarray) -> list[np.ndarray]:
            position = np.searchsorted(order, rows[:, 0])
            rows = rows[np.argsort(position, kind="stable")]
            bounds = np.searchsorted(np.sort(position), np.arange(1, len(order)))
            return np.split(rows, bounds) if len(order) else []

        def detections(rows: np.ndarray) -> dict:
            return {"boxes": rows[:, 1:-2], "labels": rows[:, -2].astype(np.int64), "scores": rows[:, -1]}

        predictions = [detections(rows) for rows in split(_cat(self.detections, width))]
        references = [detections(rows) for rows in split(_cat(self.references, width))] if self.uses_reference \
            else []
        targets = []
        for rows in split(_cat(self.truths, width)):
            is_target = rows[:, -1] > 0.5
            targets.append({"boxes": rows[is_target, 1:-2], "labels": rows[is_target, -2].astype(np.int64),
                            "irrelevant_boxes": rows[~is_target, 1:-2]})
        return predictions, references, targets

    def num_targets(self) -> int:
        return int((_cat(self.truths, 2 * self.dims + 3)[:, -1] > 0.5).sum())

    def is_empty(self) -> bool:
        return self.num_targets() == 0

    def compute(self) -> Tensor:
        if self.is_empty():
            return torch.tensor(math.nan)
        return torch.tensor(self.value(*self.per_image()), dtype=torch.float32)

    def value(self, predictions: list[dict], references: list[dict], targets: list[dict]) -> float:
        raise NotImplementedError


class MeanGTIoU(_DetectionAccumulator):
    """Seed 004's mean IoU per target box (:func:`mean_gt_iou` at ``score_threshold``)."""

    higher_is_better = True

    def __init__(self, score_threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.score_threshold = score_threshold

    def value(self, predictions, references, targets):
        return mean_gt_iou(predictions, targets, self.score_threshold).mean


class CPM(_DetectionAccumulator):
    """LUNA16's competition performance metric (:func:`froc`, every image a scan, irrelevant findings ignored)."""

    higher_is_better = True

    def __init__(self, hit, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hit = hit

    def value(self, predictions, references, targets):
        return froc(predictions, targets, hit=self.hit).cpm

    def curve(self) -> MetricCurve | None:
        """The FROC itself (:mod:`medrobust.evaluation.metric_curves`): sensitivity against false positives per
        scan, read at LUNA16's seven rates; ``None`` without a target box."""
        if self.is_empty():
            return None
        predictions, _, targets = self.per_image()
        result = froc(predictions, targets, hit=self.hit)
        return MetricCurve(kind="froc", x=result.fps_per_scan, y=result.sensitivity, thresholds=result.thresholds,
                           x_name="false positives per scan", y_name="sensitivity", log_x=True,
                           marks=tuple(zip(result.fp_rates, result.operating_sensitivities.tolist())),
                           summary_name="CPM", summary=result.cpm)


class MeanAP(_DetectionAccumulator):
    """COCO mAP over the classes with targets (:func:`coco_map`; ``key``: ``"map_50"``, ``"map_50_95"`` or
    ``"map_75"``); detections that hit (``hit``, the FROC's test) an irrelevant finding and no target are dropped
    first, as the FROC ignores them."""

    higher_is_better = True

    def __init__(self, num_classes: int, hit, key: str = "map_50", **kwargs) -> None:
        super().__init__(**kwargs)
        if key not in COCO_KEYS:
            raise ValueError(f"key must be one of {list(COCO_KEYS)}, got {key!r}")
        self.num_classes, self.hit, self.key = num_classes, hit, key

    def value(self, predictions, references, targets):
        kept = []
        for prediction, target in zip(predictions, targets):
            boxes = prediction["boxes"]
            drop = np.zeros(len(boxes), dtype=bool)
            if len(boxes) and len(target["irrelevant_boxes"]):
                drop = self.hit(boxes, target["irrelevant_boxes"]).any(axis=1)
                if len(target["boxes"]):
                    drop &= ~self.hit(boxes, target["boxes"]).any(axis=1)
            kept.append({key: value[~drop] for key, value in prediction.items()})
        return coco_map(kept, targets, classes=range(self.num_classes))[self.key]


class AttackOutcomeRate(_DetectionAccumulator):
    """One rate of :class:`AttackDetectionOutcome` (:attr:`rate_name`) between the reference (clean) detections and
    the evaluated ones at ``score_threshold``; 0 on clean images. Empty (NaN, dropped) when its denominator is: no
    target box found clean for the vanished and mislabelled rates, no image for the fabricated count."""

    uses_reference = True
    rate_name = ""

    def __init__(self, score_threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.score_threshold = score_threshold

    def outcome(self):
        predictions, references, targets = self.per_image()
        return attack_detection_outcome(references, predictions, targets, self.score_threshold)

    def rate(self) -> float:
        if len(_cat(self.images, 1)) == 0:
            return math.nan
        return float(getattr(self.outcome(), self.rate_name))

    def is_empty(self) -> bool:
        return math.isnan(self.rate())

    def compute(self) -> Tensor:
        return torch.tensor(self.rate(), dtype=torch.float32)


class VanishedRate(AttackOutcomeRate):
    """Of the target boxes the clean detections find, the share no detection finds under attack."""

    rate_name = "vanished_rate"
    higher_is_better = None  # a shift: how far the attack moved the detections


class MislabelledRate(AttackOutcomeRate):
    """Of the target boxes the clean detections find, the share found under attack by other labels only."""

    rate_name = "mislabelled_rate"
    higher_is_better = None


class FabricatedPerImage(AttackOutcomeRate):
    """Detections under attack that find neither a target box nor a clean detection, per image."""

    rate_name = "fabricated_per_image"
    higher_is_better = False


class CorrectRate(SampleMean):
    """Fraction of samples the task calls correct (``target.correct``): the task's ``is_correct`` rate."""

    higher_is_better = True

    def sample_values(self, preds: DetectionPreds, target: DetectionTarget) -> Tensor:
        _check(preds, target)
        return target.correct


class TermThreshold(Metric):
    """The tau a loss term's per-sample values give (``"mean"``, or ``"robust"``: Huber mean + 3 robust scales),
    gathered over DDP ranks; on the clean validation set it is the task's next threshold for that term."""

    full_state_update = False
    higher_is_better = None
    skip_when_empty = True  # see medrobust.tasks.base.compute_metrics

    def __init__(self, index: int, rule: str = "mean", **kwargs) -> None:
        super().__init__(**kwargs)
        self.index, self.rule = index, rule
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, preds: DetectionPreds, target: DetectionTarget) -> None:
        _check(preds, target)
        self.values.append(target.terms[:, self.index].detach().double().flatten())

    def is_empty(self) -> bool:
        return len(_cat(self.values, 1)) == 0

    def compute(self) -> Tensor:
        values = torch.from_numpy(_cat(self.values, 1)[:, 0])
        if len(values) == 0:
            return torch.tensor(math.nan)
        tau = float(values.mean()) if self.rule == "mean" else loss_threshold(values)
        return torch.tensor(tau, dtype=torch.float32)
