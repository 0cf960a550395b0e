"""The detection task's ``correct="match"`` rule: every target found, no false positive, at the operating score.

A sample is correct when each of its target boxes is found by a detection of its label scoring ``>= score_threshold``
and no detection scoring above ``score_threshold`` is a false positive (it finds neither a target nor an irrelevant
finding: LUNA16's ignored annotations). *Finds*: IoU ``>= 0.5`` in 2-D (COCO's test), the centre strictly within the
box's radius in 3-D (LUNA16's). Boxes are compared once per call on the decoded detections; the scores keep their
gradient, so minimum-norm attacks can follow the margin.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from medrobust.tasks.detection_metrics import HitTest, centre_distance_hit, iou_hit, pairwise_hits

MATCH_IOU = 0.5


def match_hit(spatial_dims: int) -> HitTest:
    """IoU >= 0.5 for 2-D boxes; LUNA16's centre-in-radius test for 3-D ones (a 3-D IoU of 0.5 is a far stricter
    demand on a small nodule's box than the same IoU in 2-D)."""
    return iou_hit(MATCH_IOU) if spatial_dims == 2 else centre_distance_hit()


def match_margin(task: Any, output: dict, batch: dict) -> Tensor:
    """Per sample ``(B,)``, in score units: the smallest of ``best score finding t - score_threshold`` over the target
    boxes ``t`` (a target no detection finds: ``-score_threshold``) and ``score_threshold - score`` over the false
    positives; ``score_threshold`` when there is neither (nothing to find, nothing found). ``>= 0`` exactly where
    the match rule calls the sample correct; differentiable through the detections' scores."""
    found = task.detections(output)
    heat = torch.sigmoid(output["heatmap"].float()).flatten(1)
    scores = heat.gather(1, found["index"])  # the decoded scores, with their gradient
    threshold = task.score_threshold
    hit = match_hit(batch["boxes"].shape[-1] // 2)  # the boxes' dims: a RetinaNet's heatmap is (B, K, anchors)
    target, valid = task.target_mask(batch).cpu(), batch["box_valid"].bool().cpu()
    boxes, labels = batch["boxes"].detach().cpu().double().numpy(), batch["labels"].cpu().numpy()
    margins = []
    for b in range(len(scores)):
        keep = found["valid"][b].cpu().numpy()
        det_boxes = found["boxes"][b].detach().cpu().double().numpy()
        det_labels = found["labels"][b].cpu().numpy()
        t, irrelevant = target[b].numpy(), (valid[b] & ~target[b]).numpy()
        finds = pairwise_hits(hit, det_boxes, boxes[b][t]) & (det_labels[:, None] == labels[b][t][None, :])
        finds &= keep[:, None]
        on_irrelevant = pairwise_hits(hit, det_boxes, boxes[b][irrelevant]).any(axis=1)
        terms = [scores[b][torch.from_numpy(column).to(scores.device)].max() - threshold if column.any()
                 else scores.new_tensor(-threshold) for column in finds.T]
        false_positive = torch.from_numpy(keep & ~finds.any(axis=1) & ~on_irrelevant).to(scores.device)
        terms.extend(threshold - scores[b][false_positive])
        margins.append(torch.stack(terms).min() if terms else scores.new_tensor(threshold))
    return torch.stack(margins)
