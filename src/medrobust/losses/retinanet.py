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


def retinanet_loss_terms(output: dict[str, Tensor], boxes: Tensor, labels: Tensor, keep: Tensor,
                         matcher: ATSSMatcher, locations_per_level: list[int], anchors_per_location: int
                         ) -> dict[str, Tensor]:
    """The unweighted per-sample terms ``{"classification": (B,), "box": (B,)}`` of ``output`` against the padded
    boxes ``(B, N, 2d)`` / labels ``(B, N)`` kept by ``keep`` ``(B, N)`` (module docstring)."""
    logits, deltas, anchors = output["heatmap"].float(), output["box"].float(), output["anchors"].float()
    coder = box_coder(deltas.shape[1] // 2)
    classification, box = [], []
    for b in range(len(logits)):
        gt, gt_labels = boxes[b][keep[b]].float(), labels[b][keep[b]].long()
        anchors_b = anchors[b].t()
        matched = match_anchors(matcher, gt, anchors_b, locations_per_level, anchors_per_location)
        positive = matched >= 0
        target = torch.zeros_like(logits[b])  # (K, A)
        target[gt_labels[matched[positive]], positive.nonzero()[:, 0]] = 1.0
        count = positive.sum().clamp(min=1)
        classification.append(sigmoid_focal_loss(logits[b], target).sum() / count)
        if positive.any():
            encoded = coder.encode_single(gt[matched[positive]], anchors_b[positive]).float()
            box.append(F.smooth_l1_loss(deltas[b].t()[positive], encoded, beta=SMOOTH_L1_BETA))
        else:
            box.append(deltas[b].sum() * 0)  # keeps the graph (and the output's dtype) for a sample with no box
    return {"classification": torch.stack(classification), "box": torch.stack(box)}
