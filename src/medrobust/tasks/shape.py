"""Shape reconstruction (seed 002): an outline as ``K`` 2-D points plus its mask, from a 2-D patch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medrobust.reporting.points import PointSet
from medrobust.tasks.base import RobustTask
from medrobust.tasks.shape_metrics import ShapePreds, ShapeTarget, shape_metrics

_SMOOTH_PX2 = 1e-4  # inside the point error's square root: a finite gradient where a point sits on its target
_DICE_SMOOTH = 1.0  # soft Dice's smoothing, in pixels: an empty true mask gives a finite loss


class ShapeTask(RobustTask):
    """Outlines and masks: the network gives ``{"points": (B, K, 2), "mask": (B, 1, H, W)}``, points in pixel
    coordinates (row, col; pixel centres at integers) and mask logits; batches carry the true ``points``
    ``(B, K, 2)`` (the consensus outline from its top above the centroid, counter-clockwise on screen, even by arc
    length), ``mask`` ``(B, H, W)`` and ``spacing`` ``(B, 2)`` mm.

    attack_loss (the per-sample training loss): ``(BCE + soft Dice loss) / 2`` on the mask plus ``point_weight`` x
    the mean point error in pixels (the seed paper's two heads, trained together), in fp32. Attacks climb it, so
    they push the outline and the mask apart from the truth at once.

    is_correct: the mean point error (MRSE) ``<= radius_px``; ``correct_margin`` is ``radius_px - MRSE``, > 0
    exactly where correct, with the point error's gradient (minimum-norm attacks, margin training).

    output_divergence (TRADES): the mean squared point displacement (px^2) plus the per-pixel KL between the clean
    and the adversarial mask's Bernoulli distributions, averaged over the pixels.

    Metrics (:mod:`medrobust.tasks.shape_metrics`): ``accuracy`` (the is-correct rate), ``mrse`` (px),
    ``mrse_mm``, ``dice`` (of the mask head) and ``shape_shift`` (px; 0 on clean images, so not in the clean
    validation / test metrics).

    Args:
        net: ``(B, C, H, W) -> {"points": (B, K, 2), "mask": (B, 1, H, W)}``.
        num_points: ``K``.
        point_weight: weight of the mean point error (per pixel) against the mask's loss.
        radius_px: the MRSE, in pixels, up to which a reconstruction counts as correct.
    """

    outputs_logits = False  # points and mask logits, not class logits: CE / DLR losses do not apply
    label_key = "points"
    shift_metric = "shape_shift"
    attacked_metrics = ("mrse", "dice")  # the loss drives both heads
    curve_metrics = ("accuracy", "mrse", "dice", "shape_shift")
    bounded_metrics = ("accuracy", "dice")
    attack_objectives = {"points": "squared_point_error"}  # seed 002's in-distribution attack (eval=shape)

    def __init__(self, net, num_points: int, point_weight: float = 0.1, radius_px: float = 2.0, **kwargs) -> None:
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 3:
            raise ValueError(f"module.num_points must be an integer >= 3 (an outline), got {num_points!r}")
        for key, value in (("point_weight", point_weight), ("radius_px", radius_px)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"module.{key} must be a number > 0, got {value!r}")
        self.num_points, self.point_weight, self.radius_px = num_points, float(point_weight), float(radius_px)
        super().__init__(net, **kwargs)

    # -- wiring to the data ---------------------------------------------------------------------
    def bind_data(self, datamodule) -> None:
        super().bind_data(datamodule)
        count = getattr(datamodule, "num_points", None)
        if count is not None and count != self.num_points:
            raise ValueError(f"module.num_points={self.num_points} but the data's outlines have {count} points "
                             f"(data.num_points)")

    # -- outputs --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        output = self.net(x)
        expected = {"points": (len(x), self.num_points, 2), "mask": (len(x), 1, *x.shape[2:])}
        if not isinstance(output, dict) or any(tuple(getattr(output.get(key), "shape", ())) != shape
                                               for key, shape in expected.items()):
            got = ({key: tuple(value.shape) for key, value in output.items()} if isinstance(output, dict)
                   else type(output).__name__)
            raise ValueError(f"a shape network must output {expected} (points, mask logits) for images "
                             f"{tuple(x.shape)}; got {got}")
        return output

    def point_errors(self, output: dict, batch: dict) -> Tensor:
        """Distance ``(B, K)`` in pixels of every predicted point from its true point (smoothed at 0)."""
        true = self._true_points(batch, output["points"])
        return ((output["points"].float() - true).square().sum(dim=-1) + _SMOOTH_PX2).sqrt()

    def _true_points(self, batch: dict, points: Tensor) -> Tensor:
        true = batch["points"]
        if true.shape != points.shape:
            raise ValueError(f"batch['points'] must be (B, K, 2) = {tuple(points.shape)} pixel coordinates, got "
                             f"{tuple(true.shape)}")
        return true.float()

    def _true_mask(self, batch: dict, logits: Tensor) -> Tensor:
        mask = batch["mask"]
        mask = mask[:, 0] if mask.ndim == logits.ndim else mask
        if mask.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"batch['mask'] must be (B, H, W) = {tuple(logits.shape[:1] + logits.shape[2:])}, got "
                             f"{tuple(batch['mask'].shape)}")
        return mask.float()

    def mask_loss(self, output: dict, batch: dict) -> Tensor:
        """``(BCE + soft Dice loss) / 2`` per sample ``(B,)``."""
        logits = output["mask"].float()
        true = self._true_mask(batch, logits)
        logits = logits[:, 0]
        bce = F.binary_cross_entropy_with_logits(logits, true, reduction="none").flatten(1).mean(dim=1)
        prob = torch.sigmoid(logits).flatten(1)
        true = true.flatten(1)
        dice = (2 * (prob * true).sum(dim=1) + _DICE_SMOOTH) / (prob.sum(dim=1) + true.sum(dim=1) + _DICE_SMOOTH)
        return (bce + 1 - dice) / 2

    # -- the contract ---------------------------------------------------------------------------
    def attack_loss(self, output: dict, batch: dict) -> Tensor:
        return self.mask_loss(output, batch) + self.point_weight * self.point_errors(output, batch).mean(dim=1)

    def correct_margin(self, output: dict, batch: dict) -> Tensor:
        return self.radius_px - self.point_errors(output, batch).mean(dim=1)

    def is_correct(self, output: dict, batch: dict) -> Tensor:
        return self.correct_margin(output, batch) >= 0

    def output_divergence(self, clean_output: dict, adversarial_output: dict, batch: dict) -> Tensor:
        moved = (adversarial_output["points"].float() - clean_output["points"].float()).square().sum(dim=-1)
        clean, adversarial = clean_output["mask"].float().flatten(1), adversarial_output["mask"].float().flatten(1)
        p = torch.sigmoid(clean)
        kl = (p * (F.logsigmoid(clean) - F.logsigmoid(adversarial))
              + (1 - p) * (F.logsigmoid(-clean) - F.logsigmoid(-adversarial)))
        return moved.mean(dim=1) + kl.mean(dim=1)

    def squared_point_error(self, output: dict, batch: dict) -> Tensor:
        """``sum_k |p_k - t_k|^2`` per sample ``(B,)``, in px^2."""
        return (output["points"].float() - self._true_points(batch, output["points"])).square().sum(dim=(1, 2))

    def robust_metrics(self) -> dict:
        return shape_metrics()

    def clean_metrics(self) -> dict:
        return {name: metric for name, metric in self.robust_metrics().items() if name != self.shift_metric}

    def metric_inputs(self, output: dict, batch: dict, reference: dict | None = None
                      ) -> tuple[ShapePreds, ShapeTarget]:
        points = output["points"].float()
        reference_points = points if reference is None else reference["points"].float()
        spacing = batch.get("spacing")
        spacing = (torch.ones(len(points), 2, device=points.device) if spacing is None
                   else torch.as_tensor(spacing, dtype=torch.float32, device=points.device))
        target = ShapeTarget(self._true_points(batch, points), self._true_mask(batch, output["mask"]).bool(), spacing,
                             self.is_correct(output, batch))
        return ShapePreds(torch.stack([points, reference_points], dim=1), output["mask"][:, 0] > 0), target

    def example_masks(self, output: dict, batch: dict, adversarial_output: dict) -> dict[str, Tensor]:
        return {"ground truth": self._true_mask(batch, output["mask"]).long(),
                "clean prediction": (output["mask"][:, 0] > 0).long(),
                "adversarial prediction": (adversarial_output["mask"][:, 0] > 0).long(),
                "true outline": PointSet(batch["points"]),
                "clean outline": PointSet(output["points"].float()),
                "adversarial outline": PointSet(adversarial_output["points"].float())}
