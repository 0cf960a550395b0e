"""Segmentation, 2-D and 3-D: per-voxel logits ``(B, K, *spatial)`` against integer masks ``(B, *spatial)``."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceLoss
from torch import Tensor

from medrobust.tasks.base import RobustTask, softmax_kl
from medrobust.tasks.segmentation_metrics import SegmentationTarget, mean_dice, segmentation_metrics

LOSSES = ("dice_ce", "ce", "dice")
SW_MODES = ("gaussian", "constant")
FALLBACK_TAU = 0.5  # is_correct's threshold until a clean validation has measured the model's mean Dice
_NOT_IN_KEYS = re.compile(r"[^A-Za-z0-9_\-]+")  # class names go into metric keys and file names


class SegmentationTask(RobustTask):
    """Per-voxel logits ``(B, K, *spatial)`` against integer masks ``batch["label"]`` ``(B, *spatial)`` (or
    ``(B, 1, *spatial)``), in 2-D or 3-D; ``batch["spacing"]`` ``(B, D)`` in mm, when given, puts HD95 in mm and
    the false-positive volume in mL.

    attack_loss: per-sample soft Dice loss (MONAI's ``DiceLoss``, softmax, mean over the evaluated classes) plus
    cross-entropy averaged over the voxels, in fp32 (``loss="dice_ce"``; ``"dice"`` or ``"ce"`` alone). MONAI's
    ``DiceCELoss`` has no per-sample reduction, hence the two parts.

    is_correct: mean Dice over the evaluated classes (the foreground ones unless ``include_background``) of the
    argmax prediction ``>= tau``. By default (``tau=None``, seed 004's rule) tau is the clean model's mean
    validation Dice, recomputed from the rank-reduced ``val/dice`` after each clean validation (sanity check
    excluded) and kept in the ``validation_tau`` buffer, hence in checkpoints; until a first validation it is
    ``FALLBACK_TAU`` (0.5). A float in (0, 1] fixes tau (a checkpoint's buffer does not override it).

    correct_margin: ``mean Dice - tau``, so ``>= 0`` exactly where ``is_correct`` (0 only at equality, as for
    regression). The hard Dice has no input gradient, so the margin carries the soft Dice's gradient (a
    straight-through estimate: value of the hard Dice, gradient of the soft one) for the minimum-norm attacks.

    Metrics (:mod:`medrobust.tasks.segmentation_metrics`): ``accuracy`` (the is-correct rate), ``dice``,
    ``dice_<class name>`` per evaluated class, ``hd95``, ``fp_volume`` and ``pred_change`` (``1 - Dice`` between
    the adversarial and the clean prediction: 0 on clean images, so not in the clean validation / test metrics).

    Sliding window: with ``roi_size``, evaluation forwards (module not training) of inputs larger than the roi in
    any spatial dimension run through MONAI's ``SlidingWindowInferer``; it is differentiable, so attacks take
    input gradients through it. Training forwards (and adversarial training's attacks) see training patches.

    Args:
        net: ``(B, C, *spatial) -> (B, num_classes, *spatial)``.
        num_classes: ``K``, background (label 0) included.
        loss: ``"dice_ce"``, ``"ce"`` or ``"dice"``.
        tau: fixed is-correct threshold on the mean Dice, or ``None`` (the clean mean validation Dice).
        class_names: one name per label value (``K``), used in ``dice_<name>`` with every run of characters
            other than letters, digits, ``_`` and ``-`` made ``_`` (Decathlon's ``"left atrium"`` ->
            ``dice_left_atrium``); default ``background``, ``class1``, ...
        include_background: evaluate (and average over) the background class too.
        roi_size: sliding-window patch size, one entry per spatial dimension; ``None``: plain forwards.
        sw_batch_size, sw_overlap, sw_mode: windows per forward, their overlap in [0, 1), and the blending
            (``"gaussian"``, nnU-Net's, or ``"constant"``).
    """

    outputs_logits = False  # per-voxel logits, not (B, K): classification losses (CE, DLR) of APGD do not apply
    shift_metric = "pred_change"
    attacked_metrics = ("dice",)  # Dice + CE drives Dice; HD95 and the false-positive volume only follow it
    curve_metrics = ("accuracy", "dice", "hd95", "pred_change")  # PNGs every epoch; robustness.csv has them all
    tau_metrics = ("dice",)  # seed 004: tau is the clean model's mean validation Dice

    def __init__(
        self,
        net,
        num_classes: int,
        loss: str = "dice_ce",
        tau: float | None = None,
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        sw_mode: str = "gaussian",
        **kwargs,
    ) -> None:
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"module.num_classes must be an integer >= 2 (background included), got {num_classes!r}")
        if loss not in LOSSES:
            raise ValueError(f"module.loss must be one of {list(LOSSES)}, got {loss!r}")
        if tau is not None and not (isinstance(tau, (int, float)) and 0 < tau <= 1):
            raise ValueError(f"module.tau must be a mean Dice in (0, 1] or null (the clean validation Dice), "
                             f"got {tau!r}")
        self.num_classes, self.loss_name, self.include_background = num_classes, loss, bool(include_background)
        self.fixed_tau = None if tau is None else float(tau)
        self.class_names = _check_class_names(class_names, num_classes)
        super().__init__(net, **kwargs)
        self.inferer = _sliding_window(roi_size, sw_batch_size, sw_overlap, sw_mode)
        self.roi_size = None if roi_size is None else tuple(int(r) for r in roi_size)
        self.dice_loss = DiceLoss(include_background=self.include_background, to_onehot_y=True, softmax=True,
                                  reduction="none")
        self.register_validation_tau()

    # -- tau ------------------------------------------------------------------------------------
    @property
    def tau(self) -> Tensor:
        """The is-correct threshold now, 0-d: the fixed ``tau``, else the last clean validation's mean Dice, else
        ``FALLBACK_TAU``."""
        if self.fixed_tau is not None:
            return torch.tensor(self.fixed_tau, device=self.validation_tau.device)
        fallback = torch.full_like(self.validation_tau, FALLBACK_TAU)
        return torch.where(torch.isnan(self.validation_tau), fallback, self.validation_tau)

    # -- the contract ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, K, *spatial)`` for images ``(B, C, *spatial)``; sliding windows when evaluating inputs of
        another size than ``roi_size`` (larger ones are tiled, smaller ones padded: a net that downsamples four
        times cannot take a 12-voxel slice)."""
        if self.inferer is None or self.training:
            return self.net(x)
        if len(self.roi_size) != x.ndim - 2:
            raise ValueError(f"module.roi_size={list(self.roi_size)} has {len(self.roi_size)} entries but the "
                             f"images {tuple(x.shape)} have {x.ndim - 2} spatial dimensions")
        if tuple(x.shape[2:]) == self.roi_size:
            return self.net(x)
        return self.inferer(x, self.net)

    def example_masks(self, output: Tensor, batch: dict, adversarial_output: Tensor) -> dict[str, Tensor]:
        return {"ground truth": self.labels(output, batch), "clean prediction": output.argmax(dim=1),
                "adversarial prediction": adversarial_output.argmax(dim=1)}

    def labels(self, output: Tensor, batch: dict) -> Tensor:
        """``batch[label_key]`` as ``(B, *spatial)`` int64, checked against the logits ``(B, K, *spatial)``."""
        label = batch[self.label_key]
        if label.ndim == output.ndim and label.shape[1] == 1:
            label = label[:, 0]
        if output.shape[1] != self.num_classes:
            raise ValueError(f"the network outputs {output.shape[1]} channels but module.num_classes="
                             f"{self.num_classes}: logits must be (B, K, *spatial), got {tuple(output.shape)}")
        if label.shape != output.shape[:1] + output.shape[2:]:
            raise ValueError(f"batch[{self.label_key!r}] must be (B, *spatial) or (B, 1, *spatial) matching the "
                             f"logits {tuple(output.shape)}; got {tuple(label.shape)}")
        if label.is_floating_point() or ((label < 0) | (label >= self.num_classes)).any():
            raise ValueError(f"batch[{self.label_key!r}] must hold integer labels in [0, {self.num_classes}) "
                             f"(module.num_classes); got dtype {label.dtype}, values in "
                             f"[{label.min().item()}, {label.max().item()}]")
        return label.long()

    def spacing(self, output: Tensor, batch: dict) -> Tensor | None:
        """``batch["spacing"]`` as ``(B, D)`` float mm, or ``None`` when the batch has none."""
        spacing = batch.get("spacing")
        if spacing is None:
            return None
        spacing = torch.as_tensor(spacing, dtype=torch.float64)
        if spacing.shape != (output.shape[0], output.ndim - 2):
            raise ValueError(f"batch['spacing'] must be (B, D) = ({output.shape[0]}, {output.ndim - 2}) mm per "
                             f"voxel, got {tuple(spacing.shape)}")
        return spacing

    def soft_dice(self, output: Tensor, batch: dict) -> Tensor:
        """Per-sample soft Dice ``(B,)`` of the softmax over the evaluated classes (MONAI's smoothing), fp32."""
        label = self.labels(output, batch)
        return 1.0 - self.dice_loss(output.float(), label[:, None]).flatten(1).mean(dim=1)

    def dice(self, output: Tensor, batch: dict) -> Tensor:
        """Per-sample hard mean Dice ``(B,)`` of the argmax prediction over the evaluated classes."""
        # max().indices: the same labels as argmax (ties included), 6x faster on CPU for (B, K, *spatial) logits
        return mean_dice(output.max(dim=1).indices, self.labels(output, batch), self.num_classes, self.include_background)

    def attack_loss(self, output: Tensor, batch: dict) -> Tensor:
        logits = output.float()
        loss = torch.zeros(len(logits), device=logits.device)
        if self.loss_name in ("dice_ce", "dice"):
            loss = loss + (1.0 - self.soft_dice(logits, batch))
        if self.loss_name in ("dice_ce", "ce"):
            ce = F.cross_entropy(logits, self.labels(logits, batch), reduction="none")
            loss = loss + ce.flatten(1).mean(dim=1)
        return loss

    def is_correct(self, output: Tensor, batch: dict) -> Tensor:
        return self.dice(output, batch) >= self.tau

    def correct_margin(self, output: Tensor, batch: dict) -> Tensor:
        soft = self.soft_dice(output, batch)
        return (self.dice(output, batch) - self.tau) + (soft - soft.detach())  # hard value, soft gradient

    def output_divergence(self, clean_output: Tensor, adversarial_output: Tensor, batch: dict) -> Tensor:
        """The per-voxel KL between the clean and the adversarial class distributions, averaged over the voxels
        (as the CE part of the loss is): one sample's value does not grow with its size."""
        return softmax_kl(clean_output, adversarial_output).flatten(1).mean(dim=1)

    def robust_metrics(self) -> dict:
        return segmentation_metrics(self.num_classes, self.class_names, self.include_background)

    def clean_metrics(self) -> dict:
        return {name: metric for name, metric in self.robust_metrics().items() if name != self.shift_metric}

    @property
    def bounded_metrics(self) -> tuple[str, ...]:  # rates and Dice live in [0, 1]
        return tuple(name for name in self.robust_metrics() if name in ("accuracy", "pred_change")
                     or name == "dice" or name.startswith("dice_"))

    def metric_inputs(self, output: Tensor, batch: dict, reference: Tensor | None = None
                      ) -> tuple[Tensor, SegmentationTarget]:
        """``preds`` ``(B, 2, *spatial)``: the argmax prediction and the reference's (``reference``: the clean
        logits when ``output`` is adversarial; else the prediction itself); ``target``: labels, spacing, tau."""
        pred = output.argmax(dim=1)
        reference_pred = pred if reference is None else reference.argmax(dim=1)
        target = SegmentationTarget(self.labels(output, batch), self.spacing(output, batch), self.tau)
        return torch.stack([pred, reference_pred], dim=1), target


def _check_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return ["background", *(f"class{index}" for index in range(1, num_classes))]
    names = [_NOT_IN_KEYS.sub("_", str(name)).strip("_") for name in class_names]
    if len(names) != num_classes or len(set(names)) != num_classes or not all(names):
        raise ValueError(f"module.class_names must be {num_classes} distinct names, one per label value "
                         f"(background first; module.num_classes={num_classes}), distinct also as metric keys "
                         f"{names}; got {list(class_names)}")
    return names


def _sliding_window(roi_size, sw_batch_size: int, sw_overlap: float, sw_mode: str) -> SlidingWindowInferer | None:
    if roi_size is None:
        return None
    if not (len(roi_size) in (2, 3) and all(isinstance(r, int) and r > 0 for r in roi_size)):
        raise ValueError(f"module.roi_size must be 2 or 3 positive integers (one per spatial dimension) or null, "
                         f"got {roi_size!r}")
    if not (isinstance(sw_batch_size, int) and sw_batch_size >= 1):
        raise ValueError(f"module.sw_batch_size must be an integer >= 1, got {sw_batch_size!r}")
    if not 0 <= sw_overlap < 1:
        raise ValueError(f"module.sw_overlap must be in [0, 1), got {sw_overlap!r}")
    if sw_mode not in SW_MODES:
        raise ValueError(f"module.sw_mode must be one of {list(SW_MODES)}, got {sw_mode!r}")
    return SlidingWindowInferer(list(roi_size), sw_batch_size=sw_batch_size, overlap=sw_overlap, mode=sw_mode)
