"""The model session every attack runs in, and the objective evaluated in fp32 with its input gradient.

An attack is written against an *objective* with two per-sample methods (the task modules implement them):

- ``objective.attack_loss(output, batch) -> Tensor[B]``: what the attacker maximizes;
- ``objective.is_correct(output, batch) -> BoolTensor[B]``: whether the model is still right.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from medrobust.attacks.core.frozen_norm import frozen_norm_gradients


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
      (:func:`~medrobust.attacks.core.frozen_norm.frozen_norm_gradients`; same outputs, far cheaper backward);
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
        frozen = [p for p in module.parameters() if p.requires_grad]
        with kept_modes(module):
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


@contextmanager
def kept_modes(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule's ``training`` flag put back exactly as it was when the block exits, exceptions included."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, its modes restored on exit (:func:`kept_modes`): the one way
    callbacks run an attack or a check on a model that may be training (an attack that raises must not leave
    a training run in eval mode)."""
    with kept_modes(module):
        module.eval()
        yield module


# -- the objective in fp32 ---------------------------------------------------------------------------
def _float32(value: Any) -> Any:
    """Half / bfloat16 tensors (anywhere in a tuple, list or dict) cast to float32."""
    return apply_to_collection(value, Tensor, lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)


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
