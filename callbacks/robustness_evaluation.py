"""RobustnessEvaluation: metric vs attack strength at the end of validation epochs and at test time."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device
from torchmetrics import MeanMetric

from medrobust.attacks.core.base import CurveAttack, Perturbation
from medrobust.attacks.core.objectives import with_loss
from medrobust.attacks.core.seeding import derived_seed, run_seed, seeded
from medrobust.datamodules.sharding import batch_number
from medrobust.attacks.core.session import eval_mode
from medrobust.evaluation.gather import gather_in_order
from medrobust.evaluation.eps_units import EPS_UNITS, resolve_eps
from medrobust.evaluation.metric_curves import MetricCurve, collection_curves
from medrobust.evaluation.masking import MaskingFlag, check_metric_rows, check_rows, probe_model
from medrobust.evaluation.sensitivity import SensitivityCurve, check_drop, sensitivity_curve
from medrobust.evaluation.worst_case import CLEAN, EACH_EPS, FIRST_FAILURE, robustness_curve
from medrobust.callbacks.evaluation_files import write_examples, write_files, write_summary
from medrobust.reporting import format_eps
from medrobust.reporting.examples import Example
from medrobust.reporting.robustness import radius_rows
from medrobust.reporting.sensitivity import sensitivity_rows
from medrobust.tasks.base import compute_metrics, lacking, metric_collection

log = logging.getLogger("medrobust")


def _cell(row: dict) -> tuple:
    return row["epoch"], row["split"], row["attack"], row["eps"], row["metric"]


def _metrics_for(kind: str, metrics: dict, success: str) -> dict:
    """The success metric alone for the first-failure points, every other metric for the worst-loss points (each
    metric computed once per cell: HD95 on 3-D volumes is not cheap)."""
    return {name: metric for name, metric in metrics.items() if (name == success) == (kind == "success")}


def _example(pl_module, attack, eps: float, x, x_adv, clean_output, batch, forward_context) -> Example:
    """The example grid's batch on the CPU, with the task's label maps or points (ground truth, clean and
    adversarial prediction) and the attack's marks (its targets), and the task's captions."""
    with torch.no_grad(), forward_context():
        adversarial_output = pl_module(x_adv)
        masks = pl_module.example_masks(clean_output, batch, adversarial_output)
        marks = attack.example_marks(pl_module, clean_output, batch)
        captions = pl_module.example_captions(clean_output, batch, adversarial_output)
    masks = {**(masks or {}), **marks} or None
    masks = None if masks is None else {name: mask.detach().cpu() for name, mask in masks.items()}
    return Example(eps, x.detach().cpu(), x_adv.detach().cpu(), masks, captions)


def _check_eps(eps, key: str) -> list[float]:
    """An eps list, 0 (the clean point that anchors every curve) added, sorted."""
    values = [float(e) for e in eps] if isinstance(eps, Sequence) and not isinstance(eps, str) else None
    if not values or any(e < 0 for e in values):
        raise ValueError(f"{key} must be a non-empty list of values >= 0, got {eps!r}")
    return sorted(set(values) | {0.0})


def _attack_eps(attack_eps: Mapping[str, Sequence[float]] | None, names: Mapping[str, str]) -> dict[str, list[float]]:
    """``eval.attack_eps``: an attack's own eps list (an L2 attack beside Linf ones), keyed by the attack's config
    name (``pgd_l2``) or its label (``pgd10_l2``); returned by label."""
    own = {}
    for key, eps in (attack_eps or {}).items():
        label = names.get(key, key)
        if label not in names.values():
            known = sorted({*names, *names.values()})
            raise ValueError(f"eval.attack_eps.{key}: no attack of that name in eval.attacks; there: {known}")
        own[label] = _check_eps(eps, f"eval.attack_eps.{key}")
    return own


def _check_sensitivity(drop: float | None, attacks: dict[str, object], eps_unit: str) -> float | None:
    """``eval.sensitivity_drop`` checked against the attacks and the eps unit. An error, not a warning, where
    nothing can honour it: a run that asked for the analysis must not finish without it unnoticed."""
    drop = check_drop(drop)
    if drop is not None and not any(isinstance(attack, CurveAttack) for attack in attacks.values()):
        raise ValueError(f"eval.sensitivity_drop={drop} needs a curve attack for per-sample radii (eval=curve or "
                         f"curve_l1); {sorted(attacks)} have none: set eval.sensitivity_drop=null")
    if drop is not None and eps_unit == "range":  # radii are in model units; a range eps differs per image
        raise ValueError("eval.sensitivity_drop needs eval.eps_unit model or native, got 'range'")
    return drop


@dataclass
class Evaluation:
    """What one evaluation found: result rows, the example images, minimum-norm radii per attack, the batch the
    masking probes use, per attack which kind of point its continuous metrics were read at, the accuracy
    without the most sensitive samples per curve attack, and the curves metrics draw per cell (a FROC)."""

    rows: list[dict] = field(default_factory=list)
    examples: dict[str, Example] = field(default_factory=dict)  # attack -> its first batch at its largest eps
    radii: dict[str, torch.Tensor] = field(default_factory=dict)
    probe_batch: tuple | None = None
    points: dict[str, str] = field(default_factory=dict)
    sensitivity: dict[str, SensitivityCurve] = field(default_factory=dict)
    # (attack, eps) -> metric -> (its curve, the kind of points it was read at): a detector's FROC
    curves: dict[tuple[str, float], dict[str, tuple[MetricCurve, str]]] = field(default_factory=dict)


class RobustnessEvaluation(Callback):
    """Attack the model at several eps after every ``every_n_epochs``-th validation epoch and at test time.

    Each DDP rank attacks its own whole batches of the split (the datamodule's sharded loaders,
    :mod:`medrobust.datamodules.sharding`), batch ``k`` seeded as batch ``k`` of one process, so the rows do not
    depend on the number of processes; metrics reduce across ranks through torchmetrics, and rank 0 writes ``robustness.csv`` (one row per epoch x split x attack x eps x
    metric, with the kind of point the metric was read at), ``curves/<attack>_<metric>.png`` (one line per epoch)
    and, at test time, ``summary.md``.

    Args:
        attacks: attack objects (``medrobust.attacks.FGSM``, ``PGD``, ...), as a list or a name->attack map.
        eps: attack strengths; 0 is the clean evaluation.
        attack_eps: an attack's own strengths instead of ``eps``, by its config name or label (e.g. L2 PGD's eps
            in the same evaluation as Linf attacks). The masking checks compare only attacks of the same norm.
        eps_unit: ``model`` (input scale), ``native`` (e.g. HU, through the datamodule's window) or
            ``range`` (a fraction of each image's intensity range).
        every_n_epochs: evaluate after every n-th validation epoch.
        max_batches: at most this many validation batches, the first of the one-process order, shared out among
            the ranks; under DDP rounded up to a multiple of the number of ranks, so each evaluates one at least
            (``None``: all).
        test_max_batches: the same for the test split (``None``: all).
        output_dir: where files go; default the trainer's ``default_root_dir``.
        probe_splits: splits whose evaluation also probes the model for gradient masking on its first batch
            (zero / non-finite input gradients, randomness, accuracy surviving a huge eps). The checks on
            the result rows (curves rising with eps, a weaker or black-box attack beating a stronger
            white-box one) run on every evaluation. A flagged evaluation carries its flags in every row of
            ``robustness.csv``, in ``summary.md`` and in a warning. Another attack in the strongest
            error-seeking attack's threat model reaching a worse continuous metric is flagged
            ``weaker_attack_wins_<metric>``.
        worst_case: read continuous metrics (MAE, Dice, AUROC, ...) at each attack's worst-loss points: its
            full-budget form at every eps on every sample, the highest task loss kept
            (:mod:`medrobust.evaluation.worst_case`); accuracy stays at the cheap first-failure points.
            ``False``: every metric at the first-failure points, rows labelled ``points=first_failure``
            (cheaper; not worst case for continuous metrics).
        seed: seeds the attacks' random draws per (split, batch, attack), so the same weights get the same
            rows whenever they are evaluated (a resumed run included); ``None``: the run's seed.
        sensitivity_drop: after each evaluation, set aside this fraction of the samples with the smallest radius
            (per curve attack: the most sensitive to attack) and report the accuracy of the rest at each eps
            (:mod:`medrobust.evaluation.sensitivity`): ``accuracy_sensitive_removed`` rows, a PNG
            ``curves/<split>_<attack>_accuracy_sensitive_removed.png`` and a ``summary.md`` section. ``None``, 0: off.
        objective: what the attacks climb and the worst-loss points maximize: ``None``, the task's ``attack_loss``
            (its training loss), or the name of one of the task's declared ``attack_objectives`` (a shape task's
            ``points``: the summed squared point error, seed 002's attack); correctness stays the task's own.
    """

    def __init__(
        self,
        attacks: Mapping[str, object] | Sequence[object],
        eps: Sequence[float] = (0.0, 0.001, 0.002, 0.004, 0.008),
        attack_eps: Mapping[str, Sequence[float]] | None = None,
        eps_unit: str = "model",
        every_n_epochs: int = 1,
        max_batches: int | None = 4,
        test_max_batches: int | None = None,
        output_dir: str | None = None,
        probe_splits: Sequence[str] = ("test",),
        worst_case: bool = True,
        seed: int | None = None,
        sensitivity_drop: float | None = None,
        objective: str | None = None,
    ) -> None:
        attack_list = list(attacks.values()) if isinstance(attacks, Mapping) else list(attacks)
        if not attack_list:
            raise ValueError("RobustnessEvaluation needs at least one attack in `attacks`")
        self.eps = _check_eps(eps, "eval.eps")
        if eps_unit not in EPS_UNITS:
            raise ValueError(f"eval.eps_unit must be one of {EPS_UNITS}, got {eps_unit!r}")
        if every_n_epochs < 1:
            raise ValueError(f"eval.every_n_epochs must be >= 1, got {every_n_epochs!r}")
        for key, value in (("max_batches", max_batches), ("test_max_batches", test_max_batches)):
            if value is not None and value < 1:
                raise ValueError(f"eval.{key} must be >= 1 or null (all batches), got {value!r}")
        for attack in attack_list:
            if not isinstance(attack, Perturbation):
                raise TypeError(f"eval.attacks must be attacks or corruptions (medrobust.attacks.Attack, "
                                f"medrobust.evaluation.Corruption), got {attack!r}")
        labels = [attack.label for attack in attack_list]
        if len(set(labels)) != len(labels):
            raise ValueError(f"eval.attacks must have distinct names, got {labels}")
        self.attacks = dict(zip(labels, attack_list))
        for label, attack in self.attacks.items():
            if attack.norm == "l0" and eps_unit != "model":
                raise ValueError(f"eval.eps_unit={eps_unit!r}: {label} counts changed input values (L0), which have "
                                 f"no native or range units; use eval.eps_unit=model")
        names = dict(zip(attacks, labels)) if isinstance(attacks, Mapping) else {label: label for label in labels}
        self.attack_eps = _attack_eps(attack_eps, names)
        self.sensitivity_drop = _check_sensitivity(sensitivity_drop, self.attacks, eps_unit)
        self.eps_unit = eps_unit
        self.every_n_epochs = every_n_epochs
        self.max_batches = max_batches
        self.test_max_batches = test_max_batches
        self.output_dir = output_dir
        self.probe_splits = tuple(probe_splits)
        self.flags: dict[tuple[str, int], list] = {}  # (split, epoch) -> gradient-masking flags
        self.history: list[dict] = []
        self.worst_case = bool(worst_case)
        self.seed = seed
        self.objective = objective
        self.last: Evaluation | None = None  # the latest evaluation's examples and radii, for the files
        self._checkpoint_epoch: int | None = None  # the epoch of the checkpoint a test run loaded

    @property
    def state_key(self) -> str:
        own = {"attack_eps": tuple((label, tuple(eps)) for label, eps in self.attack_eps.items())} if self.attack_eps else {}
        own.update({"objective": self.objective} if self.objective else {})
        return self._generate_state_key(attacks=tuple(self.attacks), eps=tuple(self.eps), eps_unit=self.eps_unit, **own)

    def eps_of(self, label: str) -> list[float]:
        """The attack's strengths, 0 first: its own ``attack_eps`` or the evaluation's ``eps``."""
        return self.attack_eps.get(label, self.eps)

    def state_dict(self) -> dict:
        # plain values only (checkpoints are read back with torch.load(weights_only=True))
        return {"history": [dict(row) for row in self.history],
                "flags": [[split, epoch, flag.name, flag.message] for (split, epoch), flags in self.flags.items()
                          for flag in flags]}

    def load_state_dict(self, state_dict: dict) -> None:
        # A resume starts empty and takes the checkpoint's history: rows of later epochs that a killed run wrote
        # to robustness.csv are not in it, and are evaluated again and replaced. Testing the best checkpoint after
        # fit also loads callback states: rows from later epochs already in memory must survive that.
        loaded = [dict(row) for row in state_dict.get("history", [])]
        seen = {_cell(row) for row in loaded}
        self.history = loaded + [row for row in self.history if _cell(row) not in seen]
        flags: dict[tuple[str, int], list[MaskingFlag]] = {}
        for split, epoch, name, message in state_dict.get("flags", []):
            flags.setdefault((split, epoch), []).append(MaskingFlag(name, message))
        self.flags = {**flags, **self.flags}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._checkpoint_epoch = checkpoint.get("epoch")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._checkpoint_epoch = None  # a test after fit without a checkpoint tests the final weights

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        missing = [m for m in ("attack_loss", "is_correct", "robust_metrics", "metric_inputs") if not hasattr(pl_module, m)]
        if missing:
            raise TypeError(f"RobustnessEvaluation needs a task module implementing the task contract; "
                            f"{type(pl_module).__name__} lacks {missing}")
        for label, attack in self.attacks.items():
            missing = lacking(pl_module, attack.requires)
            if missing:
                raise TypeError(f"eval.attacks: {label} needs a task module with {missing}; "
                                f"{type(pl_module).__name__} lacks them (a regression-only attack on another task?)")
        if hasattr(pl_module, "bind_data"):  # callbacks set up before the module: its window may not be bound yet
            pl_module.bind_data(getattr(trainer, "datamodule", None))
        if self.objective is not None:
            offered = getattr(pl_module, "attack_objectives", {})
            if self.objective not in offered:
                raise ValueError(f"eval.objective={self.objective!r}: {type(pl_module).__name__} offers "
                                 f"{sorted(offered) or 'none'} (null: the task's own attack_loss)")
        if self.eps_unit == "native" and getattr(pl_module, "intensity", None) is None:
            raise ValueError("eval.eps_unit=native needs an intensity window from the datamodule; this one has none")

    def objective_of(self, pl_module: LightningModule):
        """What the attacks climb: the task module itself, or it seen through ``eval.objective``'s loss."""
        if self.objective is None:
            return pl_module
        return with_loss(pl_module, getattr(pl_module, pl_module.attack_objectives[self.objective]))

    def run_dir(self, trainer: Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir)

    # -- hooks ----------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        # the task's clean metrics first (callbacks run before the module's hook): a task whose success threshold
        # comes from this validation (segmentation's tau) must be judged with this epoch's value
        pl_module.finish_clean_validation()
        self._run(trainer, pl_module, trainer.val_dataloaders, "val", self.max_batches)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run(trainer, pl_module, trainer.test_dataloaders, "test", self.test_max_batches)
        write_examples(self, trainer, "test")
        write_summary(self, trainer)

    def _run(self, trainer, pl_module, loaders, split: str, max_batches: int | None) -> None:
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        # test rows carry the epoch of the weights under test (the best checkpoint's, not the last)
        epoch = self._checkpoint_epoch if split == "test" and self._checkpoint_epoch is not None else trainer.current_epoch
        self.last = result = self.evaluate(pl_module, loader, split=split, epoch=epoch, max_batches=max_batches,
                                           precision=trainer.precision_plugin)
        rows = result.rows
        with seeded(derived_seed("masking_probe", run_seed(self.seed), split), pl_module.device):
            flags = self._masking_flags(pl_module, result, split)
        self.flags[split, epoch] = flags
        rows += self._sensitivity_rows(pl_module, result, split, epoch)
        for row in rows:
            row["flags"] = ";".join(flag.name for flag in flags)
        if flags and trainer.is_global_zero:
            log.warning("gradient masking suspected in the %s evaluation at epoch %d: %s", split, epoch,
                        "; ".join(flag.message for flag in flags))
        for row in rows:
            key = f"robust_{split}/{row['attack']}/{row['metric']}_eps{format_eps(row['eps'])}"
            pl_module.log(key, row["value"], sync_dist=False)  # already reduced across ranks
        pl_module.log(f"robust_{split}/masking_flags", float(len(flags)), sync_dist=False)
        for label, radii in result.radii.items():
            rows += radius_rows(radii.tolist(), epoch=epoch, split=split, attack=label,
                                norm=self.attacks[label].norm, eps_unit="model")
        self.history = [r for r in self.history if not (r["split"] == split and r["epoch"] == epoch)] + rows
        if trainer.is_global_zero:
            write_files(self, trainer, split)

    def _sensitivity_rows(self, pl_module, result: Evaluation, split: str, epoch: int) -> list[dict]:
        """Rows of the accuracy without the most sensitive samples; the curves kept on ``result`` for the files."""
        if self.sensitivity_drop is None:
            return []
        rows = []
        for label, radii in result.radii.items():
            eps = self.eps_of(label)
            thresholds = [resolve_eps(e, self.eps_unit, intensity=pl_module.intensity) for e in eps]
            curve = sensitivity_curve(radii.cpu(), eps, self.sensitivity_drop, thresholds=thresholds)
            result.sensitivity[label] = curve
            rows += sensitivity_rows(curve, epoch=epoch, split=split, attack=label, norm=self.attacks[label].norm,
                                     eps_unit=self.eps_unit)
        return rows

    def _masking_flags(self, pl_module, result: Evaluation, split: str) -> list[MaskingFlag]:
        # the checks assume each attack tries to make samples wrong: not corruptions, not prediction shifts
        adversarial = [label for label, attack in self.attacks.items() if attack.seeks_errors]
        flags = []
        for norm in dict.fromkeys(self.attacks[label].norm for label in adversarial):  # attacks compare within a norm
            flags += self._norm_flags(pl_module, result, [a for a in adversarial if self.attacks[a].norm == norm])
        flags += [MaskingFlag("black_box_wins", message) for attack in self.attacks.values()
                  for message in attack.black_box_wins()]
        if split in self.probe_splits and result.probe_batch is not None and adversarial:
            x, batch = result.probe_batch
            norm = self.attacks[adversarial[0]].norm
            # the probes test the model, not the threat model: L1 evaluations probe in Linf, because PGD-L1 at a
            # huge eps stalls on real CNNs (0.45 accuracy at eps 8 and 16 on the LIDC model, where FMN-L1 leaves
            # 0.23 and 0) and would flag a model that is fine
            with eval_mode(pl_module), torch.inference_mode(False), torch.enable_grad():
                flags += probe_model(pl_module, x, batch, self.objective_of(pl_module), norm="l2" if norm == "l2" else "linf",
                                     bounds=pl_module.input_bounds)
        return flags

    def _norm_flags(self, pl_module, result: Evaluation, adversarial: list[str]) -> list[MaskingFlag]:
        """The result-row checks among the error-seeking attacks of one threat model."""
        black_box = [label for label in adversarial if self.attacks[label].black_box]
        order = [label for label in adversarial if not self.attacks[label].targeted]  # cheapest first
        flags = check_rows([row for row in result.rows if row["attack"] in adversarial], attack_order=order,
                           black_box=black_box, metric=pl_module.success_metric)
        white_box = [label for label in order if label not in black_box]
        if white_box:  # any other attack in its threat model beating the strongest on a continuous metric
            directions = {name: metric.higher_is_better for name, metric in pl_module.robust_metrics().items()
                          if pl_module.attacked_metrics is None or name in pl_module.attacked_metrics}
            flags += check_metric_rows(result.rows, strongest=white_box[-1], directions=directions,
                                       skip=[pl_module.success_metric])
        return flags

    # -- the evaluation -------------------------------------------------------------------------
    def evaluate(self, pl_module, loader, *, split: str, epoch: int, max_batches: int | None,
                 precision=None) -> "Evaluation":
        """Attack ``max_batches`` batches of ``loader`` at every (attack, eps); rows reduced across ranks.

        The success metric (accuracy) is read at each attack's first-failure points, every other metric at its
        worst-loss points where the attack has a full-budget form (``worst_case``); each row's ``points`` says
        which (:mod:`medrobust.evaluation.worst_case`)."""
        device = pl_module.device
        trainer = getattr(pl_module, "_trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        success = pl_module.success_metric
        cells = {(label, eps, kind): metric_collection(_metrics_for(kind, pl_module.robust_metrics(), success)).to(device)
                 for label in self.attacks for eps in self.eps_of(label) if eps > 0 for kind in ("success", "other")}
        clean = metric_collection(pl_module.robust_metrics()).to(device)
        forward_context = precision.forward_context if precision is not None else nullcontext
        objective = self.objective_of(pl_module)
        result = Evaluation()
        for attack in self.attacks.values():
            attack.reset_stats()
        radii: dict[str, list[torch.Tensor]] = {}
        # Lightning runs validation under inference mode; attacks need gradients w.r.t. the input.
        with eval_mode(pl_module), torch.inference_mode(False), torch.enable_grad():
            # the attacks' own metrics update in place: their states must not be inference tensors
            extra = {(label, eps): metric_collection({name: MeanMetric() for name in attack.extra_metrics}).to(device)
                     for label, attack in self.attacks.items() if attack.extra_metrics for eps in self.eps_of(label)
                     if eps > 0}
            # a multiple of the ranks, so that every rank evaluates a batch: a rank without one would meet the
            # others' metric syncs with empty states of another shape
            limit = None if max_batches is None else -(-max_batches // world_size) * world_size
            for index, batch in enumerate(loader):
                number = batch_number(index, rank, world_size)  # the batch's place in the one-process order
                if limit is not None and number >= limit:
                    break
                batch = move_data_to_device(batch, device)
                x = batch["image"].clone()
                if number == 0:
                    result.probe_batch = (x, batch)
                with torch.no_grad(), forward_context():
                    clean_output = pl_module(x)
                    clean.update(*pl_module.metric_inputs(clean_output, batch))
                for label, attack in self.attacks.items():
                    attacked_eps = [eps for eps in self.eps_of(label) if eps > 0]
                    eps_model = [resolve_eps(eps, self.eps_unit, intensity=pl_module.intensity, x=x)
                                 for eps in attacked_eps]
                    # the same draws for the same weights, whatever ran before (a resume, another evaluation)
                    seed = derived_seed("robustness", run_seed(self.seed), split, number, label)
                    with forward_context(), seeded(seed, device):
                        curve = robustness_curve(attack, pl_module, x, batch, objective, eps_values=eps_model,
                                                 bounds=pl_module.input_bounds, worst_case=self.worst_case)
                    result.points[label] = curve.worst_kind
                    if isinstance(attack, CurveAttack) and attack.last_radii is not None:
                        radii.setdefault(label, []).append((number, attack.last_radii.float()))
                    for eps, success_point, worst_point in zip(attacked_eps, curve.first_failure, curve.worst):
                        pairs = [("success", success_point), ("other", worst_point)]
                        with torch.no_grad(), forward_context():
                            output = None
                            for kind, point in pairs:
                                # one forward where both kinds are the same points (no full-budget form, no errors sought)
                                output = output if kind == "other" and point is success_point else pl_module(point)
                                cells[label, eps, kind].update(*pl_module.metric_inputs(output, batch,
                                                                                        reference=clean_output))
                                if kind == "success" and attack.extra_metrics:  # the attack's own, at its points
                                    for name, values in attack.extra_values(pl_module, output, clean_output,
                                                                            batch).items():
                                        extra[label, eps][name].update(values)
                        if number == 0 and eps == attacked_eps[-1]:
                            result.examples[label] = _example(pl_module, attack, eps, x, worst_point, clean_output,
                                                              batch, forward_context)
        # every rank gathers every curve attack's radii (a rank may have had no batch), in the same order
        curve_labels = [label for label, attack in self.attacks.items() if isinstance(attack, CurveAttack)]
        gathered = {label: gather_in_order(pl_module, radii.get(label, []), device) for label in curve_labels}
        result.radii = {label: values for label, values in gathered.items() if values.numel()}
        if world_size > 1:
            for attack in self.attacks.values():  # every rank, in the same order: the tallies sum across ranks
                attack.sum_stats(lambda counts: trainer.strategy.reduce(counts.to(device), reduce_op="sum").cpu())
        clean_values = compute_metrics(clean)  # every rank computes in the same order: torchmetrics syncs here
        clean_curves = collection_curves(clean)
        order = list(pl_module.robust_metrics())
        for label, attack in self.attacks.items():
            for eps in self.eps_of(label):
                if eps == 0:
                    values = {m: (v, CLEAN) for m, v in clean_values.items()}
                    result.curves[label, eps] = {m: (curve, CLEAN) for m, curve in clean_curves.items()}
                else:
                    worst_kind = result.points.get(label, FIRST_FAILURE)
                    kinds = {"success": EACH_EPS if worst_kind == EACH_EPS else FIRST_FAILURE, "other": worst_kind}
                    found = {m: (v, kinds[kind]) for kind in ("success", "other")
                             for m, v in compute_metrics(cells[label, eps, kind]).items()}
                    result.curves[label, eps] = {m: (curve, kinds[kind]) for kind in ("success", "other")
                                                 for m, curve in collection_curves(cells[label, eps, kind]).items()}
                    values = {m: found[m] for m in order if m in found}  # rows in the task's metric order
                    if (label, eps) in extra:  # then the attack's own metrics
                        values.update({m: (v, kinds["success"]) for m, v in compute_metrics(extra[label, eps]).items()})
                result.rows.extend(
                    {"epoch": epoch, "split": split, "attack": label, "norm": attack.norm, "eps": eps,
                     "eps_unit": self.eps_unit, "metric": metric, "value": float(value), "points": points}
                    for metric, (value, points) in values.items()
                )
        return result
