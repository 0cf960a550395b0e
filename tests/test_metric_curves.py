"""Curves a metric draws beside its value (a detector's FROC behind its CPM): the CPM metric's curve on a hand-made
case with a known FROC, and its files, summary section and W&B table (an offline run, read back)."""

from __future__ import annotations

import csv

import pytest
import torch
from torchmetrics import MetricCollection

from medrobust.evaluation.metric_curves import collection_curves
from medrobust.evaluation.worst_case import CLEAN, WORST_LOSS
from medrobust.reporting.loggers import wandb_logger
from medrobust.reporting.metric_curves import log_metric_curves_to_wandb, metric_curves_markdown, write_metric_curves
from medrobust.tasks.detection_metrics import centre_distance_hit
from medrobust.tasks.detection_torchmetrics import CPM, DetectionPreds, DetectionTarget
from test_wandb_masks import _offline_run

TARGETS = [[10.0, 10.0, 20.0, 20.0], [40.0, 40.0, 50.0, 50.0]]  # one nodule per image


def _update(metric: CPM, detections: list[list[tuple[list[float], float]]]) -> None:
    """One batch of two images: ``detections[i]`` = (box, score) pairs of image ``i``."""
    width = max(len(d) for d in detections)
    boxes, scores, valid = torch.zeros(2, width, 4), torch.zeros(2, width), torch.zeros(2, width, dtype=torch.bool)
    for i, found in enumerate(detections):
        for k, (box, score) in enumerate(found):
            boxes[i, k], scores[i, k], valid[i, k] = torch.tensor(box), score, True
    labels = torch.zeros(2, width, dtype=torch.long)
    preds = DetectionPreds(boxes, labels, scores, valid, boxes, labels, scores, valid)
    truth = torch.tensor(TARGETS)[:, None]
    ones = torch.ones(2, 1, dtype=torch.bool)
    metric.update(preds, DetectionTarget(truth, torch.zeros(2, 1, dtype=torch.long), ones, ones, torch.zeros(2, 3),
                                         ones[:, 0]))


def _froc_case() -> CPM:
    """Image 0: its nodule at 0.9 and a false positive at 0.8; image 1: a false positive at 0.95 and its nodule at
    0.6. The FROC (2 scans): (0, 0), (0.5, 0) at 0.95, (0.5, 0.5) at 0.9, (1, 0.5) at 0.8, (1, 1) at 0.6."""
    metric = CPM(centre_distance_hit())
    _update(metric, [[(TARGETS[0], 0.9), ([60.0, 60.0, 64.0, 64.0], 0.8)],
                     [([0.0, 0.0, 4.0, 4.0], 0.95), (TARGETS[1], 0.6)]])
    return metric


# sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per scan, read off the curve above (np.interp takes the
# top of a vertical jump), and their mean
KNOWN_MARKS = [0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
KNOWN_CPM = sum(KNOWN_MARKS) / 7


def test_the_cpm_metric_draws_its_froc_with_the_known_points():
    metric = _froc_case()
    curve = collection_curves(MetricCollection({"cpm": metric}))["cpm"]
    assert curve.kind == "froc" and curve.log_x
    assert curve.x.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert curve.y.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert curve.thresholds.tolist()[1:] == pytest.approx([0.95, 0.9, 0.8, 0.6]) and curve.thresholds[0] == float("inf")
    assert [x for x, _ in curve.marks] == [0.125, 0.25, 0.5, 1, 2, 4, 8]
    assert [y for _, y in curve.marks] == pytest.approx(KNOWN_MARKS)
    assert curve.summary == pytest.approx(KNOWN_CPM) == pytest.approx(float(metric.compute()))


def test_no_target_no_curve():
    assert collection_curves(MetricCollection({"cpm": CPM(centre_distance_hit())})) == {}


def _curves():
    """The evaluation's layout: the clean curve under every attack's eps 0, an attacked one at eps 0.004."""
    clean = collection_curves(MetricCollection({"cpm": _froc_case()}))["cpm"]
    attacked = CPM(centre_distance_hit())  # the nodule of image 1 lost under attack
    _update(attacked, [[(TARGETS[0], 0.9), ([60.0, 60.0, 64.0, 64.0], 0.8)], [([0.0, 0.0, 4.0, 4.0], 0.95)]])
    attacked_curve = collection_curves(MetricCollection({"cpm": attacked}))["cpm"]
    return {("pgd", 0.0): {"cpm": (clean, CLEAN)}, ("pgd", 0.004): {"cpm": (attacked_curve, WORST_LOSS)},
            ("tog", 0.0): {"cpm": (clean, CLEAN)}}, attacked_curve


def test_files_and_summary_section(tmp_path):
    curves, attacked = _curves()
    assert [y for _, y in attacked.marks] == pytest.approx([0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    written = write_metric_curves(tmp_path, curves, split="test", epoch=3, eps_unit="model")
    names = sorted(path.name for path in written)
    assert names == ["test_froc.csv", "test_pgd_froc.png", "test_tog_froc.png"]
    assert all(path.stat().st_size > 1000 for path in written if path.suffix == ".png")
    with open(tmp_path / "curves" / "test_froc.csv") as handle:
        rows = list(csv.DictReader(handle))
    clean_rows = [r for r in rows if r["attack"] == "clean"]
    attacked_rows = [r for r in rows if r["attack"] == "pgd" and float(r["eps"]) == 0.004]
    assert len(clean_rows) == 5 and len(rows) == len(clean_rows) + len(attacked_rows)  # the clean curve once
    assert [(float(r["x"]), float(r["y"])) for r in clean_rows] == [(0, 0), (0.5, 0), (0.5, 0.5), (1, 0.5), (1, 1)]
    assert {r["points"] for r in attacked_rows} == {WORST_LOSS} and {r["epoch"] for r in rows} == {"3"}

    text = metric_curves_markdown(curves, split="test", epoch=3, eps_unit="model", success_metric="accuracy")
    assert "| clean | 0 | 0.000 | 0.000 | 0.500 | 1.000 | 1.000 | 1.000 | 1.000 | 0.643 |" in text
    assert "| pgd | 0.004 | 0.000 | 0.000 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.357 |" in text
    assert text.count("| clean |") == 1 and "worst" in text  # says which points the attacked curve comes from


def test_wandb_gets_the_points_table_and_a_chart_per_attack(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    curves, _ = _curves()
    logger = wandb_logger(save_dir=str(tmp_path), project="medrobust-tests", name="froc")
    log_metric_curves_to_wandb([logger], curves, split="test", epoch=3, eps_unit="model")
    logger.experiment.finish()
    history, _, _ = _offline_run(tmp_path)
    # every point once (the clean curve's 5, the attacked one's 4); the charts: pgd's two lines, tog's clean one
    assert history["robustness/test_froc_table/nrows"] == 5 + 4
    assert history["robustness/test_pgd_froc_table/nrows"] == 5 + 4
    assert history["robustness/test_tog_froc_table/nrows"] == 5
