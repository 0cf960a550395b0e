"""RetinaNet losses (Lin et al. 2017), per sample, on :class:`medrobust.models.retinanet.RetinaNet`'s output.

Anchors are matched to the target boxes by MONAI's ATSS matcher (Zhang et al. 2020: per box, the anchors among the
4 per level and shape closest to its centre whose IoU is at least the mean plus the standard deviation of theirs;
no centre-in-box demand, which would drop small nodules' anchors), the torch-only replacement of the torchvision
``Matcher`` that MONAI's ``RetinaNetDetector`` imports. Matching reads only boxes and anchors, never the output, so
the loss is a smooth function of the input for the attacks.

Terms, each normalised by the sample's own positives so a sample's loss does not depend on the rest of the batch:

* ``classification``: the sigmoid focal loss (alpha 0.25, gamma 2) summed over every anchor and class, divided by
  the number of positive anchors (at least 1): RetinaNet's own, with no sampling (MONAI's hard-negative sampler
  draws at random, which an attack's loss cannot);
* ``box``: smooth L1 (beta 1/9) of the box deltas against MONAI's ``BoxCoder`` encoding (weights 1) of the matched
  boxes, mean over the positive anchors and coordinates (0 without positives).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.apps.detection.utils.box_coder import BoxCoder
from torch import Tensor

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
SMOOTH_L1_BETA = 1 / 9
ATSS_CANDIDATES = 4


def box_coder(spatial_dims: int) -> BoxCoder:
    """MONAI's box coder with unit weights (the detector's default)."""
    return BoxCoder(weights=(1.0,) * 2 * spatial_dims)


def make_matcher() -> ATSSMatcher:
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))  # its constructor logs its settings at INFO, once per build
    try:
        return ATSSMatcher(num_candidates=ATSS_CANDIDATES, center_in_gt=False)
    finally:
        logger.setLevel(level)


def sigmoid_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Elementwise sigmoid focal loss (Lin et al.'s alpha-balanced form) of logits against 0 / 1 targets."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)
    return alpha_t * (1 - p_t) ** FOCAL_GAMMA * ce


@torch.no_grad()
def match_anchors(matcher: ATSSMatcher, boxes: Tensor, anchors: Tensor, locations_per_level: list[int],
                  anchors_per_location: int) -> Tensor:
    """Per anchor ``(A,)`` the index of its matched box among ``boxes`` ``(n, 2d)``, or -1 (background)."""
    if len(boxes) == 0:
        return torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device)
    _, matched = matcher(boxes.float(), anchors.float(), locations_per_level, anchors_per_location)
    return matched.long()


class AnchorTargets(NamedTuple):
    """Per sample, what the loss compares the output with: ``classes`` ``(B, K, A)`` 0 / 1 per anchor and class,
    ``positive`` ``(B, A)`` the matched anchors, ``deltas`` ``(B, 2d, A)`` the matched boxes' encoding (0
    elsewhere)."""

    classes: Tensor
    positive: Tensor
    deltas: Tensor


@torch.no_grad()
def anchor_targets(boxes: Tensor, labels: Tensor, keep: Tensor, anchors: Tensor, num_classes: int,
                   matcher: ATSSMatcher, locations_per_level: list[int], anchors_per_location: int) -> AnchorTargets:
    """:class:`AnchorTargets` of the padded boxes ``(B, N, 2d)`` / labels ``(B, N)`` kept by ``keep`` ``(B, N)``,
    on the anchors ``(2d, A)`` (the same for every sample of a batch)."""
    dims, count = anchors.shape[0] // 2, anchors.shape[1]
    coder, anchors = box_coder(dims), anchors.float().t()
    batch = len(boxes)
    classes = torch.zeros(batch, num_classes, count, device=anchors.device)
    positive = torch.zeros(batch, count, dtype=torch.bool, device=anchors.device)
    deltas = torch.zeros(batch, 2 * dims, count, device=anchors.device)
    for b in range(batch):
        gt, gt_labels = boxes[b][keep[b]].float(), labels[b][keep[b]].long()
        matched = match_anchors(matcher, gt, anchors, locations_per_level, anchors_per_location)
        positive[b] = matched >= 0
        cells = positive[b].nonzero()[:, 0]
        classes[b, gt_labels[matched[cells]], cells] = 1.0
        if len(cells):
            deltas[b][:, cells] = coder.encode_single(gt[matched[cells]], anchors[cells]).float().t()
    return AnchorTargets(classes, positive, deltas)


def retinanet_loss_terms(output: dict[str, Tensor], targets: AnchorTargets) -> dict[str, Tensor]:
    """The unweighted per-sample terms ``{"classification": (B,), "box": (B,)}`` of ``output`` against
    :func:`anchor_targets` (module docstring)."""
    logits, deltas = output["heatmap"].float(), output["box"].float()
    positives = targets.positive.sum(dim=1)
    classification = sigmoid_focal_loss(logits, targets.classes).flatten(1).sum(dim=1) / positives.clamp(min=1)
    error = F.smooth_l1_loss(deltas, targets.deltas, beta=SMOOTH_L1_BETA, reduction="none")  # (B, 2d, A)
    box = (error * targets.positive[:, None]).flatten(1).sum(dim=1) / (positives * deltas.shape[1]).clamp(min=1)
    return {"classification": classification, "box": box}
