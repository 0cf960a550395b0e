"""CenterNet losses ("Objects as Points", Zhou et al. 2019), pure torch, per sample.

Every function returns one value per sample ``(B,)``, each normalised by that sample's own number of objects (at
least 1), so a sample's loss does not depend on the rest of the batch: the attacks maximise per-sample losses, and
a rule judges each term against a threshold. (The paper divides the batch's sums by the batch's object count
instead; the batch loss here is the mean of the per-sample losses.)

``output`` is :class:`medrobust.models.centernet.CenterNet`'s dict, ``targets`` that of
:func:`medrobust.models.centernet.encode_targets` (same output stride).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medrobust.models.centernet import gather_at

SIZE_WEIGHT = 0.1  # the paper's lambda_size (sizes in output cells)
OFFSET_WEIGHT = 1.0  # the paper's lambda_off


def heatmap_focal_loss(logits: Tensor, target: Tensor, num_objects: Tensor | None = None, alpha: float = 2.0,
                       beta: float = 4.0) -> Tensor:
    """Penalty-reduced pixel-wise focal loss ``(B,)`` of heatmap logits against Gaussian targets in ``[0, 1]``.

    ``-1 / max(n, 1) * sum_cells [(1 - p)^alpha log p  where y = 1;  (1 - y)^beta p^alpha log(1 - p)  elsewhere]``
    with ``p = sigmoid(logits)`` and ``n`` = ``num_objects`` ``(B,)`` (default: the cells where ``y == 1``).
    Logs come from ``logsigmoid`` (finite for any logit), where the paper clamps ``p`` to ``[1e-4, 1 - 1e-4]``.
    """
    logits, target = logits.float(), target.float()
    prob = torch.sigmoid(logits)
    is_peak = target.eq(1)
    positive = (1 - prob) ** alpha * F.logsigmoid(logits)
    negative = (1 - target) ** beta * prob**alpha * F.logsigmoid(-logits)
    total = torch.where(is_peak, positive, negative).flatten(1).sum(1)
    if num_objects is None:
        num_objects = is_peak.flatten(1).sum(1)
    return -total / num_objects.to(total.dtype).clamp(min=1)


def centre_l1_loss(prediction: Tensor, target: Tensor, index: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error ``(B,)`` of dense predictions ``(B, d, *spatial)`` read at the object centres ``index``
    ``(B, N)`` against ``target`` ``(B, N, d)``, over the objects in ``mask`` ``(B, N)`` and the ``d`` coordinates
    (0 for an image without objects)."""
    error = (gather_at(prediction.float(), index) - target.float()).abs() * mask[..., None]
    count = mask.sum(1).clamp(min=1) * target.shape[-1]
    return error.flatten(1).sum(1) / count


def centernet_loss_terms(output: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """The unweighted per-sample terms ``{"heatmap": (B,), "size": (B,), "offset": (B,)}``."""
    index, mask = targets["index"], targets["mask"]
    return {"heatmap": heatmap_focal_loss(output["heatmap"], targets["heatmap"], num_objects=mask.sum(1)),
            "size": centre_l1_loss(output["size"], targets["size"], index, mask),
            "offset": centre_l1_loss(output["offset"], targets["offset"], index, mask)}


def centernet_loss(output: dict[str, Tensor], targets: dict[str, Tensor], size_weight: float = SIZE_WEIGHT,
                   offset_weight: float = OFFSET_WEIGHT) -> Tensor:
    """Per-sample total ``(B,)``: ``heatmap + size_weight * size + offset_weight * offset``."""
    terms = centernet_loss_terms(output, targets)
    return terms["heatmap"] + size_weight * terms["size"] + offset_weight * terms["offset"]


class CenterNetLoss(nn.Module):
    """The weighted CenterNet loss: ``forward`` gives the batch mean, :meth:`per_sample` the ``(B,)`` vector,
    :meth:`terms` the unweighted per-sample terms (for a Hydra ``_target_``)."""

    def __init__(self, size_weight: float = SIZE_WEIGHT, offset_weight: float = OFFSET_WEIGHT) -> None:
        super().__init__()
        self.size_weight, self.offset_weight = size_weight, offset_weight

    def terms(self, output: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        return centernet_loss_terms(output, targets)

    def per_sample(self, output: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        return centernet_loss(output, targets, self.size_weight, self.offset_weight)

    def forward(self, output: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        return self.per_sample(output, targets).mean()
