"""Batches as attacks see them: a MONAI-style dict whose per-sample entries follow every subset an attack takes.

Attacks perturb the images ``x`` passed separately and never read ``batch["image"]``. What an attack needs to
carry per sample (a target class, a clean prediction) rides in a copy of the batch under a private key made by
:func:`attack_key`, so :func:`index_batch` selects it along with the labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

Index = slice | Tensor | list | int
ATTACK_KEY_PREFIX = "_attack_"


def attack_key(name: str) -> str:
    """The batch key under which an attack carries its per-sample ``name`` (``"_attack_target"``): one
    convention, so no attack's key can shadow a user's batch entry or another attack's."""
    return ATTACK_KEY_PREFIX + name


TARGET_KEY = attack_key("target")  # per-sample target classes of targeted attacks (APGD-T, Targeted)


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


def index_output(output: Any, idx: Index, batch_size: int) -> Any:
    """Select samples ``idx`` of a model output: a tensor ``(B, ...)`` or a dict of them (a shape network's
    ``{"points", "mask"}``), indexed as :func:`index_batch` indexes a batch."""
    return _index_tree(output, _as_index(idx, batch_size), batch_size)


def float_output(output: Any) -> Any:
    """A model output (a tensor or a dict of them) in fp32: an autocast forward's bf16 / fp16 made exact."""
    return apply_to_collection(output, Tensor, lambda value: value.float() if value.is_floating_point() else value)


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


def _normal_tensor(value: Tensor) -> Tensor:
    """A clone of an inference tensor (e.g. a batch collated under ``inference_mode``), so autograd may save it."""
    if value.is_inference():
        with torch.inference_mode(False):
            return value.clone()
    return value


def prepare(x: Tensor, batch: Mapping) -> tuple[Tensor, dict]:
    """Detached, non-inference copies of the images ``(B, C, *spatial)`` and of the batch's tensors."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"attacks perturb floating-point images, got {getattr(x, 'dtype', type(x))}")
    return _normal_tensor(x.detach()), apply_to_collection(dict(batch), Tensor, _normal_tensor)
