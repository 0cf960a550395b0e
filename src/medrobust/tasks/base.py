"""The task contract: the only place that knows the task.

Attacks and callbacks talk to a task module through these members, so one callback serves every task
(classification, regression, segmentation, landmarks, detection):

``forward(x)``                      model output for images ``(B, C, *spatial)``
``attack_loss(output, batch)``      per-sample objective ``Tensor[B]`` an attacker maximizes
``is_correct(output, batch)``       per-sample success criterion ``BoolTensor[B]``
``correct_margin(output, batch)``   per-sample ``Tensor[B]``, > 0 exactly where ``is_correct`` (minimum-norm
                                    attacks: FMN, DeepFool, C&W); e.g. ``z_y - max_{j != y} z_j``, ``tau - |error|``
``output_divergence(clean_output, adversarial_output, batch)``  per-sample ``Tensor[B]``, >= 0 and 0 where the
                                    outputs agree: how far an output moved from the clean one (TRADES, MART)
``robust_metrics()``                fresh torchmetrics for clean and adversarial evaluation
``metric_inputs(output, batch, reference=None)``  the ``(preds, target)`` those metrics are updated with;
                                    ``reference``: the clean output when ``output`` is adversarial
``input_bounds``                    ``(low, high)`` of valid inputs, or ``None`` when unbounded
``intensity``                       native units (HU, raw MR) -> model units, for eps in native units
``train_objective``                 ``(module, batch) -> loss``; clean by default, replaced by adversarial training
``example_masks`` / ``example_captions(output, batch, adversarial_output)``  what the example grids draw over
                                    the images (label maps, points) and write under them (predicted classes)
``on_clean_validation(values)``     hook with the rank-reduced clean validation metrics, once per validation
                                    (``finish_clean_validation``): e.g. segmentation's tau from the clean Dice

Declared capabilities (class attributes with defaults; attacks, evaluation and reporting read them here, never
guess them from names):

``outputs_logits = True``           ``forward`` gives class logits, so classification losses (CE, DLR,
                                    targeted) apply; regression and other non-logit outputs set it False
``label_key = "label"``             the batch key of the ground truth
``success_metric = "accuracy"``     the metric that is the rate of ``is_correct`` (masking checks, the summary's
                                    "survives" sentences)
``bounded_metrics = ("accuracy",)`` metrics that live in [0, 1], whose curves get a fixed y-axis
``curve_metrics = None``            metrics (with their ``<metric>_<part>`` families) drawn as PNG curves every
                                    epoch; ``None``: all. Every metric is in robustness.csv either way
``shift_metric = None``             the metric of how far an attack moves the predictions on average (the summary
                                    says so per attack); ``None``: the task has none
``attacked_metrics = None``         the continuous metrics the task's ``attack_loss`` drives, which the
                                    ``weaker_attack_wins_<metric>`` check compares across attacks; ``None``: every
                                    metric with a ``higher_is_better`` direction (a metric the loss does not drive,
                                    such as segmentation's false-positive volume, may be beaten by a weaker attack
                                    without saying anything about the attack's strength)
``attack_objectives = {}``          named alternative losses an evaluation may have its attacks climb instead of
                                    ``attack_loss`` (``eval.objective=<name>``): name -> the name of a method
                                    ``(output, batch) -> Tensor[B]`` (a shape task's ``points``)
``class_names = None``              names of the label values (segmentation's label maps, classification's classes),
                                    for the example images' masks and captions; ``None``: the values themselves
``tau_metrics = ()``                the clean validation metrics whose rank-reduced values become the task's
                                    is-correct thresholds (seed 004's rule: segmentation's mean Dice, landmarks'
                                    loss tau, detection's per-term taus), kept in the ``validation_tau`` buffer
                                    (:meth:`RobustTask.register_validation_tau`), hence in checkpoints
"""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from medrobust.models.memory_format import apply_memory_format

MAX_NONFINITE_IN_A_ROW = 3  # consecutive optimizer steps with non-finite gradients that stop a run

TrainObjective = Callable[["RobustTask", dict], torch.Tensor]


CAPABILITIES = ("outputs_logits",)  # declared booleans that ``requires`` may name: False means lacking


def lacking(task: Any, requires: tuple[str, ...]) -> list[str]:
    """The members of ``requires`` (an attack's or defence's) that ``task`` (a module or its class) lacks: absent,
    or a declared capability (:data:`CAPABILITIES`) set False (``outputs_logits`` on a segmentation task). Other
    members count by presence alone (``include_background`` may be False and still there)."""
    return [member for member in requires
            if not hasattr(task, member) or (member in CAPABILITIES and getattr(task, member) is False)]


def compute_metrics(collection: MetricCollection) -> dict[str, torch.Tensor]:
    """``collection.compute()`` without the metrics marked ``skip_when_empty`` that saw no samples on any rank
    (a target band without samples computes NaN). A NaN from samples (a model gone to NaN) stays, for the run to
    show. Judged on synced values, so every rank drops the same keys (and syncs in the same order)."""
    values = collection.compute()
    prefix = collection.prefix or ""
    empty = {prefix + name for name, metric in collection.items(keep_base=True)
             if getattr(metric, "skip_when_empty", False) and torch.isnan(values[prefix + name])
             and _empty_on_every_rank(metric)}
    return {name: value for name, value in values.items() if name not in empty}


def _empty_on_every_rank(metric) -> bool:
    """A ``skip_when_empty`` metric's ``is_empty()`` on its states summed over the ranks."""
    with metric.sync_context():
        return bool(metric.is_empty())


def metric_collection(metrics: dict, prefix: str | None = None) -> MetricCollection:
    """The task's metrics as one collection. No compute groups: metrics over different subsets (target bands)
    can hold equal states after a first batch, and torchmetrics would then merge them for good."""
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def softmax_kl(clean_logits: torch.Tensor, adversarial_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(clean) || softmax(adversarial))`` over the classes (dim 1) of logits ``(B, K, *spatial)``, in
    fp32: ``(B, *spatial)``. Through log-softmaxes, so saturated logits give no ``0 * log 0`` NaN; its gradient
    w.r.t. the adversarial logits is ``softmax(adversarial) - softmax(clean)``."""
    log_clean = F.log_softmax(clean_logits.float(), dim=1)
    log_adversarial = F.log_softmax(adversarial_logits.float(), dim=1)
    return F.kl_div(log_adversarial, log_clean, reduction="none", log_target=True).sum(dim=1)


def clean_objective(module: "RobustTask", batch: dict) -> torch.Tensor:
    """The plain training loss: mean per-sample loss on the clean images."""
    return module.attack_loss(module(batch["image"]), batch).mean()


class RobustTask(L.LightningModule):
    """Base LightningModule implementing the training / evaluation loop around the task contract.

    Subclasses implement ``attack_loss``, ``is_correct``, ``robust_metrics`` and ``metric_inputs``.

    Args:
        net: the network, ``(B, C, *spatial) -> output``.
        optimizer: a partial optimizer factory taking the parameters (Hydra ``_partial_: true``).
        scheduler: optional partial LR-scheduler factory taking the optimizer.
        input_bounds: valid input range; ``None`` takes the datamodule's ``input_bounds`` at setup.
        memory_format: ``channels_last`` (default: convolution weights NHWC / NDHWC, faster on CPU and for mixed
            precision on GPU) or ``contiguous`` (:mod:`medrobust.models.memory_format`).
    """

    outputs_logits: bool = True
    label_key: str = "label"
    success_metric: str = "accuracy"
    bounded_metrics: tuple[str, ...] = ("accuracy",)  # the success metric is a rate
    curve_metrics: tuple[str, ...] | None = None
    shift_metric: str | None = None
    attacked_metrics: tuple[str, ...] | None = None
    class_names: list[str] | None = None
    attack_objectives: dict[str, str] = {}
    tau_metrics: tuple[str, ...] = ()

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        input_bounds: tuple[float, float] | None = None,
        memory_format: str = "channels_last",
    ) -> None:
        super().__init__()
        self.net = apply_memory_format(net, memory_format)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.input_bounds = tuple(input_bounds) if input_bounds is not None else None
        self.intensity = None
        self.train_objective: TrainObjective = clean_objective
        self.val_metrics = metric_collection(self.clean_metrics(), prefix="val/")
        self.test_metrics = metric_collection(self.clean_metrics(), prefix="test/")
        # the loss as a metric, not a logged float: Lightning's own mean of a float over DDP ranks holding unequal
        # sample counts divides by an integer-rounded mean count (1.5x too high on 2 ranks with 2 and 1 batches)
        self.eval_loss = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.nonfinite_steps = 0  # optimizer steps skipped for non-finite gradients, in this process
        self._nonfinite_in_a_row = 0

    # -- the contract -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x)

    def attack_loss(self, output: Any, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def is_correct(self, output: Any, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def correct_margin(self, output: Any, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def output_divergence(self, clean_output: Any, adversarial_output: Any, batch: dict) -> torch.Tensor:
        """Per-sample divergence ``(B,)`` of ``adversarial_output`` from ``clean_output`` (two outputs of
        :meth:`forward` for the same samples), in fp32: >= 0 (up to rounding), exactly 0 where they agree,
        differentiable in both.

        TRADES climbs it in its inner attack and trains it down; MART weighs it. It measures the prediction's
        stability in the task's own terms, needing no label: the KL between class distributions
        (classification, per voxel for segmentation), the squared change of the prediction (regression,
        landmarks).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement output_divergence(clean_output, "
                                  f"adversarial_output, batch), which adv=trades and adv=mart need")

    def robust_metrics(self) -> dict:
        raise NotImplementedError

    def example_masks(self, output: Any, batch: dict, adversarial_output: Any) -> dict[str, torch.Tensor] | None:
        """Label maps ``(B, *spatial)`` the example grids overlay on the images (name -> map), from the clean and
        adversarial outputs of one batch; ``None``: the task has none (classification, regression)."""
        return None

    def example_captions(self, output: Any, batch: dict, adversarial_output: Any) -> list[str] | None:
        """One caption per sample under the example grids' images: the truth and the clean and adversarial
        predictions, where a task's output says it in words or numbers (a class and its probability, an age);
        ``None``: none (the label maps or points say it)."""
        return None

    def clean_metrics(self) -> dict:
        """The metrics of the plain validation / test loops: ``robust_metrics`` without those that compare an
        adversarial prediction with the clean one (always 0 on clean images)."""
        return self.robust_metrics()

    def metric_inputs(self, output: Any, batch: dict, reference: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(preds, target)`` for the metrics; ``reference`` is the clean output for the same images when
        ``output`` is adversarial (metrics such as a regression's prediction shift compare the two)."""
        raise NotImplementedError

    # -- wiring to the data ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.bind_data(datamodule)

    def bind_data(self, datamodule) -> None:
        """Take what the task needs from the data (bounds, intensity window, ...); ``setup`` calls it, and so
        can code that uses the module without a trainer. ``None``: no datamodule."""
        if datamodule is None:
            return
        if self.input_bounds is None and getattr(datamodule, "input_bounds", None) is not None:
            self.input_bounds = tuple(datamodule.input_bounds)
        if self.intensity is None:
            self.intensity = getattr(datamodule, "intensity", None)

    # -- loops --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.train_objective(self, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]), sync_dist=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip a step whose gradients are not finite (a bf16 / fp16 overflow, a NaN loss), as fp16's gradient
        scaler does and bf16 has nothing to: its gradients are dropped, so the weights stay as they were. Each skip
        warns and counts (``train/nonfinite_steps``); ``MAX_NONFINITE_IN_A_ROW`` in a row stop the run, a model
        that has diverged. The gradients are already reduced across DDP ranks here, so every rank skips alike."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self._nonfinite_in_a_row = 0
            return
        for parameter in self.parameters():
            parameter.grad = None
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=False, on_epoch=True,
                 reduce_fx="max", sync_dist=False)
        if self._nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} optimizer steps in a row (up to step {self.global_step}) had non-finite "
                f"gradients: the model has diverged. Lower module.optimizer.lr, or train in trainer.precision=32")
        rank_zero_warn(f"optimizer step {self.global_step} skipped: non-finite gradients "
                       f"({self.nonfinite_steps} skipped in this run)")

    def _eval_step(self, batch: dict, metrics: MetricCollection, prefix: str) -> None:
        output = self(batch["image"])
        loss = self.attack_loss(output, batch).mean()
        metrics.update(*self.metric_inputs(output, batch))
        self.eval_loss[prefix].update(loss.detach(), weight=len(batch["image"]))
        self.log(f"{prefix}/loss", self.eval_loss[prefix], prog_bar=True, on_step=False, on_epoch=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self.finish_clean_validation()

    def finish_clean_validation(self) -> None:
        """Log this epoch's clean validation metrics and hand them to :meth:`on_clean_validation`, once: a callback
        that needs them before the module's ``on_validation_epoch_end`` (Lightning calls callbacks first) may call
        it earlier; the later call then does nothing. Every rank calls it (the metrics sync)."""
        if not any(metric.update_count for metric in self.val_metrics.values()):
            return  # finished already this epoch, or nothing was validated
        values = compute_metrics(self.val_metrics)
        self.log_dict(values, prog_bar=True)
        self.val_metrics.reset()
        self.on_clean_validation(values)

    def on_clean_validation(self, values: dict[str, torch.Tensor]) -> None:
        """Called with the rank-reduced clean validation metrics (``val/<metric>``) at the end of each validation,
        sanity check included. Here: the thresholds of :attr:`tau_metrics` are copied into ``validation_tau`` (not
        after the sanity check: an untrained model's values; not with a fixed ``tau``; not while a value is missing
        or not finite). The values are synced, so every rank sets the same thresholds."""
        if not self.tau_metrics or getattr(self, "fixed_tau", None) is not None:
            return
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        found = [values.get(f"val/{name}") for name in self.tau_metrics]
        if all(value is not None and bool(torch.isfinite(value)) for value in found):
            taus = torch.stack([value.float() for value in found]).reshape(self.validation_tau.shape)
            self.validation_tau.copy_(taus)

    def register_validation_tau(self) -> None:
        """The ``validation_tau`` buffer of :attr:`tau_metrics`: 0-d for one metric, ``(n,)`` for several; NaN until
        a clean validation measures it. A buffer, so checkpoints carry it to eval.py and resumes."""
        shape = () if len(self.tau_metrics) == 1 else (len(self.tau_metrics),)
        self.register_buffer("validation_tau", torch.full(shape, math.nan))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(compute_metrics(self.test_metrics))
        self.test_metrics.reset()

    def configure_optimizers(self):
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        optimizer = factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}
