"""What :class:`~medrobust.tasks.detection.DetectionTask` needs to know about a detector's output: its loss terms,
its decoding, and which of its cells could become new detections.

Both formats share one layout, so the task's metrics, TRADES' divergence and the detector attacks read either the
same way: ``output["heatmap"]`` is the per-class logits over the detector's *cells*, ``(B, K, *cells)``, and every
regression map is channel-first over the same cells, ``(B, c, *cells)``; a detection's ``index`` is ``label *
cells + cell``.

* ``centernet`` (:class:`medrobust.models.centernet.CenterNet`): the cells are the output grid; terms heatmap / size
  / offset; peaks by max-pooling, no NMS.
* ``retinanet`` (:class:`medrobust.models.retinanet.RetinaNet`): the cells are the anchors of every pyramid level,
  ``(B, K, A)``; terms classification / box; candidates decoded from the deltas by MONAI's box coder, then
  per-class greedy NMS at IoU 0.5 (MONAI's rule, :func:`greedy_nms`).

A network declares its format by its ``output_format`` attribute (``centernet`` when it has none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from medrobust.losses.centernet import centernet_loss_terms
from medrobust.losses.retinanet import AnchorTargets, anchor_targets, box_coder, make_matcher, retinanet_loss_terms
from medrobust.models.centernet import decode_padded, encode_targets, peak_mask

PRE_NMS_CANDIDATES = 1000  # per image, the best-scoring anchors NMS looks at (torchvision's and MONAI's default)
FABRICATION_POOL = 128  # the best anchors among which TOG fabrication's candidates (NMS survivors) are sought
NMS_IOU = 0.5


class CenterNetFormat:
    """CenterNet's output ``{"heatmap", "size", "offset"}`` at output ``stride``."""

    name = "centernet"
    terms = ("heatmap", "size", "offset")
    # is_correct's per-term thresholds until a clean validation has measured the model's (as segmentation's 0.5):
    # placeholders that let an untrained model be evaluated, not calibrated values
    fallback_tau = {"heatmap": 1.0, "size": 1.0, "offset": 0.5}

    def __init__(self, stride: int, num_classes: int, size_weight: float, offset_weight: float) -> None:
        self.stride, self.num_classes = stride, num_classes
        self.weights = (1.0, size_weight, offset_weight)
        self.regression = {"size": size_weight, "offset": offset_weight}  # the maps TRADES compares at the peaks

    def loss_terms(self, output: dict, boxes: Tensor, labels: Tensor, keep: Tensor) -> dict[str, Tensor]:
        heatmap = output["heatmap"]
        dims = heatmap.ndim - 2
        if boxes.ndim != 3 or boxes.shape[0] != heatmap.shape[0] or boxes.shape[2] != 2 * dims:
            raise ValueError(f"batch['boxes'] must be (B, N, 2d) = ({heatmap.shape[0]}, N, {2 * dims}) for heatmaps "
                             f"{tuple(heatmap.shape)}, got {tuple(boxes.shape)}")
        targets = encode_targets(boxes, labels, keep, tuple(heatmap.shape[2:]), self.stride, self.num_classes)
        return centernet_loss_terms(output, targets)

    def decode(self, output: dict, threshold: float, max_detections: int) -> dict[str, Tensor]:
        return decode_padded(output, self.stride, threshold, max_detections)

    def candidate_mask(self, output: dict, max_detections: int) -> Tensor:
        """The heatmap's peaks ``(B, K, *cells)``: the only cells the decoder can turn into detections."""
        return peak_mask(output["heatmap"].detach())


class RetinaNetFormat:
    """RetinaNet's output ``{"heatmap": (B, K, A), "box": (B, 2d, A), "anchors": (B, 2d, A)}``; ``anchor_sides``:
    the net's anchor sides at its finest level (doubled per level), which tell the anchors' levels apart."""

    name = "retinanet"
    terms = ("classification", "box")
    fallback_tau = {"classification": 1.0, "box": 1.0}  # placeholders until a clean validation, as CenterNet's

    def __init__(self, anchor_sides: Sequence[float], num_classes: int, box_weight: float) -> None:
        self.anchor_sides, self.num_classes = tuple(float(side) for side in anchor_sides), num_classes
        self._last = None
        self.weights = (1.0, box_weight)
        self.regression = {"box": box_weight}
        self.matcher = make_matcher()

    def locations_per_level(self, anchors: Tensor) -> list[int]:
        """Anchor locations per pyramid level of one sample's anchors ``(2d, A)``: each anchor's side over its
        base side is ``2**level``."""
        per_location = len(self.anchor_sides)
        sides = anchors.new_tensor(self.anchor_sides).repeat(anchors.shape[1] // per_location)
        level = torch.log2((anchors[anchors.shape[0] // 2] - anchors[0]) / sides).round().long()
        return [int(count) // per_location for count in torch.bincount(level) if count]

    def loss_terms(self, output: dict, boxes: Tensor, labels: Tensor, keep: Tensor) -> dict[str, Tensor]:
        anchors = output["anchors"]
        if boxes.ndim != 3 or boxes.shape[0] != anchors.shape[0] or boxes.shape[2] != anchors.shape[1]:
            raise ValueError(f"batch['boxes'] must be (B, N, 2d) = ({anchors.shape[0]}, N, {anchors.shape[1]}) for "
                             f"the anchors {tuple(anchors.shape)}, got {tuple(boxes.shape)}")
        return retinanet_loss_terms(output, self.targets(boxes, labels, keep, anchors[0].detach()))

    def targets(self, boxes: Tensor, labels: Tensor, keep: Tensor, anchors: Tensor) -> AnchorTargets:
        """:func:`anchor_targets`, remembered for the last batch: an attack computes the loss of one batch at every
        step, and matching (MONAI's ATSS, per sample) cost a fifth of a 2-D PGD step. The batch is recognised by
        the values of its boxes, keep mask and labels (a few numbers per image), the anchors' shape and the mode."""
        # targets made in inference mode (a clean test forward) cannot be saved for an attack's backward
        last, shape = self._last, (tuple(anchors.shape), anchors.device, torch.is_inference_mode_enabled())
        if last is not None and last[0] == shape and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(last[1], (boxes, keep, labels))):
            return last[2]
        targets = anchor_targets(boxes, labels, keep, anchors, self.num_classes, self.matcher,
                                 self.locations_per_level(anchors), len(self.anchor_sides))
        self._last = (shape, (boxes.clone(), keep.clone(), labels.clone()), targets)
        return targets

    @torch.no_grad()
    def decode(self, output: dict, threshold: float, max_detections: int,
               pool: int = PRE_NMS_CANDIDATES) -> dict[str, Tensor]:
        """Padded detections as :func:`~medrobust.models.centernet.decode_padded`'s (best first, ``valid`` above
        ``threshold``): per image the best ``pool`` anchor scores above ``threshold``, their boxes decoded, then
        per-class NMS at IoU :data:`NMS_IOU` (:func:`greedy_nms`)."""
        heat = torch.sigmoid(output["heatmap"].float())
        batch, classes, count = heat.shape
        deltas, anchors = output["box"].float(), output["anchors"].float()
        coder = box_coder(deltas.shape[1] // 2)
        rows = min(max_detections, classes * count)
        found = {"boxes": heat.new_zeros(batch, rows, deltas.shape[1]), "scores": heat.new_zeros(batch, rows),
                 "labels": torch.zeros(batch, rows, dtype=torch.long, device=heat.device),
                 "index": torch.zeros(batch, rows, dtype=torch.long, device=heat.device)}
        for b in range(batch):
            scores, flat = heat[b].flatten().topk(min(pool, classes * count))
            scores, flat = scores[scores > threshold], flat[scores > threshold]
            label, anchor = flat // count, flat % count
            boxes = coder.decode_single(deltas[b].t()[anchor], anchors[b].t()[anchor]).float()
            kept = greedy_nms(boxes, scores, label, NMS_IOU, rows)
            n = len(kept)
            found["boxes"][b, :n], found["scores"][b, :n] = boxes[kept], scores[kept]
            found["labels"][b, :n], found["index"][b, :n] = label[kept], flat[kept]
        return {**found, "valid": found["scores"] > threshold}

    def candidate_mask(self, output: dict, max_detections: int) -> Tensor:
        """The NMS survivors among the best :data:`FABRICATION_POOL` anchors (``(B, K, A)``): an anchor overlapping a
        better one is suppressed, so raising it would fabricate nothing."""
        found = self.decode(output, 0.0, max_detections, pool=FABRICATION_POOL)
        count = torch.zeros(output["heatmap"].shape[0], output["heatmap"][0].numel(), dtype=torch.long,
                            device=output["heatmap"].device)
        # added, not written: the padding rows' index 0 must not overwrite a survivor at cell 0
        count.scatter_add_(1, found["index"], (found["scores"] > 0).long())
        return (count > 0).view_as(output["heatmap"])


def greedy_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float, limit: int) -> Tensor:
    """Indices of the boxes ``(n, 2d)`` kept by per-class greedy NMS, best first, at most ``limit``: MONAI's
    ``batched_nms`` (a box is dropped when its IoU with a kept box of its class exceeds ``iou``; ties in score keep
    the earlier box), with one vectorised IoU row per kept box and none of MONAI's per-call conversions (its loop
    took seconds per batch on 1,000 candidates, and TOG decodes at every step)."""
    order = torch.argsort(scores, descending=True, stable=True)
    boxes, labels = boxes[order].float(), labels[order]
    dims = boxes.shape[1] // 2
    volume = (boxes[:, dims:] - boxes[:, :dims]).clamp_min(0).prod(dim=1)
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    kept: list[int] = []
    index = 0
    while len(kept) < limit and index < len(order):
        kept.append(index)
        box = boxes[index]
        inter = (torch.minimum(boxes[:, dims:], box[dims:]) - torch.maximum(boxes[:, :dims], box[:dims]))
        inter = inter.clamp_min(0).prod(dim=1)
        overlap = inter / (volume + volume[index] - inter).clamp_min(torch.finfo(inter.dtype).tiny)
        suppressed |= (overlap > iou) & (labels == labels[index])
        suppressed[index] = True
        rest = (~suppressed[index:]).nonzero()
        index = index + int(rest[0]) if len(rest) else len(order)
    return order[torch.tensor(kept, dtype=torch.long, device=boxes.device)]


FORMATS = ("centernet", "retinanet")


def detection_format(net, num_classes: int, stride: int | None, size_weight: float, offset_weight: float,
                     box_weight: float) -> CenterNetFormat | RetinaNetFormat:
    """The format ``net`` declares (``output_format``; ``centernet`` when undeclared), built with the task's
    settings; a ``ValueError`` naming the setting that does not fit."""
    name = getattr(net, "output_format", "centernet")
    if name == "retinanet":
        sides = getattr(net, "anchor_sides", None)
        if not sides:
            raise ValueError(f"{type(net).__name__} declares output_format 'retinanet' but has no anchor_sides")
        return RetinaNetFormat(sides, num_classes, box_weight)
    if name != "centernet":
        raise ValueError(f"{type(net).__name__}.output_format must be one of {list(FORMATS)}, got {name!r}")
    stride = getattr(net, "stride", None) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"module.stride must be the network's output stride, an integer >= 1 (default: "
                         f"net.stride), got {stride!r}")
    return CenterNetFormat(stride, num_classes, size_weight, offset_weight)


def cells_of(heatmap: Tensor) -> int:
    """The number of cells per class of a ``(B, K, *cells)`` output."""
    return math.prod(heatmap.shape[2:])
