"""Detection metrics on hand-computed answers: box IoU (2-D, 3-D), the LUNA16 FROC / CPM (hit by centre distance
in 3-D and by IoU in 2-D, irrelevant findings, double detections, scans without nodules, the interpolation), COCO
mAP through MONAI without torchvision (perfect, a shifted box of known IoU, the -1 of an absent class), seed 004's
mean IoU per ground-truth box, and the vanished / fabricated / mislabelled rates under attack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medrobust.tasks.detection_metrics import (LUNA16_FP_RATES, attack_detection_outcome, box_iou, centre_distance_hit,
                                               coco_map, cpm, froc, froc_curve, iou_hit, keep_most_suspicious,
                                               mean_gt_iou, sensitivity_at_fp_rates)


def cube(centre, side, spacing=(1.0, 1.0, 1.0)):
    """The 3-D box of a cube ``side`` mm wide around ``centre`` (voxels), in voxels."""
    centre, half = np.asarray(centre, float), np.asarray([side / 2 / s for s in spacing])
    return np.concatenate([centre - half, centre + half])


def scan(boxes=(), scores=(), labels=None, dims=3):
    boxes = np.asarray(boxes, float).reshape(-1, 2 * dims)
    labels = np.zeros(len(boxes), int) if labels is None else np.asarray(labels)
    return {"boxes": boxes, "scores": np.asarray(scores, float), "labels": labels}


def truth(boxes=(), labels=None, irrelevant=None, dims=3):
    boxes = np.asarray(boxes, float).reshape(-1, 2 * dims)
    entry = {"boxes": boxes, "labels": np.zeros(len(boxes), int) if labels is None else np.asarray(labels)}
    if irrelevant is not None:
        entry["irrelevant_boxes"] = np.asarray(irrelevant, float).reshape(-1, 2 * dims)
    return entry


# -- IoU --------------------------------------------------------------------------------------------------
def test_box_iou_2d_hand_computed():
    a = np.array([[0, 0, 2, 2], [0, 0, 4, 4]])
    b = np.array([[1, 1, 3, 3], [2, 2, 4, 4], [0, 0, 2, 2], [1, 1, 3, 3.0]])
    # [0,0,2,2] vs [1,1,3,3]: 1 / (4 + 4 - 1); touching at a corner: 0; itself: 1; [1,1,3,3] inside [0,0,4,4]: 4/16
    expected = np.array([[1 / 7, 0, 1, 1 / 7], [4 / 16, 4 / 16, 4 / 16, 4 / 16]])
    np.testing.assert_allclose(box_iou(a, b), expected)
    assert box_iou(a, np.zeros((0, 4))).shape == (2, 0)


def test_box_iou_3d_hand_computed_and_torch_input():
    a = torch.tensor([[0, 0, 0, 2, 2, 2], [0, 0, 0, 4, 2, 1.0]])
    b = torch.tensor([[1, 1, 1, 3, 3, 3], [0, 0, 1, 2, 2, 3], [0, 0, 0, 2, 2, 1.0]])
    # cube vs shifted cube: 1 / 15; half-overlapping along axis 2: 4 / 12; anisotropic: [0,0,0,2,2,1] is half of
    # [0,0,0,4,2,1]: 4 / 8; [0,0,0,4,2,1] vs [1,1,1,3,3,3]: touching faces (axis 2): 0
    expected = np.array([[1 / 15, 1 / 3, 0.5], [0, 0, 0.5]])
    np.testing.assert_allclose(box_iou(a, b), expected)


def test_box_iou_agrees_with_monai():
    from monai.data.box_utils import box_iou as monai_box_iou

    rng = np.random.default_rng(0)
    for dims in (2, 3):
        lo = rng.uniform(0, 10, (7, dims))
        a = np.concatenate([lo, lo + rng.uniform(0.5, 6, (7, dims))], axis=1)
        lo = rng.uniform(0, 10, (5, dims))
        b = np.concatenate([lo, lo + rng.uniform(0.5, 6, (5, dims))], axis=1)
        np.testing.assert_allclose(box_iou(a, b), monai_box_iou(a, b), rtol=1e-6, atol=1e-7)


# -- FROC / CPM -------------------------------------------------------------------------------------------
def _luna_case():
    """Three scans, nodules as cubes of their diameter (unit spacing), candidates 2 voxels wide.

    A: nodule T1 at (10,10,10) d 6, nodule T2 at (30,30,30) d 4 (missed), irrelevant finding at (50,50,50) d 10;
       c1 (11,10,10) 0.9 hits T1 (distance 1 < 3); c2 (10,12,10) 0.6 also hits T1: double detection, ignored;
       c3 (50,52,50) 0.95 hits only the irrelevant finding: ignored; c4 (70,70,70) 0.8: FP;
       c5 (10,10,13) 0.5: distance 3 = radius, not strictly inside: FP.
    B: nodule T3 at (20,20,20) d 8; c6 (21,21,21) 0.7 hits it (distance sqrt 3); c7 (80,80,80) 0.3: FP.
    C: no nodule; c8 0.85: FP (the scan still counts in FPs per scan)."""
    small = 2.0
    preds = [
        scan([cube((11, 10, 10), small), cube((10, 12, 10), small), cube((50, 52, 50), small),
              cube((70, 70, 70), small), cube((10, 10, 13), small)], [0.9, 0.6, 0.95, 0.8, 0.5]),
        scan([cube((21, 21, 21), small), cube((80, 80, 80), small)], [0.7, 0.3]),
        scan([cube((40, 40, 40), small)], [0.85]),
    ]
    targets = [
        truth([cube((10, 10, 10), 6), cube((30, 30, 30), 4)], irrelevant=[cube((50, 50, 50), 10)]),
        truth([cube((20, 20, 20), 8)]),
        truth(),
    ]
    return preds, targets


def test_froc_counts_a_hand_made_3d_case():
    preds, targets = _luna_case()
    result = froc(preds, targets, hit=centre_distance_hit())
    assert (result.num_scans, result.num_targets, result.num_detected) == (3, 3, 2)
    assert result.num_false_positives == 4  # c4, c5, c7, c8
    assert result.num_ignored_irrelevant == 1 and result.num_ignored_duplicates == 1
    # entries by descending score: T1 0.9, FP 0.85, FP 0.8, T3 0.7, FP 0.5, FP 0.3; 3 nodules, 3 scans
    np.testing.assert_allclose(result.thresholds, [np.inf, 0.9, 0.85, 0.8, 0.7, 0.5, 0.3])
    np.testing.assert_allclose(result.fps_per_scan, np.array([0, 0, 1, 2, 2, 3, 4]) / 3)
    np.testing.assert_allclose(result.sensitivity, np.array([0, 1, 1, 1, 2, 2, 2]) / 3)
    # at 1/8, 1/4, 1/2 FPs per scan the curve is flat at 1/3; it reaches 2/3 at 2/3 FPs per scan and stays
    np.testing.assert_allclose(result.operating_sensitivities, [1 / 3] * 3 + [2 / 3] * 4)
    assert result.cpm == pytest.approx(11 / 21)
    assert cpm(preds, targets) == pytest.approx(11 / 21)


def test_froc_distance_uses_the_spacing_in_mm():
    # a 10 mm nodule in a scan with spacing (2.5, 1, 1) mm: a candidate 2 voxels off along axis 0 is 5 mm away
    # (on the radius: a miss), 1 voxel off is 2.5 mm (a hit); along axis 1, 4 voxels are 4 mm (a hit)
    spacing = (2.5, 1.0, 1.0)
    target = [truth([cube((20, 20, 20), 10, spacing)])]
    hit = centre_distance_hit(spacing)
    for offset, hits in (((2, 0, 0), False), ((1, 0, 0), True), ((0, 4, 0), True)):
        centre = np.add((20, 20, 20), offset)
        result = froc([scan([cube(centre, 1.0)], [0.9])], target, hit=hit)
        assert result.num_detected == int(hits) and result.num_false_positives == int(not hits)


def test_froc_matches_the_luna16_roc_formula_on_random_scans():
    """The official definition: an ROC over the entries (each nodule's best score, or a missed nodule dropped
    from the ROC; each FP), rescaled: fps = fpr * (#entries - #detected) / #scans, sens = tpr * #detected /
    #nodules, read with np.interp on a grid of FP rates."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    target_scores = np.where(rng.random(40) < 0.8, rng.random(40), -np.inf)
    fp_scores = rng.random(150) ** 2
    fps, sens, _ = froc_curve(target_scores, fp_scores, num_scans=25)

    detected = target_scores[np.isfinite(target_scores)]
    labels = np.r_[np.ones(len(detected)), np.zeros(len(fp_scores))]
    fpr, tpr, _ = roc_curve(labels, np.r_[detected, fp_scores])
    official_fps = fpr * (len(labels) - len(detected)) / 25
    official_sens = tpr * len(detected) / len(target_scores)
    grid = np.linspace(0.125, 8, 10001)
    np.testing.assert_allclose(np.interp(grid, fps, sens), np.interp(grid, official_fps, official_sens), atol=1e-12)


def test_cpm_of_a_perfect_detector_is_one():
    preds = [scan([cube((10, 10, 10), 2)], [0.9]), scan([cube((5, 5, 5), 2), cube((30, 5, 5), 2)], [0.4, 0.7]),
             scan()]
    targets = [truth([cube((10, 10, 10), 6)]), truth([cube((5, 5, 5), 6), cube((30, 5, 5), 6)]), truth()]
    result = froc(preds, targets)
    assert result.num_false_positives == 0
    np.testing.assert_allclose(result.operating_sensitivities, 1.0)
    assert result.cpm == 1.0


def _k_false_positives_per_scan(k, fp_score, tp_score=0.9, scans=2):
    preds, targets = [], []
    for _ in range(scans):
        boxes = [cube((10, 10, 10), 2)] + [cube((40 + 10 * i, 40, 40), 2) for i in range(k)]
        preds.append(scan(boxes, [tp_score] + [fp_score] * k))
        targets.append(truth([cube((10, 10, 10), 6)]))
    return preds, targets


def test_cpm_with_k_false_positives_per_scan_tied_with_the_hit():
    # every scan: its nodule and 2 FPs, all at 0.9: the curve goes straight from (0, 0) to (2, 1), so the
    # sensitivity at f FPs per scan is f / 2 below 2 (np.interp from the origin), then 1
    preds, targets = _k_false_positives_per_scan(k=2, fp_score=0.9)
    result = froc(preds, targets)
    expected = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 1, 1]
    np.testing.assert_allclose(result.operating_sensitivities, expected)
    assert result.cpm == pytest.approx(sum(expected) / 7)  # 0.5625


def test_cpm_with_k_false_positives_per_scan_above_the_hit_and_below_it():
    # the 2 FPs per scan outscore the nodules: (0, 0) -> (2, 0) -> (2, 1): sensitivity 0 below 2 FPs per scan
    preds, targets = _k_false_positives_per_scan(k=2, fp_score=0.95)
    result = froc(preds, targets)
    np.testing.assert_allclose(result.operating_sensitivities, [0, 0, 0, 0, 1, 1, 1])
    assert result.cpm == pytest.approx(3 / 7)
    # below the nodules: (0, 0) -> (0, 1) -> (2, 1): 1 everywhere
    assert froc(*_k_false_positives_per_scan(k=2, fp_score=0.5)).cpm == 1.0


def test_froc_2d_with_an_iou_hit_and_the_candidate_limit():
    target = [truth([[0, 0, 10, 10]], dims=2)]
    # IoU 0.5 hits at threshold 0.5, IoU 0.4 does not (an FP)
    assert froc([scan([[0, 0, 10, 5]], [0.9], dims=2)], target, hit=iou_hit(0.5)).num_detected == 1
    missed = froc([scan([[0, 0, 10, 4]], [0.9], dims=2)], target, hit=iou_hit(0.5))
    assert (missed.num_detected, missed.num_false_positives) == (0, 1)
    assert missed.cpm == 0.0
    # LUNA16 keeps the candidates strictly above the (limit + 1)-th score: ties at the cut all go
    np.testing.assert_array_equal(keep_most_suspicious(np.array([0.9, 0.5, 0.5]), 2), [True, False, False])
    np.testing.assert_array_equal(keep_most_suspicious(np.array([0.9, 0.5, 0.4]), 2), [True, True, False])


def test_sensitivity_interpolation_reads_the_top_of_a_vertical_jump():
    fps, sens = np.array([0.0, 0.0, 1.0, 1.0, 3.0]), np.array([0.0, 0.2, 0.4, 0.8, 0.9])
    np.testing.assert_allclose(sensitivity_at_fp_rates(fps, sens, (0.5, 1.0, 2.0, 8.0)), [0.3, 0.8, 0.85, 0.9])
    assert len(LUNA16_FP_RATES) == 7


# -- COCO mAP ---------------------------------------------------------------------------------------------
def _detections(boxes, labels, scores):
    return {"boxes": np.asarray(boxes, float), "labels": np.asarray(labels), "scores": np.asarray(scores, float)}


def test_monai_coco_metric_runs_without_torchvision():
    import importlib.util

    assert importlib.util.find_spec("torchvision") is None
    targets = [truth([[0, 0, 10, 10], [20, 20, 30, 35]], labels=[1, 3], dims=2), truth([[5, 5, 9, 9]], [1], dims=2)]
    preds = [_detections(t["boxes"], t["labels"], np.linspace(0.9, 0.5, len(t["labels"]))) for t in targets]
    result = coco_map(preds, targets)
    for key in ("map_50_95", "map_50", "map_75"):
        assert result[key] == pytest.approx(1.0)  # MONAI's precision is tp / (tp + fp + eps)
    assert result["ap_50_95_per_class"] == pytest.approx({1: 1.0, 3: 1.0})


def test_coco_map_perfect_3d_with_torch_tensors():
    boxes = torch.tensor([[0, 0, 0, 4, 4, 4], [10, 10, 10, 12, 13, 14.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1])}]
    preds = [{"boxes": boxes.clone(), "labels": torch.tensor([0, 1]), "scores": torch.tensor([0.8, 0.9])}]
    assert coco_map(preds, targets)["map_50_95"] == pytest.approx(1.0)


def test_coco_map_of_a_shifted_box_of_iou_two_thirds():
    # [2,0,12,10] vs [0,0,10,10]: intersection 80, union 120, IoU 2/3: a hit at 0.50, 0.55, 0.60, 0.65 and a
    # miss (an FP) at 0.70 .. 0.95, so AP@0.5 = 1, AP@0.75 = 0, AP@0.5:0.95 = 4 / 10
    targets = [truth([[0, 0, 10, 10]], [0], dims=2)]
    result = coco_map([_detections([[2, 0, 12, 10]], [0], [0.9])], targets)
    assert result["map_50"] == pytest.approx(1.0) and result["map_75"] == 0.0
    assert result["map_50_95"] == pytest.approx(0.4)


def test_coco_map_101_point_interpolation_with_half_the_boxes_lost_at_high_iou():
    # a perfect box (score 0.9) and a box of IoU 2/3 (score 0.8): IoU <= 0.65 AP = 1; IoU >= 0.70 recall stops at
    # 1/2 with precision 1, so the recall points 0, 0.01, .., 0.50 score 1 and the others 0: AP = 51 / 101
    targets = [truth([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0], dims=2)]
    preds = [_detections([[0, 0, 10, 10], [52, 50, 62, 60]], [0, 0], [0.9, 0.8])]
    result = coco_map(preds, targets)
    assert result["map_50"] == pytest.approx(1.0)
    assert result["map_75"] == pytest.approx(51 / 101)
    assert result["map_50_95"] == pytest.approx((4 * 1 + 6 * 51 / 101) / 10)


def test_coco_map_leaves_out_classes_without_ground_truth():
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch

    # classes 0, 1, 2 declared; class 2 has no ground truth but a prediction: COCO gives it no AP
    targets = [truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1], dims=2)]
    preds = [_detections([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0, 1, 2], [0.9, 0.8, 0.7])]
    result = coco_map(preds, targets, classes=[0, 1, 2])
    assert math.isnan(result["ap_50_95_per_class"][2]) and math.isnan(result["ap_50_per_class"][2])
    assert result["map_50_95"] == pytest.approx(1.0) and result["map_50"] == pytest.approx(1.0)
    # MONAI's own mean keeps the -1 placeholder: (1 + 1 - 1) / 3
    metric = COCOMetric(classes=["0", "1", "2"], iou_list=(0.5,), iou_range=(0.5, 0.95, 0.05), max_detection=(100,),
                        verbose=False)
    matches = matching_batch(box_iou, metric.iou_thresholds, [preds[0]["boxes"]], [preds[0]["labels"]],
                             [preds[0]["scores"]], [targets[0]["boxes"]], [targets[0]["labels"]])
    raw, _ = metric(matches)
    assert raw["2_mAP_IoU_0.50_0.95_0.05_MaxDet_100"] == -1.0
    assert raw["mAP_IoU_0.50_0.95_0.05_MaxDet_100"] == pytest.approx(1 / 3)
    # with no ground truth at all there is no mAP
    assert math.isnan(coco_map([preds[0]], [truth(dims=2)], classes=[0])["map_50"])


# -- seed 004: mean IoU per ground-truth box --------------------------------------------------------------
def test_mean_gt_iou_2d_with_a_missed_box():
    targets = [truth([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], dims=2), truth([[0, 0, 4, 4]], [1], dims=2),
               truth(dims=2)]
    preds = [
        # IoU 2/3 on box A; box B is covered by a wrong label (0) and by its label below the threshold (0)
        _detections([[2, 0, 12, 10], [20, 20, 30, 30], [20, 20, 30, 30]], [1, 1, 2], [0.9, 0.9, 0.3]),
        _detections([[0, 0, 4, 4], [0, 0, 2, 4]], [1, 1], [0.8, 0.95]),  # the best of 1 and 1/2
        _detections([[0, 0, 4, 4]], [1], [0.9]),  # no ground truth: not counted
    ]
    result = mean_gt_iou(preds, targets, score_threshold=0.5)
    assert result.mean == pytest.approx((2 / 3 + 0 + 1) / 3)
    np.testing.assert_allclose(result.per_image[:2], [1 / 3, 1.0])
    assert math.isnan(result.per_image[2])
    np.testing.assert_allclose(result.per_box[0], [2 / 3, 0.0])


def test_mean_gt_iou_3d():
    # [1,0,0,3,2,2] vs [0,0,0,2,2,2]: intersection 1*2*2 = 4, union 12: 1/3; the second box is missed
    targets = [truth([[0, 0, 0, 2, 2, 2], [10, 10, 10, 12, 12, 12]], [0, 0])]
    preds = [_detections([[1, 0, 0, 3, 2, 2]], [0], [0.6])]
    result = mean_gt_iou(preds, targets)
    assert result.mean == pytest.approx(1 / 6)
    np.testing.assert_allclose(result.per_box[0], [1 / 3, 0.0])


# -- under attack -----------------------------------------------------------------------------------------
def test_vanished_fabricated_mislabelled_on_a_hand_case():
    g1, g2, g3, g4 = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]
    clean_fp, fabricated, faint = [80, 80, 90, 90], [100, 100, 110, 110], [200, 200, 210, 210]
    targets = [truth([g1, g2, g3, g4], [1, 1, 2, 1], dims=2)]
    # clean: g1, g2, g3 found with their labels, g4 missed, one false positive
    clean = [_detections([g1, g2, g3, clean_fp], [1, 1, 2, 1], [0.9] * 4)]
    # attacked: g1 survives (shifted, IoU 2/3), g2 vanishes, g3 relabelled 1, g4 found (it was not found clean),
    # the clean FP stays (not fabricated), one fabricated box, one below the score threshold (not a detection)
    adversarial = [_detections([[2, 0, 12, 10], g3, g4, clean_fp, fabricated, faint], [1, 1, 1, 1, 2, 2],
                               [0.9, 0.9, 0.9, 0.9, 0.9, 0.1])]
    outcome = attack_detection_outcome(clean, adversarial, targets, score_threshold=0.5, iou_threshold=0.5)
    assert (outcome.detected_clean, outcome.vanished, outcome.mislabelled) == (3, 1, 1)
    assert (outcome.adversarial_detections, outcome.fabricated) == (5, 1)
    assert outcome.vanished_rate == pytest.approx(1 / 3) and outcome.mislabelled_rate == pytest.approx(1 / 3)
    assert outcome.fabricated_rate == pytest.approx(1 / 5) and outcome.fabricated_per_image == 1.0


def test_attack_rates_are_zero_without_an_attack_and_nan_without_detections():
    targets = [truth([[0, 0, 0, 4, 4, 4]], [0]), truth()]
    clean = [_detections([[0, 0, 0, 4, 4, 4], [9, 9, 9, 12, 12, 12]], [0, 0], [0.9, 0.8]),
             _detections(np.zeros((0, 6)), [], [])]
    outcome = attack_detection_outcome(clean, clean, targets)
    assert (outcome.vanished_rate, outcome.mislabelled_rate, outcome.fabricated_rate) == (0.0, 0.0, 0.0)
    nothing = [_detections(np.zeros((0, 6)), [], [])] * 2
    outcome = attack_detection_outcome(nothing, nothing, targets)
    assert math.isnan(outcome.vanished_rate) and math.isnan(outcome.fabricated_rate)
    # everything vanishes under attack
    assert attack_detection_outcome(clean, nothing, targets).vanished_rate == 1.0
