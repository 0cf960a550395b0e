"""Object detection with a CenterNet or a RetinaNet (2-D or 3-D): LUNA16-style nodule detection, judged by seed
004's rule.

The network is :class:`medrobust.models.centernet.CenterNet` (or any module with its output dict ``{"heatmap":
(B, K, *out), "size": (B, d, *out), "offset": (B, d, *out)}`` and a ``stride``) or
:class:`medrobust.models.retinanet.RetinaNet`, told apart by the net's ``output_format``
(:mod:`medrobust.tasks.detection_formats`: their losses and decoding); the batch is
:class:`LunaDataModule`'s: ``boxes`` ``(B, N, 2d)`` StandardMode pixels, ``labels`` ``(B, N)`` (padding -1),
``box_valid`` ``(B, N)``, ``box_target`` ``(B, N)`` (False: an irrelevant finding, or padding), ``spacing``.

The metric objects are in :mod:`medrobust.tasks.detection_torchmetrics`; the numbers come from
:mod:`medrobust.tasks.detection_metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from medrobust.losses.centernet import OFFSET_WEIGHT, SIZE_WEIGHT
from medrobust.models.centernet import gather_at
from medrobust.tasks.base import RobustTask
from medrobust.tasks.detection_formats import CenterNetFormat, cells_of, detection_format
from medrobust.tasks.detection_match import match_margin
from medrobust.tasks.detection_metrics import centre_distance_hit, iou_hit
from medrobust.tasks.detection_torchmetrics import CPM, CorrectRate, DetectionPreds, DetectionTarget
from medrobust.tasks.detection_torchmetrics import FabricatedPerImage, MeanAP, MeanGTIoU, MislabelledRate
from medrobust.tasks.detection_torchmetrics import TermThreshold, VanishedRate

TERMS = CenterNetFormat.terms  # a CenterNet's; a RetinaNet's are classification / box (task.terms)
TAU_RULES = ("mean", "robust")
CORRECT_RULES = ("loss", "match")
FROC_HITS = ("centre", "iou")
FALLBACK_TAU = CenterNetFormat.fallback_tau
_TAU_FLOOR = 1e-6  # the margin divides by tau: a term whose tau is 0 (no objects in validation) stays finite


class DetectionTask(RobustTask):
    """CenterNet or RetinaNet detection, 2-D or 3-D, against the batch's padded boxes.

    attack_loss (the per-sample training loss): a RetinaNet's ``classification + box_weight * box``
    (:mod:`medrobust.losses.retinanet`); a CenterNet's ``heatmap + size_weight * size + offset_weight *
    offset`` (:mod:`medrobust.losses.centernet`, weights 0.1 and 1 by default, each term normalised by the sample's
    own object count), targets encoded (:func:`encode_targets`) from the valid *target* boxes only. Irrelevant
    findings (``box_target`` False: LUNA16's excluded annotations) are not trained as positives: their cells are
    plain background for the focal loss (a detection there is neither a hit nor a false positive in the FROC, which
    ignores it, so nothing is lost there; mAP drops such detections too, see :class:`MeanAP`), and they have no
    size / offset rows. Training them as positives would teach the model findings the evaluation never rewards.

    is_correct (seed 004, Ma et al. 2024): a sample is correct when *each* loss term (:attr:`terms`: a CenterNet's
    heatmap / size / offset, a RetinaNet's classification / box) is at or below its threshold ``tau[term]``. By
    default (``tau=None``) the thresholds are the clean model's per-sample validation terms' mean
    (``tau_rule="mean"``, as segmentation's tau is the mean validation Dice) or Huber robust mean plus 3 robust
    scales (``"robust"``, as landmarks'), logged as ``val/tau_<term>`` (rank-reduced: the per-sample terms are
    gathered) and copied after each clean validation (sanity check excluded; :attr:`tau_metrics`) into the
    ``validation_tau`` buffer (one per term), hence into checkpoints (``state_dict``). Until a first validation the
    buffer is NaN and the format's ``fallback_tau`` (placeholders) judges. A mapping ``tau`` fixes the thresholds
    (a checkpoint's buffer does not override it).

    correct_margin: ``min over terms of (tau_t - term_t) / max(tau_t, 1e-6)``: each term's slack relative to its
    threshold (the terms have different units), ``>= 0`` exactly where is_correct (0 only at equality), and
    differentiable (every term is).

    ``correct="match"`` instead: a sample is correct when every target box is found by a detection of its label
    scoring ``>= score_threshold`` (the FROC's hit test: IoU ``>= froc_iou``, or the centre within the radius) and
    no detection above ``score_threshold`` is a false positive (one that finds neither a target nor an irrelevant
    finding); its margin is :func:`medrobust.tasks.detection_match.match_margin`, in score units.

    Metrics (accumulated per image across batches, computed at epoch end; states are DDP ``cat`` gathers):
    ``accuracy`` (is-correct rate), ``mean_iou`` (seed 004: each target box's best IoU with a detection of its
    label scoring ``>= score_threshold``, 0 when missed, mean over the boxes), ``cpm`` (LUNA16's FROC / CPM over
    the images as scans, irrelevant findings ignored; ``froc_hit="centre"``: LUNA16's centre-in-radius test in
    voxel units, which equals the mm test for isotropic in-plane / cube spacing; ``"iou"``: IoU ``>= froc_iou``,
    0.3), ``map_50`` and ``map_50_95`` (COCO mAP at IoU 0.5 and averaged over 0.5:0.95); under attack only,
    ``vanished_rate`` (the shift metric: of the target boxes detected clean, the share no adversarial detection
    finds any more), ``fabricated_per_image`` and, with several classes, ``mislabelled_rate``; on the
    clean loops only, ``tau_<term>``. Detections are decoded (the format's decoder) at ``candidate_threshold``
    (0.05, at most ``max_detections`` per image) for the FROC and mAP, which sweep the score; ``mean_iou`` and the
    attack outcomes read them at ``score_threshold`` (0.5).

    output_divergence (TRADES, MART): per sample, the binary KL between the clean and the adversarial sigmoid
    heatmaps summed over the cells and classes and divided by the sample's target count (at least 1; the focal
    loss's normalisation), plus ``size_weight`` x and ``offset_weight`` x the mean squared change of the size and
    offset maps (a RetinaNet: ``box_weight`` x that of the box deltas) at the clean output's peaks (the decoder's
    detections above ``candidate_threshold``, at most ``max_detections``; none: 0). 0 exactly where the outputs agree.

    Args:
        net: a CenterNet-like module (``stride`` attribute unless ``stride`` is given), or a RetinaNet.
        num_classes: heatmap channels (LUNA: 1, nodule).
        correct: ``"loss"`` (seed 004's per-term rule) or ``"match"``.
        tau: ``{term: ..}`` fixed thresholds for each of :attr:`terms`, or ``None`` (clean validation).
        tau_rule: ``"mean"`` or ``"robust"``, the statistic of the validation terms that gives tau.
        size_weight, offset_weight: a CenterNet's loss weights (the paper's 0.1 and 1).
        box_weight: a RetinaNet's box-loss weight (1, MONAI's).
        score_threshold: the operating point of ``mean_iou`` and the attack outcomes.
        candidate_threshold, max_detections: the decoding of candidates for the metrics.
        froc_hit, froc_iou: the FROC's hit test.
        stride: a CenterNet's output stride; default ``net.stride``.
    """

    outputs_logits = False  # a dict of heatmap and box maps, not class logits: CE / DLR losses do not apply
    label_key = "boxes"
    shift_metric = "vanished_rate"
    attacked_metrics = ("mean_iou",)  # the loss drives the heatmap peaks and boxes; CPM and mAP follow them
    curve_metrics = ("accuracy", "mean_iou", "cpm", "map_50", "vanished_rate")
    bounded_metrics = ("accuracy", "mean_iou", "cpm", "map_50", "map_50_95", "vanished_rate", "mislabelled_rate")

    def __init__(self, net, num_classes: int = 1, correct: str = "loss", tau: Mapping[str, float] | None = None,
                 tau_rule: str = "mean",
                 size_weight: float = SIZE_WEIGHT, offset_weight: float = OFFSET_WEIGHT, score_threshold: float = 0.5,
                 candidate_threshold: float = 0.05, max_detections: int = 100, froc_hit: str = "centre",
                 froc_iou: float = 0.3, stride: int | None = None, box_weight: float = 1.0, **kwargs) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"module.num_classes must be an integer >= 1, got {num_classes!r}")
        if correct not in CORRECT_RULES:
            raise ValueError(f"module.correct must be one of {list(CORRECT_RULES)}, got {correct!r}")
        if tau_rule not in TAU_RULES:
            raise ValueError(f"module.tau_rule must be one of {list(TAU_RULES)}, got {tau_rule!r}")
        if froc_hit not in FROC_HITS:
            raise ValueError(f"module.froc_hit must be one of {list(FROC_HITS)}, got {froc_hit!r}")
        for key, value in (("size_weight", size_weight), ("offset_weight", offset_weight), ("box_weight", box_weight)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"module.{key} must be a number >= 0, got {value!r}")
        for key, value in (("score_threshold", score_threshold), ("candidate_threshold", candidate_threshold),
                           ("froc_iou", froc_iou)):
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"module.{key} must be a number in [0, 1), got {value!r}")
        if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
            raise ValueError(f"module.max_detections must be an integer >= 1, got {max_detections!r}")
        self.format = detection_format(net, num_classes, stride, float(size_weight), float(offset_weight),
                                       float(box_weight))
        self.terms = self.format.terms
        self.tau_metrics = tuple(f"tau_{term}" for term in self.terms)
        if tau is not None:
            if not isinstance(tau, Mapping) or set(tau) != set(self.terms) or not all(
                    isinstance(tau[t], (int, float)) and tau[t] >= 0 for t in self.terms):
                raise ValueError(f"module.tau must map each of {list(self.terms)} ({self.format.name}'s loss terms) to "
                                 f"a loss value >= 0, or be null (the clean validation's), got {tau!r}")
        self.stride = getattr(self.format, "stride", None)
        self.num_classes, self.correct_rule, self.tau_rule = num_classes, correct, tau_rule
        self.fixed_tau = None if tau is None else torch.tensor([float(tau[t]) for t in self.terms])
        self.score_threshold, self.candidate_threshold = float(score_threshold), float(candidate_threshold)
        self.max_detections, self.froc_hit, self.froc_iou = max_detections, froc_hit, float(froc_iou)
        super().__init__(net, **kwargs)
        self.register_validation_tau()

    # -- tau ------------------------------------------------------------------------------------
    @property
    def tau(self) -> Tensor:
        """The per-term thresholds now, in :attr:`terms` order: the fixed ``tau``, else the last clean validation's,
        else the format's ``fallback_tau``."""
        device = self.validation_tau.device
        if self.fixed_tau is not None:
            return self.fixed_tau.to(device)
        if torch.isnan(self.validation_tau).any():
            return torch.tensor([self.format.fallback_tau[t] for t in self.terms], device=device)
        return self.validation_tau

    # -- wiring to the data ---------------------------------------------------------------------
    def bind_data(self, datamodule) -> None:
        super().bind_data(datamodule)
        count = getattr(datamodule, "num_classes", None)
        if count is not None and count != self.num_classes:
            raise ValueError(f"module.num_classes={self.num_classes} but the data have {count} classes "
                             f"({getattr(datamodule, 'class_names', None)})")
        names = getattr(datamodule, "class_names", None)
        if names is not None:  # the example masks' values: 0 background, label + 1 a box of that label
            self.class_names = ["background", *names]

    # -- outputs --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        output = self.net(x)
        keys = ("heatmap", *self.format.regression) + (("anchors",) if self.format.name == "retinanet" else ())
        if not isinstance(output, dict) or any(key not in output for key in keys):
            raise ValueError(f"a {self.format.name} detection network must output a dict with the maps {list(keys)}, "
                             f"got {type(output).__name__}"
                             + (f" with {sorted(output)}" if isinstance(output, dict) else ""))
        return output

    @staticmethod
    def target_mask(batch: dict) -> Tensor:
        """``(B, N)`` bool: the valid boxes that are targets (``box_target``; every valid box without it)."""
        valid = batch["box_valid"].bool()
        target = batch.get("box_target")
        return valid if target is None else valid & target.to(valid.device).bool()

    def loss_terms(self, output: dict, batch: dict) -> Tensor:
        """The unweighted per-sample terms ``(B, T)`` in :attr:`terms` order, fp32, against the batch's valid target
        boxes."""
        device = output["heatmap"].device
        terms = self.format.loss_terms(output, batch["boxes"].to(device), batch["labels"].to(device),
                                       self.target_mask(batch).to(device))
        return torch.stack([terms[t] for t in self.terms], dim=1)

    # -- the contract ---------------------------------------------------------------------------
    def attack_loss(self, output: dict, batch: dict) -> Tensor:
        terms = self.loss_terms(output, batch)
        return terms @ terms.new_tensor(self.format.weights)

    def correct_margin(self, output: dict, batch: dict, terms: Tensor | None = None) -> Tensor:
        """``min_t (tau_t - term_t) / max(tau_t, 1e-6)`` ``(B,)`` (``terms``: :meth:`loss_terms`, if computed); with
        ``correct="match"``, :func:`match_margin`."""
        if self.correct_rule == "match":
            return match_margin(self, output, batch)
        terms = self.loss_terms(output, batch) if terms is None else terms
        tau = self.tau.to(terms.device)
        return ((tau - terms) / tau.clamp(min=_TAU_FLOOR)).amin(dim=1)

    def is_correct(self, output: dict, batch: dict) -> Tensor:
        return self.correct_margin(output, batch) >= 0

    def peak_index(self, output: dict) -> tuple[Tensor, Tensor]:
        """The decoder's detections of ``output`` as flat cell indices ``(B, M)`` and their mask ``(B, M)`` (score
        above ``candidate_threshold``), in the decoder's order, no gradient."""
        found = self.detections(output)
        return found["index"] % cells_of(output["heatmap"]), found["valid"]

    def candidate_mask(self, output: dict) -> Tensor:
        """``(B, K, *cells)`` bool: the cells the decoder could turn into detections (a CenterNet's peaks, a
        RetinaNet's NMS survivors), where TOG fabrication aims."""
        return self.format.candidate_mask(output, self.max_detections)

    def output_divergence(self, clean_output: dict, adversarial_output: dict, batch: dict) -> Tensor:
        clean, adversarial = clean_output["heatmap"].float(), adversarial_output["heatmap"].float()
        p = torch.sigmoid(clean)
        kl = (p * (F.logsigmoid(clean) - F.logsigmoid(adversarial))
              + (1 - p) * (F.logsigmoid(-clean) - F.logsigmoid(-adversarial)))
        objects = self.target_mask(batch).to(kl.device).sum(dim=1).clamp(min=1)
        divergence = kl.flatten(1).sum(dim=1) / objects
        index, peaks = self.peak_index(clean_output)
        count = peaks.sum(dim=1).clamp(min=1)
        for key, weight in self.format.regression.items():
            change = gather_at(adversarial_output[key].float() - clean_output[key].float(), index)  # (B, M, d)
            divergence = divergence + weight * (change.square().mean(dim=2) * peaks).sum(dim=1) / count
        return divergence

    # -- metrics --------------------------------------------------------------------------------
    def hit_test(self):
        """The FROC's (and the match rule's) test of a detection finding a box."""
        return centre_distance_hit() if self.froc_hit == "centre" else iou_hit(self.froc_iou)

    def robust_metrics(self) -> dict:
        hit = self.hit_test()
        metrics = {"accuracy": CorrectRate(),
                   "mean_iou": MeanGTIoU(self.score_threshold),
                   "cpm": CPM(hit),
                   "map_50": MeanAP(self.num_classes, hit),
                   "map_50_95": MeanAP(self.num_classes, hit, key="map_50_95"),
                   "vanished_rate": VanishedRate(self.score_threshold),
                   "fabricated_per_image": FabricatedPerImage(self.score_threshold)}
        if self.num_classes > 1:  # one class: no object can take another's label
            metrics["mislabelled_rate"] = MislabelledRate(self.score_threshold)
        return metrics

    def clean_metrics(self) -> dict:
        attack_only = ("vanished_rate", "fabricated_per_image", "mislabelled_rate")  # 0 on clean images
        metrics = {name: metric for name, metric in self.robust_metrics().items() if name not in attack_only}
        return {**metrics,
                **{f"tau_{term}": TermThreshold(index, self.tau_rule) for index, term in enumerate(self.terms)}}

    def detections(self, output: dict) -> dict[str, Tensor]:
        """The format's decoding at ``candidate_threshold``: boxes, labels, scores, valid, index, padded."""
        return self.format.decode(output, self.candidate_threshold, self.max_detections)

    def metric_inputs(self, output: dict, batch: dict, reference: dict | None = None
                      ) -> tuple[DetectionPreds, DetectionTarget]:
        """``preds``: the decoded detections of ``output`` and of ``reference`` (the clean output when ``output`` is
        adversarial; else ``output`` itself); ``target``: the boxes, their masks, and the per-sample terms and
        verdict."""
        found = self.detections(output)
        ref = found if reference is None else self.detections(reference)
        preds = DetectionPreds(found["boxes"], found["labels"], found["scores"], found["valid"],
                               ref["boxes"], ref["labels"], ref["scores"], ref["valid"])
        terms = self.loss_terms(output, batch).detach()
        device = found["boxes"].device
        target = DetectionTarget(batch["boxes"].to(device).float(), batch["labels"].to(device),
                                 batch["box_valid"].to(device).bool(), self.target_mask(batch).to(device), terms,
                                 self.correct_margin(output, batch, terms) >= 0)
        return preds, target

    def example_masks(self, output: dict, batch: dict, adversarial_output: dict) -> dict[str, Tensor]:
        """Box outlines ``(B, *spatial)`` of the target boxes and of the clean and adversarial detections at
        ``score_threshold``, valued ``label + 1`` (:func:`box_outlines`; ``class_names`` names the values)."""
        shape = tuple(batch["image"].shape[2:])
        clean, adversarial = self.detections(output), self.detections(adversarial_output)
        truth = box_outlines(batch["boxes"], batch["labels"], self.target_mask(batch), shape)
        return {"ground truth": truth,
                "clean prediction": box_outlines(clean["boxes"], clean["labels"],
                                                 clean["scores"] >= self.score_threshold, shape),
                "adversarial prediction": box_outlines(adversarial["boxes"], adversarial["labels"],
                                                       adversarial["scores"] >= self.score_threshold, shape)}


def _inside(boxes: Tensor, shape: tuple[int, ...], shrink: int = 0) -> Tensor:
    """``(B, N, *shape)`` bool: the pixels whose centre lies in each StandardMode box ``(B, N, 2d)``, its in-plane
    (last two) axes shrunk by ``shrink`` pixels on each side."""
    dims = len(shape)
    inside = torch.ones(boxes.shape[:2] + (1,) * dims, dtype=torch.bool, device=boxes.device)
    for axis, length in enumerate(shape):
        view = [1] * dims
        view[axis] = length
        centre = (torch.arange(length, device=boxes.device, dtype=torch.float32) + 0.5).view(view)
        cut = shrink if axis >= dims - 2 else 0
        lo = boxes[..., axis].float()[(...,) + (None,) * dims] + cut
        hi = boxes[..., dims + axis].float()[(...,) + (None,) * dims] - cut
        inside = inside & (centre >= lo) & (centre < hi)
    return inside


def box_outlines(boxes: Tensor, labels: Tensor, keep: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``(B, *shape)`` long: ``label + 1`` on the one-pixel in-plane outline of every kept box ``(B, N, 2d)``, 0
    elsewhere (a 3-D box is outlined on every slice it spans, so the example's slice through a nodule shows its
    box). Outlines, not filled boxes: the image inside a box stays visible."""
    boxes, labels, keep = boxes.float(), labels.to(boxes.device), keep.to(boxes.device).bool()
    outline = _inside(boxes, shape) & ~_inside(boxes, shape, shrink=1) & keep[(...,) + (None,) * len(shape)]
    values = (labels.clamp(min=0) + 1)[(...,) + (None,) * len(shape)]
    return (outline.long() * values).amax(dim=1) if boxes.shape[1] else torch.zeros((len(boxes), *shape),
                                                                                     dtype=torch.long)
