"""Targeted landmark attack (Yao et al., "Miss the Point: Targeted Adversarial Attack on Multiple Landmark Detection",
MICCAI 2020): move chosen landmarks to chosen positions while the others stay where the clean image put them.

Aims per sample ``(B, K, D)`` voxels: the moved landmarks' targets (their clean prediction shifted by ``shift_mm``,
or another landmark's clean prediction with ``onto``), the pinned landmarks' clean predictions. The wrapped attack
(PGD by default: iterative FGSM, as the paper's) climbs :class:`LandmarkAimObjective`: minus the distances (mm) to
the aims beyond ``slack`` of the success radius, each weighted by its share of their sum (the paper's adaptive
weighting: the landmark farthest from its aim pulls hardest, a pinned landmark that starts to drift is pulled back). A sample succeeds once every landmark is
within ``radius_mm`` of its aim; the attack stops there. Curves report the success rate (``target_success``) and the
moved landmarks' distance to their targets (``target_error``, mm) next to the task's own metrics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, check_positive
from medrobust.attacks.core.batch import attack_key, prepare
from medrobust.attacks.core.session import attack_session
from medrobust.attacks.core.threat import ThreatModel

AIM_KEY = attack_key("landmark_aims")  # (B, K, D) voxel aims riding along in the batch (indexed with it)
_SMOOTH_MM2 = 1e-12  # distances are sqrt(d^2 + this): differentiable at an aim reached exactly
_NOT_IN_LABELS = re.compile(r"[^A-Za-z0-9]+")


class LandmarkAimObjective:
    """Landmarks towards per-sample aims ``batch[AIM_KEY]`` ``(B, K, D)`` voxels, for any landmark task (it reads
    ``task.coordinates(output)`` and ``task.spacing(...)``).

    - ``attack_loss -> (B,)``: ``-sum_k w_k h_k`` with ``h_k = max(d_k - slack * radius_mm, 0)``, ``d_k`` the distance
      (mm) of landmark k to its aim, and ``w_k = h_k / sum_j h_j`` (detached): Yao et al.'s adaptive weights. Their
      loss is the distance itself (``slack=0``); a landmark already within a fraction of the success radius needs no
      pull, and leaving it there spends the budget where it is needed: on a linear model with a pinned landmark the
      attack then succeeds at 1.05x the exact smallest eps (``tests/test_landmark_targeted.py``), where the plain
      distances needed 1.1x;
    - ``correct_margin -> (B,)``: ``max_k d_k - radius_mm``, > 0 exactly while some landmark is farther than
      ``radius_mm`` from its aim; ``is_correct``: the margin > 0 (the attack has not yet succeeded).
    """

    def __init__(self, task: Any, radius_mm: float, slack: float = 0.5) -> None:
        self.task, self.radius_mm, self.slack = task, radius_mm, slack

    def distances(self, output: Tensor, batch: dict) -> Tensor:
        """Distance ``(B, K)`` in mm of each predicted landmark to its aim."""
        aims = batch[AIM_KEY].float()
        spacing = self.task.spacing(aims, batch)
        offset = (self.task.coordinates(output) - aims) * spacing[:, None, :]
        return (offset.square().sum(dim=-1) + _SMOOTH_MM2).sqrt()

    def attack_loss(self, output: Tensor, batch: dict) -> Tensor:
        excess = (self.distances(output, batch) - self.slack * self.radius_mm).clamp_min(0)
        weights = excess.detach() / excess.detach().sum(dim=1, keepdim=True).clamp_min(_SMOOTH_MM2)
        return -(weights * excess).sum(dim=1)

    def correct_margin(self, output: Tensor, batch: dict) -> Tensor:
        return self.distances(output, batch).amax(dim=1) - self.radius_mm

    def is_correct(self, output: Tensor, batch: dict) -> Tensor:
        return self.correct_margin(output, batch) > 0


class LandmarkTargeted(Attack):
    """``attack`` aimed at moving landmarks ``move`` while pinning the rest (see the module docstring).

    Args:
        attack: a fixed-eps attack that climbs the objective's own loss (PGD, FGSM, APGD with ``loss="default"``).
        move: the landmarks to move, by name (the task's ``landmark_names``) or index; at least one.
        shift_mm: the moved landmarks' displacement from their clean predictions, mm per image axis (a list of D
            numbers), or one number: that many mm along the first image axis. Default 5 mm along it without
            ``onto``, none with it.
        onto: a landmark name or index: the moved landmarks aim at its clean prediction (plus ``shift_mm``).
        radius_mm: a sample succeeds when every landmark is within this of its aim.
        slack: landmarks within ``slack * radius_mm`` of their aims are not pulled (0: Yao et al.'s plain
            distances; see :class:`LandmarkAimObjective`), in [0, 1).

    Aims are clipped into the image (a soft-argmax cannot leave it). It seeks a chosen displacement, not errors
    (``seeks_errors`` false): curves attack every sample at each eps, and the masking checks leave it out.
    """

    seeks_errors = False
    targeted = True
    requires = ("coordinates", "spacing", "landmark_names")  # landmark tasks; RobustnessEvaluation checks them
    extra_metrics = ("target_success", "target_error")

    def __init__(self, attack: Attack, move: Sequence[str | int] = (0,), shift_mm: float | Sequence[float] | None = None,
                 onto: str | int | None = None, radius_mm: float = 2.0, slack: float = 0.5) -> None:
        if attack.climbs_own_loss:
            raise ValueError(f"LandmarkTargeted needs an attack that climbs the objective's own loss; {attack.name} "
                             f"climbs loss={attack.loss!r} (give it loss='default')")
        move = [move] if isinstance(move, (str, int)) else list(move)
        if not move:
            raise ValueError("move must name at least one landmark to move, got an empty list")
        if shift_mm is None:
            shift_mm = 5.0 if onto is None else 0.0
        shift = [float(shift_mm)] if isinstance(shift_mm, (int, float)) else [float(v) for v in shift_mm]
        if not shift:
            raise ValueError("shift_mm must be a number or one number per image axis, got an empty list")
        self.inner, self.move, self.shift_mm, self.onto = attack, move, shift, onto
        self.radius_mm = check_positive("radius_mm", radius_mm)
        if not 0.0 <= float(slack) < 1.0:
            raise ValueError(f"slack must be in [0, 1) (a fraction of radius_mm), got {slack!r}")
        self.slack = float(slack)
        self.norm, self.bn_eval, self.dropout_eval = attack.norm, attack.bn_eval, attack.dropout_eval
        aim = f"onto-{onto}" if onto is not None else "by-" + "_".join(f"{v:g}" for v in shift) + "mm"
        self.name = _NOT_IN_LABELS.sub("-", f"{attack.name}-move-{'-'.join(map(str, move))}-{aim}").strip("-")

    # -- aims -------------------------------------------------------------------------------------
    def _index(self, task: Any, landmark: str | int) -> int:
        names = list(task.landmark_names)
        if isinstance(landmark, int) and not isinstance(landmark, bool) and 0 <= landmark < len(names):
            return landmark
        if isinstance(landmark, str) and landmark in names:
            return names.index(landmark)
        raise ValueError(f"landmark {landmark!r} (in move / onto) is neither one of the task's landmarks {names} nor "
                         f"an index below {len(names)}")

    def aims(self, task: Any, clean_output: Tensor, batch: Mapping, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Aims ``(B, K, D)`` voxels from the clean output, and which landmarks move ``(K,)`` bool."""
        clean = task.coordinates(clean_output).detach()
        dims = clean.shape[-1]
        if len(self.shift_mm) not in (1, dims):
            raise ValueError(f"shift_mm must be one number or {dims} (one per image axis), got {self.shift_mm}")
        moved = torch.zeros(clean.shape[1], dtype=torch.bool, device=clean.device)
        moved[[self._index(task, landmark) for landmark in self.move]] = True
        shift = torch.zeros(dims, device=clean.device)
        shift[: len(self.shift_mm)] = torch.tensor(self.shift_mm, device=clean.device)
        start = clean if self.onto is None else clean[:, [self._index(task, self.onto)]].expand_as(clean)
        shifted = start + shift / task.spacing(clean, batch)[:, None, :]  # mm -> voxels of each axis
        extent = torch.tensor([n - 1 for n in shape], dtype=clean.dtype, device=clean.device)
        return torch.minimum(torch.where(moved[None, :, None], shifted, clean).clamp_min(0), extent), moved

    def aimed_batch(self, model: Callable, x: Tensor, batch: Mapping, task: Any) -> dict:
        """``batch`` with the aims of ``x`` under :data:`AIM_KEY`, from the clean forward the attack starts at."""
        with attack_session(model, bn_eval=self.bn_eval, dropout_eval=self.dropout_eval), torch.no_grad():
            x, prepared = prepare(x, batch)
            aims, _ = self.aims(task, model(x), prepared, x.shape[2:])
        return {**batch, AIM_KEY: aims}

    def extra_values(self, task: Any, output: Tensor, clean_output: Tensor, batch: Mapping) -> dict[str, Tensor]:
        """Per sample ``(B,)``: ``target_success`` (1 where every landmark is within ``radius_mm`` of its aim) and
        ``target_error``, the moved landmarks' mean distance (mm) to their targets, at the adversarial ``output``:
        the attack's own points, which stop once a sample succeeds, so a succeeded sample reads at most
        ``radius_mm`` there, not the smallest distance the budget could reach."""
        aims, moved = self.aims(task, clean_output, batch, _image_shape(output, batch))
        distances = LandmarkAimObjective(task, self.radius_mm).distances(output, {**batch, AIM_KEY: aims})
        return {"target_success": (distances.amax(dim=1) <= self.radius_mm).float(),
                "target_error": distances[:, moved].mean(dim=1)}

    def example_marks(self, task: Any, clean_output: Tensor, batch: Mapping) -> dict[str, Tensor]:
        """The moved landmarks' targets, named as the landmarks, for the example images."""
        from medrobust.reporting.points import PointSet  # reporting (matplotlib) only when examples are drawn

        aims, moved = self.aims(task, clean_output, batch, _image_shape(clean_output, batch))
        names = [name for name, chosen in zip(task.landmark_names, moved.tolist()) if chosen]
        return {"targets": PointSet(aims[:, moved], [f"{name} target" for name in names])}

    # -- the attack -------------------------------------------------------------------------------
    def attack(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel) -> Tensor:
        aimed = self.aimed_batch(model, x, batch, objective)
        return self.inner(model, x, aimed, LandmarkAimObjective(objective, self.radius_mm, self.slack),
                          eps=threat.eps, bounds=threat.bounds)


def _image_shape(output: Tensor, batch: Mapping) -> tuple[int, ...]:
    """The image's spatial shape: the heatmaps', or the batch image's for regressed coordinates ``(B, K, D)``."""
    return tuple(output.shape[2:]) if output.ndim > 3 else tuple(batch["image"].shape[2:])
