"""TOG (Chow et al., "Adversarial Objectness Gradient Attacks in Real-time Object Detection Systems", TPS 2020) for
CenterNet detectors (:class:`~medrobust.tasks.detection.DetectionTask`), 2-D and 3-D; and what the detector attacks
share: the clean detections at the task's operating point, their cells and logits, and box matching.

A CenterNet has no objectness channel: a cell's *objectness* is its best class score, ``sigmoid(max_k z_k)``. The
wrapped attack (PGD by default: TOG is iterative FGSM, 10 steps of eps / 4 from a random start) climbs one of:

- ``vanishing``: ``-sum_cells BCE(objectness, 0)`` (TOG's loss). Succeeds once no detection scores
  ``>= score_threshold``; a sample without a clean detection has nothing to make vanish: it is not attacked and its
  ``tog_success`` is NaN, so the rate is over the samples with a clean detection (torchmetrics' mean drops the NaN,
  with a warning);
- ``fabrication``: ``-BCE(objectness, 1)`` summed over the ``min_fabricated`` highest heatmap peaks still below
  the operating point, chosen afresh at every step (``cells="peaks"``, the default); ``cells="all"``: over every
  cell, TOG's own loss, which is weak on a CenterNet: a convolution's cells share pixels with gradients of opposite
  signs, so raising all of them at once raises none far, and a detection needs a local maximum (on the 2-D LUNA
  model at Linf 0.02, 10 steps: 2 % of the slices fabricated against 59 % on the peaks). Succeeds once at least
  ``min_fabricated`` (default 1: one false positive at the operating point is already what a reader would see)
  more detections than on the clean image score ``>= score_threshold``;
- ``mislabel``: minus the task's own loss against the clean detections relabelled (``"ml"``: the most likely other
  class at the detection's cell, TOG's default; ``"ll"``: the least likely). Succeeds once every clean detection is
  found (IoU >= 0.5, same rule in 3-D) with its new label and none with its old one; no clean detection: NaN as
  above. Needs two classes or more;
- ``untargeted``: the task's own loss against the clean detections as ground truth (TOG-untargeted's meaning, not
  the batch's boxes: the attack needs no annotations). Succeeds once the detections differ: a clean detection
  lost (no adversarial one of its label at IoU >= 0.5) or an adversarial one matching no clean one.

The clean detections are read once, from the clean forward the attack starts at, and ride in the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from medrobust.attacks.core.base import Attack, check_at_least
from medrobust.attacks.core.batch import attack_key, float_output, prepare
from medrobust.attacks.core.session import attack_session
from medrobust.attacks.core.threat import ThreatModel
from medrobust.attacks.segmentation.dense import dense_targets
from medrobust.models.centernet import gather_at, peak_mask

# Task members the detector attacks read (their ``requires``): classifiers and segmenters have none of them
DETECTION_MEMBERS = ("detections", "peak_index", "score_threshold")
IOU_MATCH = 0.5  # a detection finds a box at this IoU (TOG's and the VOC rule)
MODES = ("vanishing", "fabrication", "mislabel", "untargeted")
RELABEL = ("ml", "ll")
FABRICATION_CELLS = ("all", "peaks")
_KEYS = {name: attack_key(f"detection_{name}") for name in ("boxes", "labels", "targets", "valid")}


# -- what the detector attacks share ----------------------------------------------------------------------------
def task_of(objective: Any) -> Any:
    """The detection task behind ``objective`` (the task itself, or an adapter's ``base`` chain, e.g. ``with_loss``)."""
    task = objective
    while not hasattr(task, "detections") and hasattr(task, "base"):
        task = task.base
    return task


def operating_point(task: Any, output: Mapping) -> dict[str, Tensor]:
    """``task.detections(output)`` with ``valid`` narrowed to the detections scoring ``>= task.score_threshold``."""
    found = task.detections(output)
    return {**found, "valid": found["valid"] & (found["scores"] >= task.score_threshold)}


def detection_logits(task: Any, output: Mapping, found: Mapping) -> tuple[Tensor, Tensor]:
    """Heatmap logits ``(B, M, K)`` at each detection's cell and the flat cells ``(B, M)`` (``task.peak_index``, in
    the decoder's order). A kept detection whose score is not its cell's is a ``RuntimeError``: the two disagree."""
    cells, _ = task.peak_index(output)
    logits = gather_at(output["heatmap"].float(), cells)
    score = torch.sigmoid(logits.gather(2, found["labels"][..., None]))[..., 0]
    if not torch.allclose(score[found["valid"]], found["scores"][found["valid"]].float(), atol=1e-4):
        raise RuntimeError(f"{type(task).__name__}.peak_index and .detections list different cells: the detector "
                           f"attacks need both in the decoder's order")
    return logits, cells


def other_class(logits: Tensor, labels: Tensor, rule: str) -> Tensor:
    """Per detection ``(B, M)`` the most (``"ml"``) or least (``"ll"``) likely class other than ``labels`` among the
    logits ``(B, M, K)``, ``K >= 2``."""
    if rule == "ml":
        return dense_targets("nearest", logits.transpose(1, 2), labels, None)
    return logits.scatter(2, labels[..., None], float("inf")).argmin(dim=2)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU ``(B, M, N)`` of StandardMode boxes ``a`` ``(B, M, 2d)`` and ``b`` ``(B, N, 2d)``, 2-D or 3-D, batched on
    the boxes' device (judged at every attack step; ``detection_metrics.box_iou`` is the per-image NumPy form)."""
    d = a.shape[-1] // 2
    lo = torch.maximum(a[:, :, None, :d], b[:, None, :, :d])
    hi = torch.minimum(a[:, :, None, d:], b[:, None, :, d:])
    inter = (hi - lo).clamp_min(0).prod(dim=-1)

    def volume(boxes: Tensor) -> Tensor:
        return (boxes[..., d:] - boxes[..., :d]).clamp_min(0).prod(dim=-1)

    union = volume(a)[:, :, None] + volume(b)[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def found_by(detections: Mapping, boxes: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """``(B, M)``: each valid box found by a valid detection of its label at IoU ``>= IOU_MATCH``."""
    hit = pairwise_iou(boxes.float(), detections["boxes"].float()) >= IOU_MATCH
    hit &= labels[:, :, None] == detections["labels"][:, None, :]
    return (hit & detections["valid"][:, None, :]).any(dim=2) & valid


class Aims(NamedTuple):
    """The clean detections at the operating point, padded: boxes ``(B, M, 2d)``, labels, the labels aimed at
    (``targets``, mislabel; else the labels) and ``valid`` ``(B, M)``."""

    boxes: Tensor
    labels: Tensor
    targets: Tensor
    valid: Tensor

    def into(self, batch: Mapping) -> dict:
        return {**batch, **{_KEYS[name]: value for name, value in self._asdict().items()}}

    @classmethod
    def of(cls, batch: Mapping) -> "Aims":
        return cls(*(batch[_KEYS[name]] for name in cls._fields))

    def as_ground_truth(self, labels: Tensor) -> dict:
        """A detection batch whose boxes are these, labelled ``labels`` (what the task's loss reads)."""
        return {"boxes": self.boxes, "labels": labels.masked_fill(~self.valid, -1), "box_valid": self.valid,
                "box_target": self.valid}


class Outcome(NamedTuple):
    """Per sample ``(B,)``: whether the attack reached its aim, whether it had one, and the mode's count."""

    success: Tensor
    applicable: Tensor
    count: Tensor


# -- TOG ----------------------------------------------------------------------------------------------------------
def peaks_below(heatmap: Tensor, score_threshold: float, count: int, candidates: Tensor | None = None) -> Tensor:
    """Logits ``(B, count)`` of the ``count`` highest peaks of ``heatmap`` (``(B, K, *cells)`` logits; a peak is a
    cell in ``candidates``, by default one no lower than its 3-wide neighbourhood in its class, as a CenterNet's
    decoder finds them; a RetinaNet's are its NMS survivors) scoring below ``score_threshold``: the cells closest
    to becoming new detections. With fewer such peaks, the highest other cells fill in. Selected without gradient;
    the logits keep theirs."""
    with torch.no_grad():
        below = torch.sigmoid(heatmap) < score_threshold
        candidates = peak_mask(heatmap) if candidates is None else candidates
        span = heatmap.amax() - heatmap.amin() + 1  # every other cell ranks below every candidate, in its order
        rank = torch.where(candidates & below, heatmap, heatmap - span).flatten(1)
        index = rank.topk(min(count, rank.shape[1]), dim=1).indices
    return heatmap.flatten(1).gather(1, index)


class TogObjective:
    """TOG's loss in ``mode`` (``attack_loss``) and its success test (``is_correct``: false once the aim is reached,
    or at once where there is none), on clean detections riding in the batch (:class:`Aims`)."""

    def __init__(self, task: Any, mode: str, min_fabricated: int = 1, cells: str = "peaks") -> None:
        self.task, self.mode, self.min_fabricated, self.cells = task, mode, min_fabricated, cells

    def attack_loss(self, output: Mapping, batch: dict) -> Tensor:
        if self.mode == "fabrication" and self.cells == "peaks":
            peaks = peaks_below(output["heatmap"].float(), self.task.score_threshold, self.min_fabricated,
                                self.task.candidate_mask(output))
            return -F.softplus(-peaks).sum(dim=1)
        if self.mode in ("vanishing", "fabrication"):
            objectness = output["heatmap"].float().amax(dim=1).flatten(1)  # logit of the best class per cell
            sign = 1.0 if self.mode == "vanishing" else -1.0  # BCE against 0 is softplus(z), against 1 softplus(-z)
            return -F.softplus(sign * objectness).sum(dim=1)
        aims = Aims.of(batch)
        labels = aims.targets if self.mode == "mislabel" else aims.labels
        loss = self.task.attack_loss(output, aims.as_ground_truth(labels))
        return -loss if self.mode == "mislabel" else loss

    def outcome(self, output: Mapping, batch: Mapping) -> Outcome:
        aims, found = Aims.of(batch), operating_point(self.task, output)
        left, clean = found["valid"].sum(dim=1), aims.valid.sum(dim=1)
        some = clean > 0
        if self.mode == "vanishing":
            return Outcome(left == 0, some, left)
        if self.mode == "fabrication":
            return Outcome(left - clean >= self.min_fabricated, torch.ones_like(some), (left - clean).clamp_min(0))
        if self.mode == "mislabel":
            relabelled = found_by(found, aims.boxes, aims.targets, aims.valid)
            kept = found_by(found, aims.boxes, aims.labels, aims.valid)
            return Outcome((relabelled == aims.valid).all(dim=1) & ~kept.any(dim=1), some, relabelled.sum(dim=1))
        lost = aims.valid & ~found_by(found, aims.boxes, aims.labels, aims.valid)
        clean_detections = {"boxes": aims.boxes, "labels": aims.labels, "valid": aims.valid}
        added = found["valid"] & ~found_by(clean_detections, found["boxes"], found["labels"], found["valid"])
        changed = lost.sum(dim=1) + added.sum(dim=1)
        return Outcome(changed > 0, torch.ones_like(some), changed)

    def is_correct(self, output: Mapping, batch: dict) -> Tensor:
        outcome = self.outcome(output, batch)
        return outcome.applicable & ~outcome.success


_COUNTS = {"vanishing": "detections_left", "fabrication": "fabricated", "mislabel": "relabelled",
           "untargeted": "detections_changed"}


class TOG(Attack):
    """``attack`` climbing TOG's loss in ``mode`` (see the module docstring).

    Args:
        attack: a fixed-eps attack that climbs the objective's own loss (PGD, FGSM, APGD with ``loss="default"``);
            TOG's is PGD, Linf, 10 steps of ``rel_step_size=0.25`` (eps / 4) from a random start.
        mode: ``"vanishing"``, ``"fabrication"``, ``"mislabel"`` or ``"untargeted"``.
        target: mislabel only: ``"ml"`` (most likely other class, TOG's default) or ``"ll"`` (least likely).
        min_fabricated: fabrication only: how many detections beyond the clean count make a success (>= 1).
        cells: fabrication only: ``"peaks"`` (the loss on the ``min_fabricated`` highest peaks below the operating
            point) or ``"all"`` (TOG's loss on every cell: far weaker on CenterNets, see the module docstring).

    It seeks a chosen change of the detections, not the task's errors (``seeks_errors`` false, ``targeted``): curves
    attack every sample at each eps and the masking checks leave it out. Curves report ``tog_success`` (NaN, hence
    left out of the mean, for samples with no clean detection in vanishing and mislabel) and the mode's count:
    ``detections_left``, ``fabricated`` (detections beyond the clean count), ``relabelled`` (clean detections found
    with their new label) or ``detections_changed`` (lost plus added), read at the attack's own points.
    """

    seeks_errors = False
    targeted = True
    # detection tasks only; RobustnessEvaluation checks them at setup
    requires = DETECTION_MEMBERS + ("candidate_mask", "num_classes")

    def __init__(self, attack: Attack, mode: str = "vanishing", target: str = "ml", min_fabricated: int = 1,
                 cells: str = "peaks") -> None:
        if attack.climbs_own_loss:
            raise ValueError(f"TOG needs an attack that climbs the objective's own loss; {attack.name} climbs "
                             f"loss={attack.loss!r} (give it loss='default')")
        if mode not in MODES:
            raise ValueError(f"TOG mode must be one of {MODES}, got {mode!r}")
        if target not in RELABEL:
            raise ValueError(f"TOG target (mislabel's new class) must be one of {RELABEL}, got {target!r}")
        if cells not in FABRICATION_CELLS:
            raise ValueError(f"TOG cells (fabrication's loss) must be one of {FABRICATION_CELLS}, got {cells!r}")
        self.inner, self.mode, self.target, self.cells = attack, mode, target, cells
        self.min_fabricated = check_at_least("min_fabricated", min_fabricated, 1)
        self.norm, self.bn_eval, self.dropout_eval = attack.norm, attack.bn_eval, attack.dropout_eval
        suffix = {"mislabel": f"-{target}", "fabrication": "-all" if cells == "all" else ""}.get(mode, "")
        self.name = f"tog-{mode}{suffix}-{attack.name}"

    @property
    def extra_metrics(self) -> tuple[str, ...]:
        return ("tog_success", _COUNTS[self.mode])

    def aims(self, task: Any, clean_output: Mapping) -> Aims:
        """The clean detections at the operating point and, for mislabel, their new labels."""
        found = operating_point(task, clean_output)
        labels = found["labels"]
        if self.mode != "mislabel":
            return Aims(found["boxes"], labels, labels, found["valid"])
        if task.num_classes < 2:
            raise ValueError(f"TOG mislabel relabels detections into another class, but {type(task).__name__} has "
                             f"num_classes={task.num_classes}: use mode vanishing, fabrication or untargeted")
        logits, _ = detection_logits(task, clean_output, found)
        return Aims(found["boxes"], labels, other_class(logits, labels, self.target), found["valid"])

    def aimed_batch(self, model: Callable, x: Tensor, batch: Mapping, task: Any) -> dict:
        """``batch`` with the aims of ``x`` (:class:`Aims`), from the clean forward the attack starts at."""
        with attack_session(model, bn_eval=self.bn_eval, dropout_eval=self.dropout_eval), torch.no_grad():
            x, _ = prepare(x, {})
            return self.aims(task, float_output(model(x))).into(batch)

    def extra_values(self, task: Any, output: Mapping, clean_output: Mapping, batch: Mapping) -> dict[str, Tensor]:
        """Per sample ``(B,)``: ``tog_success`` (1 / 0, NaN without an aim) and the mode's count, at ``output``."""
        aimed = self.aims(task, float_output(clean_output)).into(batch)
        outcome = TogObjective(task, self.mode, self.min_fabricated).outcome(float_output(output), aimed)
        success = torch.where(outcome.applicable, outcome.success.float(), torch.nan)
        return {"tog_success": success, _COUNTS[self.mode]: outcome.count.float()}

    def attack(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel) -> Tensor:
        task = task_of(objective)
        aimed = self.aimed_batch(model, x, batch, task)
        return self.inner(model, x, aimed, TogObjective(task, self.mode, self.min_fabricated, self.cells),
                          eps=threat.eps, bounds=threat.bounds)
