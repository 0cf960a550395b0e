"""What every attack on dense outputs shares: integer masks, per-voxel target maps, and the task members they need.

A *target map* ``(B, *spatial)`` says, per voxel, which class an attack pushes it to. DAG and targeted CosPGD
take one by name (:data:`TARGETS`, or a structure mode ``"swap:<a>,<b>"`` / ``"dilate:<a>,<b>[,<r>]"``, the
seed-001 targets) or as a tensor. Voxels whose target is their own label are left alone: the structure modes
change two structures and ask the rest of the map to stay as it is.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from medrobust.attacks.core.batch import attack_key

# Task members an attack on dense outputs needs (its ``requires``): a segmentation task's class count and its
# background convention. Classifiers have ``num_classes`` but no ``include_background``, regressors neither, so
# RobustnessEvaluation and the contract test keep these attacks off tasks without per-voxel logits.
DENSE_OUTPUT = ("num_classes", "include_background")

TARGETS = ("random", "next", "nearest")
# the per-voxel targets travel in the batch dict under this private key, so working sets index them with the rest
DENSE_TARGET_KEY = attack_key("dense_target")
_STRUCTURE = re.compile(r"^(swap|dilate):(\d+),(\d+)(?:,(\d+))?$")


def dense_labels(labels: Tensor, logits: Tensor, who: str = "this attack") -> Tensor:
    """Integer masks ``(B, *spatial)`` from ``(B, *spatial)`` or ``(B, 1, *spatial)``, checked against the logits
    ``(B, K, *spatial)``."""
    if labels.ndim == logits.ndim and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"{who} needs masks of shape (B, *spatial) or (B, 1, *spatial) matching the logits "
                         f"{tuple(logits.shape)} (B, K, *spatial); got labels of shape {tuple(labels.shape)}")
    return labels.long()


def predicted_right(logits: Tensor, labels: Tensor) -> Tensor:
    """Whether each voxel's label has the highest logit ``(B, *spatial)`` (a tie counts as right).
    ``argmax(dim=1) == labels`` says the same but is ~50x slower on CPU for channel-first logits ``(B, K, ...)``."""
    return logits.gather(1, labels.unsqueeze(1))[:, 0] >= logits.amax(dim=1)


def check_target(name: str, target: str | Tensor | None) -> str | Tensor | None:
    """``None``, one of :data:`TARGETS`, ``"swap:<a>,<b>"``, ``"dilate:<a>,<b>[,<r>]"`` or a tensor; a
    ``ValueError`` quoting anything else."""
    if target is None or isinstance(target, Tensor) or target in TARGETS:
        return target
    match = _STRUCTURE.match(str(target))
    if match is None:
        raise ValueError(f"unknown {name} {target!r}; expected None, one of {TARGETS}, 'swap:<a>,<b>', "
                         f"'dilate:<a>,<b>[,<radius>]' or a (B, *spatial) tensor")
    if match[2] == match[3]:
        raise ValueError(f"{name} {target!r} names class {match[2]} twice; expected two different classes")
    if match[4] is not None and int(match[4]) < 1:
        raise ValueError(f"{name} {target!r}: the dilation radius must be >= 1 voxel, got {match[4]}")
    return target


def target_map(model: Callable, x: Tensor, labels: Tensor, target: str | Tensor | None, seed: int | None,
               who: str) -> Tensor:
    """Target class per voxel ``(B, *spatial)`` for images ``x`` ``(B, C, *spatial)`` with masks ``labels``,
    from one clean forward (for ``K`` and the ``"nearest"`` class; run it inside the attack's session); see
    :func:`dense_targets`. ``who`` names the attack in errors."""
    with torch.no_grad():
        logits = model(x)
    if not isinstance(logits, Tensor) or logits.ndim != x.ndim or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{who} needs segmentation logits (B, K >= 2, *spatial) for images {tuple(x.shape)}, "
                         f"got {shape}")
    logits = logits.float()
    return dense_targets(target, logits, dense_labels(labels, logits, who), seed)


def dense_targets(target: str | Tensor | None, logits: Tensor, labels: Tensor, seed: int | None) -> Tensor:
    """Target class per voxel ``(B, *spatial)`` for logits ``(B, K, *spatial)`` and masks ``(B, *spatial)``.

    ``"random"`` (default): a uniform wrong class per voxel (drawn on the CPU with ``seed``, the same on every
    device); ``"next"``: ``(y + 1) % K``; ``"nearest"``: the runner-up class at these logits; ``"swap:a,b"``:
    structures ``a`` and ``b`` exchange labels; ``"dilate:a,b[,r]"``: the voxels of ``b`` within ``r`` voxels
    (default 1, chessboard distance) of ``a`` become ``a`` (``a`` grown into its neighbour). In the structure
    modes every other voxel's target is its label; a tensor is taken as given.
    """
    k = logits.shape[1]
    if isinstance(target, Tensor):
        return _checked_classes(dense_labels(target.to(labels.device), logits, "a target map"), k, "target classes")
    target = "random" if target is None else target
    if target == "next":
        return (labels + 1) % k
    if target == "nearest":  # the closest decision boundary
        return logits.scatter(1, labels.unsqueeze(1), float("-inf")).argmax(dim=1)
    if target == "random":
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        shift = torch.randint(1, k, tuple(labels.shape), generator=generator).to(labels.device)
        return (labels + shift) % k
    mode, a, b, radius = _STRUCTURE.match(target).groups()
    a, b = _checked_classes(torch.tensor([int(a), int(b)]), k, f"target {target!r}").tolist()
    if mode == "swap":
        return torch.where(labels == a, b, torch.where(labels == b, a, labels))
    near_a = dilate(labels == a, int(radius or 1))
    return torch.where(near_a & (labels == b), a, labels)


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Boolean ``mask`` ``(B, *spatial)`` (2-D or 3-D) dilated by ``radius`` voxels (a cube / square element)."""
    pool = F.max_pool2d if mask.ndim == 3 else F.max_pool3d
    return pool(mask.unsqueeze(1).float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def _checked_classes(classes: Tensor, k: int, what: str) -> Tensor:
    if bool((classes < 0).any()) or bool((classes >= k).any()):
        raise ValueError(f"{what} must be in [0, {k}) for logits with {k} classes, got values in "
                         f"[{int(classes.min())}, {int(classes.max())}]")
    return classes
