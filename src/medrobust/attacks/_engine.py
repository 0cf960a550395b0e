"""Machinery shared by every attack: the model session, fp32 objective, gradients, best points, active sets.

An attack is written against an *objective* with two per-sample methods (the task modules implement them):

- ``objective.attack_loss(output, batch) -> Tensor[B]``: what the attacker maximizes;
- ``objective.is_correct(output, batch) -> BoolTensor[B]``: whether the model is still right.

``batch`` is a MONAI-style dict; attacks perturb the images ``x`` passed separately and never read
``batch["image"]``. Per-sample entries of ``batch`` are selected with :func:`index_batch` whenever an attack
works on a subset of the samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from medrobust.attacks._frozen_norm import frozen_norm_gradients
from medrobust.attacks.base import check_positive
from medrobust.attacks.threat import (
    ThreatModel,
    ascent_direction,
    batch_view,
    constrain,
    random_in_ball,
    room_along,
    sparse_l1_step,
)

Index = slice | Tensor | list | int


# -- batches -----------------------------------------------------------------------------------------
def index_batch(batch: Mapping, idx: Index, batch_size: int | None = None) -> dict:
    """Select samples ``idx`` of a batch dict.

    Tensors whose leading dim is the batch size and lists / tuples of that length are indexed (nested dicts,
    e.g. MONAI meta dicts, recursively); everything else passes through untouched.

    Args:
        batch: ``{"image": Tensor[B, C, *spatial], "label": ..., ...}``.
        idx: a slice, a bool mask ``(B,)``, or integer indices (tensor or list; repeats allowed).
        batch_size: ``B``; by default ``len(batch["image"])``.
    """
    if batch_size is None:
        if "image" not in batch:
            raise ValueError(f"index_batch needs batch_size= for a batch without 'image' (keys: {list(batch)})")
        batch_size = len(batch["image"])
    return _index_tree(dict(batch), _as_index(idx, batch_size), batch_size)


def _as_index(idx: Index, batch_size: int) -> slice | Tensor:
    if isinstance(idx, slice):
        return idx
    if isinstance(idx, int):
        idx = [idx]
    idx = torch.as_tensor(idx)
    if idx.dtype == torch.bool:
        if idx.shape != (batch_size,):
            raise ValueError(f"a bool mask must have shape ({batch_size},), got {tuple(idx.shape)}")
        return idx.nonzero().flatten()
    return idx.long().flatten()


def _index_tree(value: Any, index: slice | Tensor, batch_size: int) -> Any:
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
        return value[index if isinstance(index, slice) else index.to(value.device)]
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        picked = value[index] if isinstance(index, slice) else [value[i] for i in index.tolist()]
        return type(value)(picked) if isinstance(value, tuple) else list(picked)
    if isinstance(value, Mapping):
        return {key: _index_tree(item, index, batch_size) for key, item in value.items()}
    return value


def _normal_tensors(value: Any) -> Any:
    """Clone inference tensors (e.g. a batch collated under ``inference_mode``) so autograd may save them."""
    if isinstance(value, Tensor):
        if value.is_inference():
            with torch.inference_mode(False):
                return value.clone()
        return value
    if isinstance(value, Mapping):
        return {key: _normal_tensors(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(item, (Tensor, Mapping, list, tuple)) for item in value):
        return _rebuild(value, [_normal_tensors(item) for item in value])
    return value


def _rebuild(sequence: list | tuple, items: list) -> list | tuple:
    """``items`` in the container type of ``sequence`` (list, tuple or namedtuple)."""
    if hasattr(sequence, "_fields"):
        return type(sequence)(*items)
    return type(sequence)(items) if isinstance(sequence, tuple) else list(items)


def prepare(x: Tensor, batch: Mapping) -> tuple[Tensor, dict]:
    """Detached, non-inference copies of the images ``(B, C, *spatial)`` and of the batch's tensors."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"attacks perturb floating-point images, got {getattr(x, 'dtype', type(x))}")
    return _normal_tensors(x.detach()), _normal_tensors(dict(batch))


# -- the model session -------------------------------------------------------------------------------
def _as_module(model: Callable) -> nn.Module | None:
    if isinstance(model, nn.Module):
        return model
    owner = getattr(model, "__self__", None)  # a bound method such as net.forward
    return owner if isinstance(owner, nn.Module) else None


@contextmanager
def attack_session(model: Callable, *, bn_eval: bool = True, dropout_eval: bool = True) -> Iterator[None]:
    """Grad-enabled, non-inference context in which the model is attacked; undone exactly on exit.

    - normalization layers with running statistics (BatchNorm, InstanceNorm) in eval mode when ``bn_eval``:
      the attack must not move the statistics, and samples stay independent (per-sample gradients);
    - dropout in eval mode when ``dropout_eval``: a deterministic objective, so a sample recorded as
      misclassified stays misclassified;
    - parameters' ``requires_grad`` switched off, so no graph is built for them (their ``.grad`` is never
      touched anyway);
    - batch norm layers on running statistics back-propagate with one multiply
      (:func:`~medrobust.attacks._frozen_norm.frozen_norm_gradients`; same outputs, far cheaper backward);
    - on exit, every submodule's ``training`` flag and every ``requires_grad`` flag are put back as they were.

    A plain callable that is not an ``nn.Module`` (nor a bound method of one) only gets the grad modes.
    Toggling ``requires_grad`` makes a ``torch.compile``-d model recompile once for the attack.
    With ``bn_eval=False`` and train-mode BatchNorm, samples interact and the statistics move; with
    SyncBatchNorm, early stopping would then desynchronize ranks, so keep ``bn_eval`` under DDP.
    """
    module = _as_module(model)
    with torch.inference_mode(False), torch.enable_grad():
        if module is None:
            yield
            return
        modes = [(m, m.training) for m in module.modules()]
        frozen = [p for p in module.parameters() if p.requires_grad]
        try:
            for m in module.modules():
                if (bn_eval and isinstance(m, _NormBase)) or (dropout_eval and isinstance(m, _DropoutNd)):
                    m.training = False
            for p in frozen:
                p.requires_grad_(False)
            with frozen_norm_gradients(module):
                yield
        finally:
            for p in frozen:
                p.requires_grad_(True)
            for m, mode in modes:
                m.training = mode


# -- the objective in fp32 ---------------------------------------------------------------------------
def _float32(value: Any) -> Any:
    """Half / bfloat16 tensors (anywhere in a tuple, list or dict) cast to float32."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, Mapping):
        return {key: _float32(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return _rebuild(value, [_float32(item) for item in value])
    return value


def _no_autocast(device_type: str):
    available = getattr(torch.amp, "is_autocast_available", lambda _: device_type in ("cpu", "cuda"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else nullcontext()


def objective_values(model: Callable, objective: Any, x_adv: Tensor, batch: dict) -> tuple[Tensor, Tensor]:
    """Per-sample loss ``(B,)`` and correctness ``(B,)`` at ``x_adv`` ``(B, C, *spatial)``.

    The forward runs under the caller's autocast; the objective sees a float32 output with autocast off.
    """
    output = model(x_adv)
    with _no_autocast(x_adv.device.type):
        output = _float32(output)
        loss = objective.attack_loss(output, batch)
        with torch.no_grad():
            correct = objective.is_correct(output, batch)
    size = x_adv.shape[0]
    for what, value in (("attack_loss", loss), ("is_correct", correct)):
        if not isinstance(value, Tensor) or value.shape != (size,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"objective.{what} must return one value per sample, shape ({size},); got {shape}")
    return loss, correct.bool()


def loss_and_grad(model: Callable, objective: Any, x_adv: Tensor, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Loss ``(B,)``, its gradient w.r.t. the input ``(B, C, *spatial)`` and correctness ``(B,)`` at ``x_adv``.

    The gradient is taken with ``torch.autograd.grad`` w.r.t. a fresh leaf ``x_adv`` (the same as w.r.t. the
    perturbation ``x_adv - x``); parameters are never differentiated and their ``.grad`` is never written.
    """
    x_adv = x_adv.detach().requires_grad_(True)
    loss, correct = objective_values(model, objective, x_adv, batch)
    if not loss.requires_grad:
        raise RuntimeError("objective.attack_loss does not depend on the input (no gradient to follow); "
                           "was it computed under no_grad or from a detached output?")
    (grad,) = torch.autograd.grad(loss.sum(), x_adv, allow_unused=True)
    return loss.detach(), torch.zeros_like(x_adv) if grad is None else grad, correct


# -- steps -------------------------------------------------------------------------------------------
def per_sample_step(step_size: float | Tensor | None, rel_step_size: float | None, eps: Tensor,
                    rel_default: float) -> Tensor:
    """Step size ``(B,)``: absolute ``step_size`` (float or ``(B,)``), else ``rel_step_size * eps``, else
    ``rel_default * eps``. A relative step keeps its ratio to eps under eps schedules and per-sample eps."""
    if step_size is not None and rel_step_size is not None:
        raise ValueError(f"give step_size or rel_step_size, not both; got {step_size!r} and {rel_step_size!r}")
    if step_size is None:
        return check_positive("rel_step_size", rel_default if rel_step_size is None else rel_step_size) * eps
    if isinstance(step_size, Tensor):
        if bool((step_size <= 0).any()):
            raise ValueError(f"step_size must be > 0, got {step_size.tolist()}")
        return step_size.detach().to(eps).expand_as(eps).clone()
    return torch.full_like(eps, check_positive("step_size", step_size))


def ascent_step(x_adv: Tensor, grad: Tensor, norm: str, step: Tensor, *, l1_width: int = 1,
                bounds: tuple[float, float] | None = None) -> Tensor:
    """One steepest-ascent step of size ``step`` ``(B,)`` in the geometry of ``norm`` (not yet projected).

    L1: spread over the ``l1_width`` coordinates of largest gradient, none moved past ``bounds``
    (:func:`~medrobust.attacks.threat.sparse_l1_step`)."""
    if norm == "l1":
        return x_adv + sparse_l1_step(grad, step, l1_width, room_along(x_adv, grad, bounds))
    return x_adv + batch_view(step, x_adv) * ascent_direction(grad, norm)


def start_point(x: Tensor, threat: ThreatModel, eps: Tensor, random_start: bool) -> Tensor:
    """``x`` itself, or a uniform random point of the ball (clamped into bounds)."""
    if not random_start:
        return x
    return constrain(x, x + random_in_ball(x, threat.norm, eps), threat.norm, eps, threat.bounds)


# -- bookkeeping -------------------------------------------------------------------------------------
class AttackResult(NamedTuple):
    """Per sample: the returned point ``(B, C, *spatial)``, whether it fools the model ``(B,)``, its loss ``(B,)``."""

    x_adv: Tensor
    success: Tensor
    loss: Tensor


class BestTracker:
    """The best point seen per sample of the full batch.

    ``prefer_success=True``: the first point where the model is wrong wins and is kept; until then, the
    highest-loss point. ``prefer_success=False``: the highest-loss point, whatever the model says there.
    """

    def __init__(self, x: Tensor, *, prefer_success: bool) -> None:
        self.prefer_success = prefer_success
        self.x_adv = x.detach().clone()
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # losses are compared in fp32+
        self.loss = torch.full((x.shape[0],), float("-inf"), dtype=dtype, device=x.device)
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def update(self, idx: Tensor, x_adv: Tensor, loss: Tensor, correct: Tensor) -> Tensor:
        """Offer points ``x_adv`` of samples ``idx`` (indices into the full batch) with their loss / correctness.

        Returns which of them were taken ``(n,)``: for a sample not yet fooled, whether its loss rose to a new best.
        """
        loss = loss.detach().to(self.loss.dtype)
        better = loss > self.loss[idx]
        take = (~self.success[idx] & (~correct | better)) if self.prefer_success else better
        if not bool(take.all()):  # all taken is the common case while the loss climbs: no gathers then
            rows = take.nonzero().flatten()
            idx, x_adv, loss, correct = idx[rows], x_adv[rows], loss[rows], correct[rows]
        self.x_adv[idx] = x_adv.detach()
        self.loss[idx] = loss
        self.success[idx] = ~correct
        return take

    def result(self) -> AttackResult:
        return AttackResult(self.x_adv, self.success, self.loss)


@dataclass
class WorkingSet:
    """The samples still under attack: indices into the full batch and their per-sample data."""

    idx: Tensor
    x: Tensor
    batch: dict
    eps: Tensor
    step: Tensor

    @classmethod
    def full(cls, x: Tensor, batch: dict, eps: Tensor, step: Tensor) -> "WorkingSet":
        return cls(torch.arange(x.shape[0], device=x.device), x, batch, eps, step)

    def __len__(self) -> int:
        return self.idx.shape[0]

    def keep(self, mask: Tensor) -> "WorkingSet":
        """Only the samples ``mask`` picks: a bool mask ``(n,)`` or row indices (the batch dict indexed with
        :func:`index_batch`)."""
        rows = mask.nonzero().flatten() if mask.dtype == torch.bool else mask  # one sync for every field
        batch = index_batch(self.batch, rows, batch_size=len(self))
        tensors = {f.name: getattr(self, f.name)[rows] for f in fields(self) if f.name != "batch"}
        return WorkingSet(batch=batch, **tensors)


# -- minimum-norm attacks ----------------------------------------------------------------------------
class MarginObjective:
    """``objective`` seen through its margin: ``attack_loss`` is ``objective.correct_margin`` ``(B,)``.

    Minimum-norm attacks (FMN, DeepFool, C&W) *descend* the margin (> 0 exactly where ``is_correct``), so they
    get its value and input gradient from :func:`loss_and_grad` / :func:`objective_values` unchanged.
    ``output`` keeps the last fp32 output the margin was computed from (DeepFool linearizes every logit).
    """

    def __init__(self, objective: Any) -> None:
        if not callable(getattr(objective, "correct_margin", None)):
            raise TypeError(f"minimum-norm attacks need an objective with correct_margin(output, batch) -> (B,) "
                            f"(> 0 exactly where is_correct); {type(objective).__name__} has none")
        self.objective = objective
        self.output: Any = None

    def attack_loss(self, output: Any, batch: dict) -> Tensor:
        self.output = output
        return self.objective.correct_margin(output, batch)

    def is_correct(self, output: Any, batch: dict) -> Tensor:
        return self.objective.is_correct(output, batch)
