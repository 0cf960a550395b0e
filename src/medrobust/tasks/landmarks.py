"""Landmark detection, 2-D and 3-D: heatmaps decoded by a differentiable soft-argmax, or coordinates regressed
directly, against ``batch["landmarks"]`` ``(B, K, D)`` voxels with ``batch["spacing"]`` ``(B, D)`` mm."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medrobust.reporting.points import PointSet
from medrobust.tasks.base import RobustTask
from medrobust.tasks.landmark_heatmaps import gaussian_js_divergence, js_divergence, soft_argmax, spatial_log_softmax
from medrobust.tasks.landmark_metrics import LandmarkTarget, LossThreshold, landmark_metrics, per_landmark_errors
from medrobust.tasks.landmark_metrics import radial_errors

CORRECT_RULES = ("loss", "mre")
_NOT_IN_KEYS = re.compile(r"[^A-Za-z0-9_\-]+")  # landmark names go into metric keys and file names
_SMOOTH_MM2 = 1e-12  # the loss's distances are sqrt(d^2 + this): differentiable where a prediction is exact


class LandmarkTask(RobustTask):
    """Landmarks ``(B, K, D)`` in voxels from images ``(B, C, *spatial)``, errors in mm through the batch spacing.

    The network gives either heatmaps ``(B, K, *spatial)`` (``model=landmark_unet``), decoded DSNT-style: a spatial
    softmax (inverse temperature ``exp(log_scale)``, learnt unless ``learn_temperature=False``) and its expected
    voxel position, both differentiable, so attacks and training see gradients through the coordinates; or
    coordinates ``(B, K * D)`` (``model=landmark_regressor``), read as normalised positions (-1 / +1: the centres
    of the first / last voxel of each axis, 0 the image centre). The output's rank tells which; ``forward`` returns
    heatmaps as they are and regressed coordinates already in voxels ``(B, K, D)``.

    attack_loss (the per-sample training loss): ``heatmap_weight`` x the Jensen-Shannon divergence between each
    softmax heatmap and a Gaussian of ``sigma_vox`` voxels centred exactly (sub-voxel) at the true landmark, mean
    over landmarks (heatmap outputs only), plus ``coord_weight`` x the mean radial error in mm.

    is_correct: ``correct="loss"`` (seed 004): loss ``<= tau``; by default (``tau=None``) tau is the Huber robust
    mean plus 3 robust scales of the clean validation losses (rank-reduced ``val/loss_tau``), recomputed after each
    clean validation (sanity check excluded) and kept in the ``validation_tau`` buffer, hence in checkpoints;
    until a first validation the sample is judged by the MRE rule. ``correct="mre"``: mean radial error
    ``<= radius_mm``. correct_margin: ``tau - loss`` or ``radius_mm - MRE``, ``>= 0`` exactly where is_correct.

    Metrics (:mod:`medrobust.tasks.landmark_metrics`): ``accuracy`` (the is-correct rate), ``mre`` (mm),
    ``sdr_2mm`` / ``sdr_2p5mm`` / ``sdr_3mm`` / ``sdr_4mm`` and ``landmark_shift`` (mean displacement in mm from the
    clean prediction: 0 on clean images, so not in the clean metrics); the clean validation / test loops also log
    ``error_<name>`` per landmark and ``loss_tau``, the tau their losses give. Without ``batch["spacing"]`` errors
    are in voxels.

    Args:
        net: ``(B, C, *spatial) -> (B, K, *spatial)`` heatmaps or ``(B, K * D)`` coordinates.
        num_landmarks: ``K``.
        landmark_names: one per landmark (metric keys ``error_<name>``, example grids); default ``L0``, ``L1``, ...
        sigma_vox: std of the target Gaussians in voxels (about 1 or less: fiducials may be a few voxels apart).
        correct, radius_mm, tau: the is-correct rule, its radius (mm) and a fixed loss threshold (or ``None``).
        heatmap_weight, coord_weight: weights of the heatmap divergence and of the radial error (per mm).
        learn_temperature: learn the softmax's inverse temperature (else fixed at 1).
    """

    outputs_logits = False  # heatmaps or coordinates, not class logits: CE / DLR losses do not apply
    label_key = "landmarks"
    shift_metric = "landmark_shift"
    attacked_metrics = ("mre",)  # the loss drives the radial error (one of its terms); SDR only follows it
    curve_metrics = ("accuracy", "mre", "sdr_2mm", "landmark_shift")  # PNGs every epoch; the CSV has them all
    tau_metrics = ("loss_tau",)  # seed 004: tau from the clean validation losses (LossThreshold)

    def __init__(self, net, num_landmarks: int, landmark_names: Sequence[str] | None = None, sigma_vox: float = 1.0,
                 correct: str = "loss", radius_mm: float = 4.0, tau: float | None = None, heatmap_weight: float = 1.0,
                 coord_weight: float = 0.02, learn_temperature: bool = True, **kwargs) -> None:
        if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or num_landmarks < 1:
            raise ValueError(f"module.num_landmarks must be an integer >= 1, got {num_landmarks!r}")
        if correct not in CORRECT_RULES:
            raise ValueError(f"module.correct must be one of {list(CORRECT_RULES)}, got {correct!r}")
        for key, value in (("sigma_vox", sigma_vox), ("radius_mm", radius_mm), ("coord_weight", coord_weight)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"module.{key} must be a number > 0, got {value!r}")
        if not (isinstance(heatmap_weight, (int, float)) and heatmap_weight >= 0):
            raise ValueError(f"module.heatmap_weight must be a number >= 0, got {heatmap_weight!r}")
        if tau is not None and not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"module.tau must be a loss value > 0 or null (from the clean validation), got {tau!r}")
        self.num_landmarks, self.correct_rule = num_landmarks, correct
        self.landmark_names = _check_names(landmark_names, num_landmarks)
        self.landmark_keys = [_NOT_IN_KEYS.sub("_", name).strip("_") for name in self.landmark_names]
        if len(set(self.landmark_keys)) != num_landmarks or not all(self.landmark_keys):
            raise ValueError(f"module.landmark_names must stay distinct and non-empty as metric keys, got "
                             f"{self.landmark_keys} from {list(self.landmark_names)}")
        self.sigma_vox, self.radius_mm = float(sigma_vox), float(radius_mm)
        self.heatmap_weight, self.coord_weight = float(heatmap_weight), float(coord_weight)
        self.fixed_tau = None if tau is None else float(tau)
        super().__init__(net, **kwargs)
        scale = torch.zeros(())
        self.log_scale = nn.Parameter(scale) if learn_temperature else nn.Buffer(scale)
        self.register_validation_tau()

    # -- tau ------------------------------------------------------------------------------------
    @property
    def tau(self) -> Tensor:
        """The loss threshold now, 0-d: the fixed ``tau``, else the last clean validation's (NaN before one)."""
        if self.fixed_tau is not None:
            return torch.tensor(self.fixed_tau, device=self.validation_tau.device)
        return self.validation_tau

    # -- wiring to the data ---------------------------------------------------------------------
    def bind_data(self, datamodule) -> None:
        super().bind_data(datamodule)
        count = getattr(datamodule, "num_landmarks", None)
        if count is not None and count != self.num_landmarks:
            raise ValueError(f"module.num_landmarks={self.num_landmarks} but the data have {count} landmarks "
                             f"({getattr(datamodule, 'landmark_names', None)})")

    # -- outputs --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Heatmaps ``(B, K, *spatial)`` as the network gives them, or regressed coordinates in voxels
        ``(B, K, D)``."""
        output = self.net(x)
        spatial = x.shape[2:]
        if output.ndim == 2 and output.shape[1] == self.num_landmarks * len(spatial):
            normalised = output.reshape(len(x), self.num_landmarks, len(spatial))
            extent = torch.tensor([n - 1 for n in spatial], dtype=output.dtype, device=output.device)
            return (normalised + 1) * extent / 2
        if output.ndim == x.ndim and output.shape[1] == self.num_landmarks and output.shape[2:] == spatial:
            return output
        raise ValueError(f"a landmark network must output heatmaps (B, K, *spatial) = (B, {self.num_landmarks}, "
                         f"{', '.join(map(str, spatial))}) or coordinates (B, K * D) = (B, "
                         f"{self.num_landmarks * len(spatial)}) for images {tuple(x.shape)}; got {tuple(output.shape)}")

    def coordinates(self, output: Tensor) -> Tensor:
        """Predicted voxel coordinates ``(B, K, D)``, fp32, from :meth:`forward`'s output."""
        if output.ndim == 3:
            return output.float()
        return soft_argmax(self.log_probs(output), tuple(output.shape[2:]))

    def log_probs(self, heatmaps: Tensor) -> Tensor:
        """The heatmaps' spatial log-softmax ``(B, K, N)`` at the current temperature."""
        return spatial_log_softmax(heatmaps, self.log_scale.exp())

    def true_landmarks(self, output: Tensor, batch: dict) -> Tensor:
        true = batch[self.label_key]
        dims = output.shape[-1] if output.ndim == 3 else output.ndim - 2  # coordinates or heatmaps
        if true.shape != (len(output), self.num_landmarks, dims):
            raise ValueError(f"batch[{self.label_key!r}] must be (B, K, D) = ({len(output)}, {self.num_landmarks}, "
                             f"{dims}) voxel coordinates, got {tuple(true.shape)}")
        return true.float()

    def spacing(self, true: Tensor, batch: dict) -> Tensor:
        """``batch["spacing"]`` ``(B, D)`` mm, or ones (errors in voxels) when the batch has none."""
        spacing = batch.get("spacing")
        if spacing is None:
            return torch.ones(true.shape[0], true.shape[2], device=true.device)
        spacing = torch.as_tensor(spacing, dtype=torch.float32, device=true.device)
        if spacing.shape != (true.shape[0], true.shape[2]):
            raise ValueError(f"batch['spacing'] must be (B, D) = {(true.shape[0], true.shape[2])} mm per voxel, got "
                             f"{tuple(spacing.shape)}")
        return spacing

    # -- the contract ---------------------------------------------------------------------------
    def attack_loss(self, output: Tensor, batch: dict) -> Tensor:
        true = self.true_landmarks(output, batch)
        spacing = self.spacing(true, batch)
        loss = torch.zeros(len(true), device=true.device)
        if output.ndim == 3:
            coords = output.float()
        else:
            shape = tuple(output.shape[2:])
            log_p = self.log_probs(output)
            coords = soft_argmax(log_p, shape)
            if self.heatmap_weight > 0:
                divergence = gaussian_js_divergence(log_p, true, shape, self.sigma_vox)
                loss = loss + self.heatmap_weight * divergence.mean(dim=1)
        squared = ((coords - true) * spacing[:, None, :]).square().sum(dim=-1)
        return loss + self.coord_weight * (squared + _SMOOTH_MM2).sqrt().mean(dim=1)

    def mean_radial_error(self, output: Tensor, batch: dict) -> Tensor:
        """Per-sample MRE ``(B,)`` in mm (differentiable)."""
        true = self.true_landmarks(output, batch)
        return radial_errors(self.coordinates(output), true, self.spacing(true, batch)).float().mean(dim=1)

    def correct_margin(self, output: Tensor, batch: dict, loss: Tensor | None = None) -> Tensor:
        """``tau - loss`` (``loss``: the :meth:`attack_loss` already computed, if any), or ``radius_mm - MRE``."""
        tau = self.tau
        if self.correct_rule == "loss" and not torch.isnan(tau):
            return tau - (self.attack_loss(output, batch) if loss is None else loss)
        return self.radius_mm - self.mean_radial_error(output, batch)

    def is_correct(self, output: Tensor, batch: dict) -> Tensor:
        return self.correct_margin(output, batch) >= 0

    def output_divergence(self, clean_output: Tensor, adversarial_output: Tensor, batch: dict) -> Tensor:
        """How far the prediction moved, in the units of the task's own loss: ``coord_weight`` x the squared
        displacement of the decoded landmarks in mm^2 (voxels without ``batch["spacing"]``), mean over the ``K x D``
        coordinates, plus, for heatmaps, ``heatmap_weight`` x the Jensen-Shannon divergence between the clean and
        the adversarial maps, mean over the landmarks (the loss's heatmap term with the clean map as the target).

        Weighted as the loss is, so TRADES' ``beta`` keeps its meaning (6: the divergence weighs 6 times the loss):
        unweighted mm^2 outweighed the loss's per-mm term 50-fold (``coord_weight`` 0.02), and TRADES with beta 6
        on task=afids learned no landmarks (test MRE 4.3 mm against PGD-AT's 0.9)."""
        clean, adversarial = self.coordinates(clean_output), self.coordinates(adversarial_output)
        spacing = self.spacing(clean, batch)
        moved = ((adversarial - clean) * spacing[:, None, :]).square().flatten(1).mean(dim=1)
        divergence = self.coord_weight * moved
        if clean_output.ndim != 3 and self.heatmap_weight > 0:
            maps = js_divergence(self.log_probs(clean_output), self.log_probs(adversarial_output))
            divergence = divergence + self.heatmap_weight * maps.mean(dim=1)
        return divergence

    def robust_metrics(self) -> dict:
        return landmark_metrics(self.shift_metric)

    def clean_metrics(self) -> dict:
        # per-landmark errors on clean images only: under attack they would be K more metrics in every (attack, eps)
        # cell and K more columns of the summary (32 in 3-D); the attacks' MRE and SDR say how far they moved
        metrics = {name: metric for name, metric in self.robust_metrics().items() if name != self.shift_metric}
        return {**metrics, **per_landmark_errors(self.landmark_keys), "loss_tau": LossThreshold()}

    @property
    def bounded_metrics(self) -> tuple[str, ...]:  # rates live in [0, 1]
        return tuple(name for name in self.robust_metrics() if name == "accuracy" or name.startswith("sdr_"))

    def metric_inputs(self, output: Tensor, batch: dict, reference: Tensor | None = None
                      ) -> tuple[Tensor, LandmarkTarget]:
        """``preds`` ``(B, 2, K, D)``: the predicted and the reference coordinates (``reference``: the clean output
        when ``output`` is adversarial; else the prediction itself); ``target``: truth, spacing, loss, verdict."""
        coords = self.coordinates(output)
        reference_coords = coords if reference is None else self.coordinates(reference)
        true = self.true_landmarks(output, batch)
        loss = self.attack_loss(output, batch)
        target = LandmarkTarget(true, self.spacing(true, batch), loss, self.correct_margin(output, batch, loss) >= 0)
        return torch.stack([coords, reference_coords], dim=1), target

    def example_masks(self, output: Tensor, batch: dict, adversarial_output: Tensor) -> dict[str, PointSet]:
        names = self.landmark_names
        return {"ground truth": PointSet(self.true_landmarks(output, batch), names),
                "clean prediction": PointSet(self.coordinates(output), names),
                "adversarial prediction": PointSet(self.coordinates(adversarial_output), names)}


def _check_names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return [f"L{index}" for index in range(count)]
    names = [str(name) for name in names]
    if len(names) != count:
        raise ValueError(f"module.landmark_names must name each of the {count} landmarks (module.num_landmarks), "
                         f"got {len(names)}: {names}")
    return names
