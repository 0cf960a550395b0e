"""Heatmaps of landmark detection, 2-D and 3-D: the differentiable soft-argmax decoding (DSNT, Nibali et al. 2018),
sub-voxel Gaussian targets and the Jensen-Shannon heatmap loss.

Coordinates are voxel indices in the order of the image axes, voxel centres at integers (the batch convention of
:mod:`medrobust.datamodules.landmarks`). Everything is in torch on the heatmaps' device, so attacks and training
take gradients through the decoding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_ZERO = -1e4  # exp() of it is 0 in any float type: a finite stand-in for log(0)


def voxel_grid(shape: tuple[int, ...], device=None, dtype=torch.float32) -> Tensor:
    """Voxel centres ``(N, D)`` of a grid of ``shape`` (D entries), in the flattening order of ``(*shape)``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def spatial_log_softmax(logits: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """``(B, K, *spatial)`` logits -> ``(B, K, N)`` log-probabilities over the voxels of each map (fp32), after
    multiplying the logits by ``scale`` (the inverse softmax temperature)."""
    return (logits.float() * scale).flatten(2).log_softmax(dim=-1)


def soft_argmax(log_probs: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The expected voxel position ``(B, K, D)`` under each map's distribution ``(B, K, N)`` (log-probabilities over
    the voxels of ``shape``): DSNT's coordinate, differentiable and sub-voxel."""
    return log_probs.exp() @ voxel_grid(shape, log_probs.device, log_probs.dtype)


def gaussian_log_targets(points: Tensor, shape: tuple[int, ...], sigma: float) -> Tensor:
    """Normalised Gaussians of std ``sigma`` voxels centred exactly at ``points`` ``(B, K, D)`` (sub-voxel, not
    rounded as MONAI's ``GenerateHeatmap`` does), as log-probabilities ``(B, K, N)`` over the voxels of ``shape``."""
    grid = voxel_grid(shape, points.device, torch.float32)
    squared = (points.float()[:, :, None, :] - grid).square().sum(dim=-1)
    return (-squared / (2.0 * sigma**2)).log_softmax(dim=-1)


def js_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Jensen-Shannon divergence ``(B, K)`` between distributions given as log-probabilities ``(B, K, N)``, in nats
    (in [0, ln 2]). Computed in log space: no ``0 * log 0`` and finite gradients where a probability underflows or
    is exactly 0 (log-probabilities below ``LOG_ZERO`` count as zero probabilities)."""
    log_p, log_q = log_p.clamp_min(LOG_ZERO), log_q.clamp_min(LOG_ZERO)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return 0.5 * (kl_pm + kl_qm)


WINDOW_SIGMAS = 8.0  # beyond 8 std a Gaussian's density is below exp(-32) ~ 1e-14 of its peak: zero in float32 sums


def gaussian_js_divergence(log_p: Tensor, points: Tensor, shape: tuple[int, ...], sigma: float) -> Tensor:
    """:func:`js_divergence` ``(B, K)`` between the maps ``log_p`` ``(B, K, N)`` and :func:`gaussian_log_targets` of
    ``points`` ``(B, K, D)``, computed only in a cube of ``WINDOW_SIGMAS`` std around each point.

    Outside the cube the target's probability is 0 (in float32), where the divergence's terms are exactly
    ``p ln 2``: ``JS = 0.5 [sum_W p log(p / m) + ln 2 (1 - sum_W p)] + 0.5 sum_W q log(q / m)``. ``log_p`` must be
    normalised maps (a spatial log-softmax, as the task's): the identity uses ``sum p = 1``, so the value and the
    gradient with respect to the logits are the whole-grid form's, at a fraction of its cost (a 3-D heatmap of
    48^3 voxels: a 17^3 window at 1 voxel std)."""
    radius = max(1, math.ceil(WINDOW_SIGMAS * sigma))
    steps = torch.arange(-radius, radius + 1, device=points.device)
    # the cube is the outer product of one window per axis: build (B, K, D, w) per-axis terms and combine them by
    # broadcasting, never a (B, K, w^D, D) tensor of voxel indices (3-D: 3x less index work, the loss 1.6x faster)
    axis_voxels = points.detach().float().round().long()[..., None] + steps  # (B, K, D, w)
    extent = torch.tensor(shape, device=points.device)[:, None]
    strides = torch.tensor([math.prod(shape[d + 1:]) for d in range(len(shape))], device=points.device)[:, None]
    inside = _outer(((axis_voxels >= 0) & (axis_voxels < extent)), torch.logical_and)  # (B, K, W)
    flat = _outer(axis_voxels.clamp_min(0).minimum(extent - 1) * strides, torch.add)
    squared = _outer((axis_voxels.float() - points.detach().float()[..., None]).square(), torch.add)
    log_q = (-squared / (2.0 * sigma**2)).masked_fill(~inside, -math.inf).log_softmax(dim=-1)
    log_p_window = log_p.gather(-1, flat).clamp_min(LOG_ZERO)
    log_q = log_q.clamp_min(LOG_ZERO)
    log_m = torch.logaddexp(log_p_window, log_q) - math.log(2.0)
    p_window = log_p_window.exp() * inside
    kl_pm = (p_window * (log_p_window - log_m)).sum(dim=-1) + math.log(2.0) * (1.0 - p_window.sum(dim=-1)).clamp_min(0)
    kl_qm = (log_q.exp() * inside * (log_q - log_m)).sum(dim=-1)
    return 0.5 * (kl_pm + kl_qm)


def _outer(per_axis: Tensor, combine) -> Tensor:
    """``(B, K, D, w)`` per-axis values -> ``(B, K, w^D)``: ``combine`` of one value per axis at every voxel of the
    cube, in the flattening order of a ``(w,) * D`` grid (the first axis slowest, as ``meshgrid(indexing="ij")``)."""
    combined = per_axis[:, :, 0]
    for axis in range(1, per_axis.shape[2]):
        combined = combine(combined[..., :, None], per_axis[:, :, axis, None, :]).flatten(-2)
    return combined
