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
