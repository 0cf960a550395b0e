"""Detection metrics for clean and adversarial evaluation of 2-D and 3-D detectors: box IoU, the LUNA16 FROC and
its CPM, COCO mAP@0.5 and mAP@0.5:0.95, seed 004's mean IoU per ground-truth box, and the vanished / fabricated /
mislabelled object rates under attack.

All functions are pure, on numpy arrays (torch tensors are converted), and take one entry per image:

- a *prediction* is a mapping ``{"boxes": (N, 2D), "labels": (N,) int, "scores": (N,)}``;
- a *target* is a mapping ``{"boxes": (M, 2D), "labels": (M,) int}``; for the FROC it may also hold
  ``"irrelevant_boxes": (K, 2D)``, findings whose hits are neither true nor false positives (LUNA16's
  ``annotations_excluded.csv``).

Boxes follow MONAI's StandardMode: ``(lo_0, ..., lo_{D-1}, hi_0, ..., hi_{D-1})`` in the image array's spatial
axis order, in voxels (pixels), ``lo < hi``; ``D`` is 2 (``(N, 4)``) or 3 (``(N, 6)``). Extents are continuous
(``hi - lo``, no ``+ 1``), as in MONAI's box utilities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch

BOXES, LABELS, SCORES, IRRELEVANT = "boxes", "labels", "scores", "irrelevant_boxes"

LUNA16_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the CPM's operating points, mean FPs per scan
LUNA16_MAX_CANDIDATES = 100  # the official evaluation keeps at most this many candidates per scan
COCO_IOU_RANGE = (0.5, 0.95, 0.05)  # mAP@0.5:0.95: start, stop, step
COCO_MAX_DETECTIONS = 100

HitTest = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``hit(candidate_boxes (C, 2D), target_boxes (T, 2D)) -> (C, T) bool``: does candidate ``c`` hit target ``t``."""


# -- conversion -------------------------------------------------------------------------------------------
def to_numpy(values, dtype=None) -> np.ndarray:
    """``values`` (numpy array, torch tensor, sequence) as a numpy array, detached and on the CPU."""
    if hasattr(values, "detach"):  # a torch tensor: no torch import needed for numpy-only callers
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def as_boxes(values) -> np.ndarray:
    """Boxes as a float64 ``(N, 2D)`` array; an empty input of any shape becomes ``(0, 0)`` (matches nothing)."""
    boxes = to_numpy(values, np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, boxes.shape[-1] if boxes.ndim == 2 else 0)
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 6):
        raise ValueError(f"boxes must be (N, 4) or (N, 6), got shape {boxes.shape}")
    return boxes


def _boxes(entry: Mapping, key: str = BOXES) -> np.ndarray:
    return as_boxes(entry[key]) if key in entry and entry[key] is not None else np.zeros((0, 0))


def _labels(entry: Mapping) -> np.ndarray:
    return to_numpy(entry[LABELS], np.int64).reshape(-1)


def _scores(entry: Mapping) -> np.ndarray:
    return to_numpy(entry[SCORES], np.float64).reshape(-1)


# -- geometry ---------------------------------------------------------------------------------------------
def box_volumes(boxes) -> np.ndarray:
    """Area (2-D) or volume (3-D) ``(N,)`` of StandardMode boxes."""
    boxes = as_boxes(boxes)
    dims = boxes.shape[1] // 2
    return np.prod(np.clip(boxes[:, dims:] - boxes[:, :dims], 0.0, None), axis=1)


def box_centres(boxes) -> np.ndarray:
    """Centres ``(N, D)`` of StandardMode boxes."""
    boxes = as_boxes(boxes)
    dims = boxes.shape[1] // 2
    return (boxes[:, :dims] + boxes[:, dims:]) / 2.0


def box_iou(a, b) -> np.ndarray:
    """Intersection over union ``(N, M)`` of boxes ``a`` ``(N, 2D)`` and ``b`` ``(M, 2D)``, 2-D or 3-D.

    Pairs with an empty union (both boxes degenerate) score 0; an empty ``a`` or ``b`` gives an empty matrix."""
    a, b = as_boxes(a), as_boxes(b)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"boxes of different dimensions: {a.shape[1] // 2}-D and {b.shape[1] // 2}-D")
    dims = a.shape[1] // 2
    lo = np.maximum(a[:, None, :dims], b[None, :, :dims])
    hi = np.minimum(a[:, None, dims:], b[None, :, dims:])
    intersection = np.prod(np.clip(hi - lo, 0.0, None), axis=2)
    union = box_volumes(a)[:, None] + box_volumes(b)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def pairwise_hits(hit: HitTest, candidates: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``hit`` as a ``(C, T)`` bool matrix, also when either side is empty (hit tests need not handle that)."""
    if len(candidates) == 0 or len(targets) == 0:
        return np.zeros((len(candidates), len(targets)), dtype=bool)
    return np.asarray(hit(candidates, targets), dtype=bool)


# -- hit tests for the FROC -------------------------------------------------------------------------------
def centre_distance_hit(spacing: Sequence[float] | None = None) -> HitTest:
    """LUNA16's hit test: a candidate hits a target when the candidate's centre lies *strictly* within the
    target's radius of the target's centre, distances in mm (voxel offsets times ``spacing``, one value per
    spatial axis; ``None``: voxel units).

    LUNA16 describes each nodule by a centre and a diameter; its box is the cube of that diameter, so the
    diameter is read back as the mean of the target box's extents in mm (exact for such cubes). The official
    script gives a finding without a diameter (``diameter_mm = -1``, the irrelevant findings) 10 mm: build such
    boxes 10 mm wide."""

    def hit(candidates: np.ndarray, targets: np.ndarray) -> np.ndarray:
        dims = targets.shape[1] // 2
        scale = np.ones(dims) if spacing is None else np.asarray(spacing, np.float64).reshape(dims)
        offsets = (box_centres(candidates)[:, None, :] - box_centres(targets)[None, :, :]) * scale
        diameters = ((targets[:, dims:] - targets[:, :dims]) * scale).mean(axis=1)
        return (offsets**2).sum(axis=2) < (diameters[None, :] / 2.0) ** 2

    return hit


def iou_hit(threshold: float = 0.5) -> HitTest:
    """A candidate hits a target when their IoU is at least ``threshold`` (for 2-D boxes, e.g. blood cells)."""

    def hit(candidates: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return box_iou(candidates, targets) >= threshold

    return hit


# -- FROC / CPM (LUNA16) ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FROCResult:
    """A FROC analysis.

    ``fps_per_scan`` / ``sensitivity`` / ``thresholds``: the FROC curve, one point per distinct score (descending
    threshold, candidates with ``score >= threshold`` kept), preceded by the origin ``(0, 0)`` at threshold
    ``inf``; ``fp_rates`` and ``operating_sensitivities``: the sensitivity interpolated at each rate; ``cpm``:
    their mean. Counts: targets (relevant findings), targets hit, false-positive candidates, candidates ignored
    because they hit only an irrelevant finding, and extra candidates on an already-hit target (ignored)."""

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    fp_rates: tuple[float, ...]
    operating_sensitivities: np.ndarray
    cpm: float
    num_scans: int
    num_targets: int
    num_detected: int
    num_false_positives: int
    num_ignored_irrelevant: int
    num_ignored_duplicates: int


@dataclass(frozen=True)
class _ScanOutcome:
    """One scan's FROC entries: the best score of each target (``-inf`` when missed) and each FP's score."""

    target_scores: np.ndarray
    false_positive_scores: np.ndarray
    num_ignored_irrelevant: int
    num_ignored_duplicates: int


def keep_most_suspicious(scores: np.ndarray, max_candidates: int | None) -> np.ndarray:
    """Mask of the candidates LUNA16 evaluates: all of them when there are at most ``max_candidates``, else those
    scoring *strictly* above the ``(max_candidates + 1)``-th highest score (so ties at the cut are all dropped)."""
    if max_candidates is None or len(scores) <= max_candidates:
        return np.ones(len(scores), dtype=bool)
    cut = np.sort(scores)[::-1][max_candidates]
    return scores > cut


def _score_scan(boxes: np.ndarray, scores: np.ndarray, targets: np.ndarray, irrelevant: np.ndarray,
                hit: HitTest) -> _ScanOutcome:
    """Classify one scan's candidates the LUNA16 way: a target is detected with the best score among the
    candidates hitting it (the others are double detections, ignored; a candidate hitting two targets counts
    for both); a candidate hitting no target but an irrelevant finding is ignored; every other one is an FP."""
    hits = pairwise_hits(hit, boxes, targets)
    on_target = hits.any(axis=1)
    on_irrelevant = pairwise_hits(hit, boxes, irrelevant).any(axis=1)
    target_scores = np.where(hits, scores[:, None], -np.inf).max(axis=0, initial=-np.inf)
    hits_per_target = hits.sum(axis=0)
    return _ScanOutcome(
        target_scores=target_scores,
        false_positive_scores=scores[~on_target & ~on_irrelevant],
        num_ignored_irrelevant=int((~on_target & on_irrelevant).sum()),
        num_ignored_duplicates=int((hits_per_target[hits_per_target > 0] - 1).sum()),
    )


def _count_at_or_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many ``values`` are ``>=`` it."""
    ordered = np.sort(values)
    return len(ordered) - np.searchsorted(ordered, thresholds, side="left")


def froc_curve(target_scores: np.ndarray, false_positive_scores: np.ndarray, num_scans: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fps_per_scan, sensitivity, thresholds)`` from every target's best score (``-inf``: missed) and every
    false positive's score, pooled over ``num_scans`` scans.

    At each distinct score ``s`` (descending), sensitivity = targets scored ``>= s`` / all targets, FPs per
    scan = FPs scored ``>= s`` / all scans (scans without targets included). This is the LUNA16 definition (an
    ROC over the pooled entries, rescaled), with the ROC's origin ``(0, 0)`` at threshold ``inf`` first.
    No targets: sensitivity is NaN."""
    detected = target_scores[np.isfinite(target_scores)]
    thresholds = np.unique(np.concatenate([detected, false_positive_scores]))[::-1]
    true_positives = _count_at_or_above(detected, thresholds)
    false_positives = _count_at_or_above(false_positive_scores, thresholds)
    num_targets = len(target_scores)
    sensitivity = true_positives / num_targets if num_targets else np.full(len(thresholds), np.nan)
    origin_sensitivity = 0.0 if num_targets else np.nan
    return (np.concatenate([[0.0], false_positives / max(num_scans, 1)]),
            np.concatenate([[origin_sensitivity], sensitivity]),
            np.concatenate([[np.inf], thresholds]))


def sensitivity_at_fp_rates(fps_per_scan: np.ndarray, sensitivity: np.ndarray,
                            fp_rates: Sequence[float] = LUNA16_FP_RATES) -> np.ndarray:
    """The FROC curve's sensitivity at each of ``fp_rates``, interpolated as LUNA16 does: ``np.interp`` on the
    curve, i.e. linearly between its points, starting from the origin ``(0, 0)`` (so between 0 and the first
    FP rate reached the sensitivity rises linearly from 0, and it is 0 up to any FP rate reached before the
    first hit), and clamped to the final sensitivity beyond the largest FP rate reached. Where the curve is
    vertical (targets gained at an unchanged FP rate) ``np.interp`` takes the top of the jump."""
    return np.interp(np.asarray(fp_rates, np.float64), fps_per_scan, sensitivity)


def froc(predictions: Sequence[Mapping], targets: Sequence[Mapping], hit: HitTest | None = None,
         max_candidates_per_scan: int | None = LUNA16_MAX_CANDIDATES,
         fp_rates: Sequence[float] = LUNA16_FP_RATES) -> FROCResult:
    """LUNA16's FROC analysis and CPM over scans (one prediction and one target per scan; labels unused).

    Per scan: candidates beyond ``max_candidates_per_scan`` are dropped (:func:`keep_most_suspicious`, the
    official limit 100; ``None``: keep all), then scored by :func:`_score_scan` with ``hit`` (default
    :func:`centre_distance_hit` in voxel units; :func:`iou_hit` for 2-D boxes). The curve is
    :func:`froc_curve`, the operating sensitivities :func:`sensitivity_at_fp_rates`, the CPM their mean.

    The official script stops at the curve: it reads it with ``np.interp`` on ``np.linspace(1/8, 8, 10001)``
    (and optionally bootstraps a mean curve over resampled scans) without averaging the seven points itself.
    Here the same piecewise-linear curve, not bootstrapped (deterministic), is read exactly at ``fp_rates``.
    Where the official script divides 0 by 0 (no true positive at all) sensitivity here is 0; with no targets
    it is NaN."""
    hit = centre_distance_hit() if hit is None else hit
    outcomes = []
    for prediction, target in zip(predictions, targets, strict=True):
        boxes, scores = _boxes(prediction), _scores(prediction)
        kept = keep_most_suspicious(scores, max_candidates_per_scan)
        outcomes.append(_score_scan(boxes[kept], scores[kept], _boxes(target), _boxes(target, IRRELEVANT), hit))
    target_scores = np.concatenate([np.zeros(0)] + [o.target_scores for o in outcomes])
    fp_scores = np.concatenate([np.zeros(0)] + [o.false_positive_scores for o in outcomes])
    fps, sens, thresholds = froc_curve(target_scores, fp_scores, len(outcomes))
    operating = sensitivity_at_fp_rates(fps, sens, fp_rates)
    return FROCResult(
        fps_per_scan=fps, sensitivity=sens, thresholds=thresholds, fp_rates=tuple(fp_rates),
        operating_sensitivities=operating, cpm=float(operating.mean()), num_scans=len(outcomes),
        num_targets=len(target_scores), num_detected=int(np.isfinite(target_scores).sum()),
        num_false_positives=len(fp_scores),
        num_ignored_irrelevant=sum(o.num_ignored_irrelevant for o in outcomes),
        num_ignored_duplicates=sum(o.num_ignored_duplicates for o in outcomes),
    )


def cpm(predictions: Sequence[Mapping], targets: Sequence[Mapping], **froc_kwargs) -> float:
    """LUNA16's competition performance metric: the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FPs per
    scan (see :func:`froc`, which takes the same arguments)."""
    return froc(predictions, targets, **froc_kwargs).cpm


# -- COCO mAP ---------------------------------------------------------------------------------------------
def _coco_key(prefix: str, iou: tuple[float, ...], max_detections: int) -> str:
    """The key MONAI's ``COCOMetric`` gives a per-class AP: over an IoU range or at one IoU."""
    if len(iou) == 3:
        return f"{prefix}_mAP_IoU_{iou[0]:.2f}_{iou[1]:.2f}_{iou[2]:.2f}_MaxDet_{max_detections}"
    return f"{prefix}_AP_IoU_{iou[0]:.2f}_MaxDet_{max_detections}"


def _mean_over_present_classes(per_class: dict[int, float]) -> float:
    """Mean AP over the classes with ground truth; NaN when there is none."""
    present = [value for value in per_class.values() if not np.isnan(value)]
    return float(np.mean(present)) if present else float("nan")


def coco_map(predictions: Sequence[Mapping], targets: Sequence[Mapping], classes: Sequence[int] | None = None,
             max_detections: int = COCO_MAX_DETECTIONS) -> dict:
    """COCO average precision (101 recall points, greedy matching by descending score, IoU ``>=`` threshold),
    2-D or 3-D, computed by MONAI's ``matching_batch`` and ``COCOMetric`` with :func:`box_iou`.

    ``classes``: the labels evaluated (default: every label in ``predictions`` or ``targets``); predictions of
    other labels are dropped. A class without ground truth has no AP (COCO): MONAI reports -1 for it, which
    here becomes NaN per class and is left out of the means (averaging the -1 in would lower, even negate,
    the mAP). At most ``max_detections`` highest-scoring predictions per image and class are matched.

    Returns ``{"map_50_95", "map_50", "map_75"}`` (means over classes with ground truth, NaN if none) and
    ``{"ap_50_95_per_class", "ap_50_per_class", "ap_75_per_class"}`` (label -> AP or NaN)."""
    if classes is None:
        classes = np.union1d(np.concatenate([np.zeros(0, np.int64)] + [_labels(p) for p in predictions]),
                             np.concatenate([np.zeros(0, np.int64)] + [_labels(t) for t in targets]))
    classes = [int(label) for label in classes]
    index_of = {label: i for i, label in enumerate(classes)}
    names = [str(label) for label in classes]

    def encode(entry: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = _labels(entry)
        known = np.isin(labels, classes)
        return _boxes(entry)[known], np.array([index_of[int(label)] for label in labels[known]], np.int64), known

    metric = COCOMetric(classes=names, iou_list=(0.5, 0.75), iou_range=COCO_IOU_RANGE,
                        max_detection=(max_detections,), per_class=True, verbose=False)
    pred_boxes, pred_classes, pred_scores, gt_boxes, gt_classes = [], [], [], [], []
    for prediction, target in zip(predictions, targets, strict=True):
        boxes, encoded, known = encode(prediction)
        pred_boxes.append(boxes)
        pred_classes.append(encoded)
        pred_scores.append(_scores(prediction)[known])
        boxes, encoded, _ = encode(target)
        gt_boxes.append(boxes)
        gt_classes.append(encoded)
    matches = matching_batch(box_iou, metric.iou_thresholds, pred_boxes, pred_classes, pred_scores, gt_boxes,
                             gt_classes, max_detections=max_detections)
    values, _ = metric(matches)

    results = {}
    for name, iou in (("50_95", COCO_IOU_RANGE), ("50", (0.5,)), ("75", (0.75,))):
        per_class = {label: values[_coco_key(names[i], iou, max_detections)] for i, label in enumerate(classes)}
        per_class = {label: float("nan") if ap < 0 else float(ap) for label, ap in per_class.items()}
        results[f"ap_{name}_per_class"] = per_class
        results[f"map_{name}"] = _mean_over_present_classes(per_class)
    return results


# -- seed 004: mean IoU per ground-truth box --------------------------------------------------------------
@dataclass(frozen=True)
class GroundTruthIoU:
    """``mean``: over every ground-truth box of every image (NaN without any); ``per_image``: ``(B,)`` mean over
    each image's boxes (NaN for an image without boxes); ``per_box``: each image's ``(M,)`` best IoUs."""

    mean: float
    per_image: np.ndarray
    per_box: list[np.ndarray]


def best_iou_per_box(pred_boxes, pred_labels, gt_boxes, gt_labels) -> np.ndarray:
    """Each ground-truth box's best IoU ``(M,)`` with any prediction of the same label; 0 when there is none."""
    gt_boxes, pred_boxes = as_boxes(gt_boxes), as_boxes(pred_boxes)
    same_label = to_numpy(pred_labels, np.int64).reshape(-1, 1) == to_numpy(gt_labels, np.int64).reshape(1, -1)
    ious = np.where(same_label, box_iou(pred_boxes, gt_boxes), 0.0)
    return ious.max(axis=0, initial=0.0)


def _above(prediction: Mapping, score_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The boxes and labels of the predictions scoring at least ``score_threshold`` (the operating point)."""
    kept = _scores(prediction) >= score_threshold
    return _boxes(prediction)[kept], _labels(prediction)[kept]


def mean_gt_iou(predictions: Sequence[Mapping], targets: Sequence[Mapping], score_threshold: float = 0.5
                ) -> GroundTruthIoU:
    """Seed 004's mean IoU per ground-truth box: each ground-truth box scores its best IoU with a prediction of
    the same label scoring ``>= score_threshold``, a missed box 0; means over all boxes and per image."""
    per_box = []
    for prediction, target in zip(predictions, targets, strict=True):
        boxes, labels = _above(prediction, score_threshold)
        per_box.append(best_iou_per_box(boxes, labels, _boxes(target), _labels(target)))
    every_box = np.concatenate([np.zeros(0)] + per_box)
    per_image = np.array([ious.mean() if len(ious) else np.nan for ious in per_box])
    return GroundTruthIoU(mean=float(every_box.mean()) if len(every_box) else float("nan"), per_image=per_image,
                          per_box=per_box)


# -- under attack: vanished, fabricated, mislabelled objects ----------------------------------------------
@dataclass(frozen=True)
class AttackDetectionOutcome:
    """Counts behind the attack rates (see :func:`attack_detection_outcome`); the rates are NaN on an empty
    denominator.

    - ``vanished_rate`` = vanished / detected_clean: of the ground-truth boxes found clean, the share that no
      adversarial detection of *any* label overlaps any more;
    - ``mislabelled_rate`` = mislabelled / detected_clean: of the same boxes, the share still overlapped under
      attack but only by detections of other labels (vanished and mislabelled are disjoint, so
      ``1 - vanished_rate - mislabelled_rate`` is the share that survives the attack);
    - ``fabricated_rate`` = fabricated / adversarial_detections: the share of the adversarial detections that
      overlap neither a ground-truth box nor a clean detection (any label); ``fabricated_per_image`` = fabricated
      / num_images."""

    num_images: int
    detected_clean: int
    vanished: int
    mislabelled: int
    adversarial_detections: int
    fabricated: int

    @staticmethod
    def _ratio(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else float("nan")

    @property
    def vanished_rate(self) -> float:
        return self._ratio(self.vanished, self.detected_clean)

    @property
    def mislabelled_rate(self) -> float:
        return self._ratio(self.mislabelled, self.detected_clean)

    @property
    def fabricated_rate(self) -> float:
        return self._ratio(self.fabricated, self.adversarial_detections)

    @property
    def fabricated_per_image(self) -> float:
        return self._ratio(self.fabricated, self.num_images)


def _overlapped(boxes: np.ndarray, by_boxes: np.ndarray, iou_threshold: float, labels=None, by_labels=None
                ) -> np.ndarray:
    """``(N,)``: is each box overlapped (IoU ``>= iou_threshold``) by one of ``by_boxes`` (of the same label when
    labels are given)."""
    overlaps = box_iou(boxes, by_boxes) >= iou_threshold
    if labels is not None:
        overlaps &= labels[:, None] == by_labels[None, :]
    return overlaps.any(axis=1)


def attack_detection_outcome(clean: Sequence[Mapping], adversarial: Sequence[Mapping], targets: Sequence[Mapping],
                             score_threshold: float = 0.5, iou_threshold: float = 0.5) -> AttackDetectionOutcome:
    """Vanished, mislabelled and fabricated objects when ``adversarial`` predictions replace ``clean`` ones for
    the same images, at an operating point: predictions scoring ``>= score_threshold`` are detections, and a
    detection *finds* a box when their IoU is ``>= iou_threshold`` (any number of detections may find one box
    and one detection several boxes: no one-to-one assignment).

    A ground-truth box is *detected clean* when a clean detection of its label finds it; among those, it has
    *vanished* when no adversarial detection finds it, and is *mislabelled* when adversarial detections find it
    but none of its label. An adversarial detection is *fabricated* when it finds no ground-truth box and no
    clean detection (any label). Passing the clean predictions as ``adversarial`` gives 0 for all three."""
    counts = dict(detected_clean=0, vanished=0, mislabelled=0, adversarial_detections=0, fabricated=0)
    for clean_pred, adversarial_pred, target in zip(clean, adversarial, targets, strict=True):
        gt_boxes, gt_labels = _boxes(target), _labels(target)
        clean_boxes, clean_labels = _above(clean_pred, score_threshold)
        adv_boxes, adv_labels = _above(adversarial_pred, score_threshold)
        detected_clean = _overlapped(gt_boxes, clean_boxes, iou_threshold, gt_labels, clean_labels)
        located = _overlapped(gt_boxes, adv_boxes, iou_threshold)
        detected_adversarial = _overlapped(gt_boxes, adv_boxes, iou_threshold, gt_labels, adv_labels)
        fabricated = ~(_overlapped(adv_boxes, gt_boxes, iou_threshold)
                       | _overlapped(adv_boxes, clean_boxes, iou_threshold))
        counts["detected_clean"] += int(detected_clean.sum())
        counts["vanished"] += int((detected_clean & ~located).sum())
        counts["mislabelled"] += int((detected_clean & located & ~detected_adversarial).sum())
        counts["adversarial_detections"] += len(adv_boxes)
        counts["fabricated"] += int(fabricated.sum())
    return AttackDetectionOutcome(num_images=len(targets), **counts)
