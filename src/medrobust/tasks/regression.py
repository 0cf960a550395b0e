"""Regression: any scalar target from images, with conventional or hybrid networks (brain age:
:mod:`medrobust.tasks.brainage`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medrobust.tasks.base import RobustTask
from medrobust.tasks.regression_metrics import parse_bands, regression_metrics

LOSSES = ("l1", "mse", "huber")


class RegressionTask(RobustTask):
    """A scalar target from images; ``batch[label_key]`` is the target ``(B,)``.

    The network predicts the standardised target ``(y - target_mean) / target_std``; :meth:`prediction` turns
    its output back into target units. A network with a ``fuse(output, features)`` method (the hybrid model) gets
    ``batch[features_key]`` there: those features come from the batch, which attacks never perturb.

    attack_loss: the per-sample training loss on the standardised scale (L1, MSE or Huber); is_correct:
    ``|prediction - target| <= tau``; correct_margin: ``tau - |prediction - target|`` (target units);
    output_divergence: the squared change of the standardised prediction.
    Metrics: ``accuracy`` (fraction within ``tau``), MAE, RMSE, R^2, and the prediction shift
    ``|mean(pred_adv - pred_clean)|``, named ``shift_metric``, overall and per target band as
    ``<shift_metric>_<band>`` (bands without samples are skipped).
    Curve PNGs: accuracy, MAE and the shift (per band in one PNG); every metric is in robustness.csv.

    A subclass renames what the user sees through class attributes (:class:`~medrobust.tasks.BrainAgeTask`):
    ``shift_metric``, ``bands_key`` (the setting named in errors) and ``datamodule_stats`` (the datamodule's
    attributes holding the target's mean and standard deviation).

    Args:
        net: ``(B, C, *spatial) -> (B, 1)``, or an embedding with ``net.fuse(embedding, features) -> (B, 1)``.
        loss: ``"l1"``, ``"mse"`` or ``"huber"`` (delta 1 standard deviation).
        tau: tolerance in target units for ``is_correct``.
        bands: band edges for the per-band shift; ``[15, 25, 50, 65]`` gives < 15, 15-25, 25-50, 50-65 and
            > 65; empty: no per-band shift.
        target_mean, target_std: standardisation of the target; ``None`` takes the datamodule's
            ``datamodule_stats`` attributes (training split) at setup. Saved in checkpoints.
        features_key: the batch key of the anatomical features a hybrid network fuses.
    """

    outputs_logits = False  # attacks' classification losses (CE, DLR, targeted) do not apply
    shift_metric = "shift"
    bands_key = "module.bands"
    datamodule_stats = ("target_mean", "target_std")

    @property
    def curve_metrics(self) -> tuple[str, ...]:  # the PNGs drawn every epoch; robustness.csv has them all
        return (self.success_metric, "mae", self.shift_metric)

    def __init__(
        self,
        net,
        loss: str = "l1",
        tau: float = 5.0,
        bands: Sequence[float] = (),
        target_mean: float | None = None,
        target_std: float | None = None,
        features_key: str = "features",
        **kwargs,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"module.loss must be one of {list(LOSSES)}, got {loss!r}")
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"module.tau must be a number of target units > 0, got {tau!r}")
        if target_std is not None and not target_std > 0:
            raise ValueError(f"module.target_std must be > 0, got {target_std!r}")
        self.loss_name, self.tau = loss, float(tau)
        self.bands = parse_bands(bands, key=self.bands_key)
        self.features_key = features_key
        super().__init__(net, **kwargs)
        # buffers: the standardisation travels with the checkpoint (eval.py needs the same scale)
        self.register_buffer("target_mean", torch.tensor(math.nan if target_mean is None else float(target_mean)))
        self.register_buffer("target_std", torch.tensor(math.nan if target_std is None else float(target_std)))

    # -- wiring to the data ---------------------------------------------------------------------
    def bind_data(self, datamodule) -> None:
        super().bind_data(datamodule)
        if torch.isnan(self.target_mean) or torch.isnan(self.target_std):
            names = self.datamodule_stats
            mean, std = (getattr(datamodule, name, None) for name in names)
            if mean is None or std is None:
                raise ValueError(f"module.target_mean / target_std are unset and the datamodule "
                                 f"({type(datamodule).__name__}) gives no {names[0]} / {names[1]} to standardise "
                                 f"the target with")
            self.target_mean.fill_(float(mean))
            self.target_std.fill_(max(float(std), 1e-6))
        if hasattr(self.net, "bind_features"):
            self.net.bind_features(getattr(datamodule, "num_features", None) if datamodule is not None
                                   else self.net.num_features)

    # -- the contract -------------------------------------------------------------------------
    def prediction(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        """The predicted target in its own units, ``(B,)``, fp32."""
        if hasattr(self.net, "fuse"):
            if self.features_key not in batch:
                raise KeyError(f"the hybrid model needs batch[{self.features_key!r}] (anatomical features); "
                               f"the batch has {sorted(batch)}")
            output = self.net.fuse(output, batch[self.features_key])
        if output.ndim != 2 or output.shape[1] != 1:
            raise ValueError(f"a regression network must output (B, 1), got {tuple(output.shape)}")
        return output.float().squeeze(1) * self.target_std + self.target_mean

    def error(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        """``prediction - target`` in target units, ``(B,)``."""
        return self.prediction(output, batch) - batch[self.label_key].float()

    def attack_loss(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        error = self.error(output, batch) / self.target_std
        if self.loss_name == "l1":
            return error.abs()
        if self.loss_name == "mse":
            return error ** 2
        return F.huber_loss(error, torch.zeros_like(error), reduction="none", delta=1.0)

    def is_correct(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.error(output, batch).abs() <= self.tau

    def example_captions(self, output: torch.Tensor, batch: dict, adversarial_output: torch.Tensor) -> list[str]:
        """The target, and the clean and adversarial predictions, per sample."""
        values = zip(batch[self.label_key].float().tolist(), self.prediction(output, batch).tolist(),
                     self.prediction(adversarial_output, batch).tolist())
        return [f"true {t:.1f}\nclean {c:.1f}\nadv {a:.1f}" for t, c, a in values]

    def correct_margin(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.tau - self.error(output, batch).abs()

    def output_divergence(self, clean_output: torch.Tensor, adversarial_output: torch.Tensor, batch: dict
                          ) -> torch.Tensor:
        """The squared change of the prediction on the standardised scale (the loss's): the network's output
        difference, after the hybrid model's fusion with the (unperturbed) features where it has one."""
        shift = self.prediction(adversarial_output, batch) - self.prediction(clean_output, batch)
        return (shift / self.target_std).square()

    def robust_metrics(self) -> dict:
        return regression_metrics(self.tau, self.bands, self.shift_metric)

    def clean_metrics(self) -> dict:
        shift = self.shift_metric  # the shift and its bands compare with the clean prediction: 0 on clean images
        return {name: metric for name, metric in self.robust_metrics().items()
                if name != shift and not name.startswith(shift + "_")}

    def metric_inputs(self, output, batch: dict, reference=None) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self.prediction(output, batch)
        reference_pred = pred if reference is None else self.prediction(reference, batch)
        return torch.stack([pred, reference_pred], dim=1), batch[self.label_key].float()
