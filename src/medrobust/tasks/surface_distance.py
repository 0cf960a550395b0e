"""Batched percentile Hausdorff distance in torch, on the masks' device: the same values as MONAI's
``compute_hausdorff_distance(percentile=p)`` (default, ``directed=False``), without its per-pair CPU loop.

MONAI's recipe, reproduced step by step:

- surface voxels: the mask minus its binary erosion by the face-connected cross, with everything outside the
  image background (scipy's ``binary_erosion`` defaults, which ``get_mask_edges`` uses; its crop pads with 0);
- distances from each surface voxel of one mask to the nearest surface voxel of the other, coordinates scaled
  by the spacing per axis. MONAI queries a KD-tree per pair; a brute-force ``cdist`` between surfaces costs
  P x Q and lost to it on thin, fragmented tissue masks (cortex: ~650 surface voxels per 64^2 slice, ~11k
  per 40^3 volume), so we read them off an exact separable squared distance transform of the other surface,
  batched over all pairs, whose cost does not grow with the surface size;
- the ``p``-th percentile of each directed set (``torch.quantile``'s linear rule, = ``np.percentile``'s
  default), and the larger of the two directions.

Pairs where a mask is empty are left to the caller (MONAI gives inf / NaN there): they score NaN here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# bytes of one chunk's float32 min-plus tensor: bounds memory on 3-D volumes
CHUNK_BYTES = 64 * 2**20


def surface(masks: Tensor) -> Tensor:
    """Surface voxels ``(N, *spatial)`` bool of binary masks ``(N, *spatial)``: the mask minus its erosion."""
    dims = masks.ndim - 1
    padded = F.pad(masks.to(torch.uint8), (1, 1) * dims)  # outside the image is background
    core = (slice(None),) + (slice(1, -1),) * dims
    eroded = padded[core].clone()
    for axis in range(1, dims + 1):
        for window in (slice(None, -2), slice(2, None)):
            index = list(core)
            index[axis] = window
            eroded &= padded[tuple(index)]
    return masks.bool() & ~eroded.bool()


def _line_distance(edges: Tensor, scale: Tensor) -> Tensor:
    """Squared distance ``(N, *spatial)`` float32 from each voxel to the nearest surface voxel on its own line
    along axis 1 (inf where the line has none): the first, binary pass of the separable distance transform,
    two running-extremum scans instead of a search."""
    position = torch.arange(edges.shape[1], device=edges.device, dtype=torch.float32)
    position = position.view(-1, *([1] * (edges.ndim - 2)))
    inf = torch.tensor(float("inf"), device=edges.device)
    left = torch.where(edges, position, -inf).cummax(dim=1).values
    right = torch.where(edges, position, inf).flip(1).cummin(dim=1).values.flip(1)
    steps = torch.minimum(position - left, right - position)
    return (steps * scale[:, 0].float().view(-1, *([1] * (edges.ndim - 1)))).square()


def _min_plus(squared: Tensor, axis: int, scale: Tensor, chunk_bytes: int) -> Tensor:
    """One exact pass of the separable squared distance transform along ``axis``:
    ``out[.., i, ..] = min_j squared[.., j, ..] + (scale * (i - j))^2``, chunked over the masks. ``(N, *spatial)``"""
    lines = squared.movedim(axis, -1)
    length = lines.shape[-1]
    position = torch.arange(length, device=squared.device, dtype=torch.float32)
    offsets = (position[:, None] - position[None, :]).square()  # (i, j)
    per_mask = lines[0].numel() * length * 4
    step = max(1, chunk_bytes // per_mask)
    out = torch.empty_like(lines)
    for first in range(0, lines.shape[0], step):
        part = slice(first, first + step)
        weights = offsets * scale[part, axis - 1].float().square().view(-1, *([1] * (lines.ndim - 1)), 1)
        out[part] = (lines[part].unsqueeze(-2) + weights).amin(dim=-1)
    return out.movedim(-1, axis)


def _distances_at(edges: Tensor, queries: Tensor, scale: Tensor, chunk_bytes: int) -> Tensor:
    """Exact distance ``(M,)`` float64 from query voxels ``queries`` ``(M, 1 + D)`` (mask index, coordinates) to
    the nearest surface voxel of their mask in ``edges`` ``(N, *spatial)``, coordinates scaled by ``scale``
    ``(N, D)``. Separable distance transform: a binary scan along axis 1, exact min-plus passes along the middle
    axes, and the last axis only at the queries, so 2-D costs O(voxels + queries x side)."""
    squared = _line_distance(edges, scale)
    for axis in range(2, edges.ndim - 1):
        squared = _min_plus(squared, axis, scale, chunk_bytes)
    lines = squared[tuple(queries[:, :-1].T)]  # (M, n_last): the queries' lines along the last axis
    position = torch.arange(lines.shape[1], device=edges.device, dtype=torch.float32)
    last = scale[queries[:, 0], -1].float()[:, None]
    offsets = ((position[None, :] - queries[:, -1:].float()) * last).square()
    return (lines + offsets).amin(dim=1).double().sqrt()


def _per_mask_quantile(values: Tensor, owner: Tensor, n: int, q: float) -> Tensor:
    """``q``-quantile (linear, as ``torch.quantile`` / ``np.percentile``) of ``values`` ``(M,)`` grouped by
    ``owner`` ``(M,)`` sorted mask indices in ``[0, n)``; every mask needs one value at least. ``(n,)``"""
    counts = torch.bincount(owner, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(values.shape[0], device=values.device) - starts[owner]
    padded = torch.full((n, int(counts.max())), float("inf"), dtype=torch.float64, device=values.device)
    padded[owner, slot] = values
    ordered = padded.sort(dim=1).values
    position = q * (counts - 1).double()
    low = position.floor().long()
    high = torch.minimum(low + 1, counts - 1)
    below, above = ordered.gather(1, low[:, None])[:, 0], ordered.gather(1, high[:, None])[:, 0]
    return below + (above - below) * (position - low)


def percentile_hausdorff(pred: Tensor, label: Tensor, spacing: Tensor | None = None, percentile: float = 95.0,
                         chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """Symmetric ``percentile`` Hausdorff distance ``(N,)`` float64 between binary masks ``pred`` and ``label``
    ``(N, *spatial)``; ``spacing`` ``(N, D)`` (units per voxel along each axis) or ``None`` (voxels). NaN where
    either mask is empty."""
    if pred.shape != label.shape:
        raise ValueError(f"pred and label masks must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(label.shape)}")
    n, dims = pred.shape[0], pred.ndim - 1
    result = torch.full((n,), float("nan"), dtype=torch.float64, device=pred.device)
    both = pred.flatten(1).any(1) & label.flatten(1).any(1)
    if not both.any():
        return result
    scale = (torch.ones(n, dims, dtype=torch.float64, device=pred.device) if spacing is None
             else spacing.to(pred.device, torch.float64).expand(n, dims))[both]
    pred_edges, label_edges = surface(pred[both]), surface(label[both])
    pred_points, label_points = pred_edges.nonzero(), label_edges.nonzero()  # (M, 1 + D), by mask
    pred_to_label = _distances_at(label_edges, pred_points, scale, chunk_bytes)
    label_to_pred = _distances_at(pred_edges, label_points, scale, chunk_bytes)
    q, count = percentile / 100.0, pred_edges.shape[0]
    result[both] = torch.maximum(_per_mask_quantile(pred_to_label, pred_points[:, 0], count, q),
                                 _per_mask_quantile(label_to_pred, label_points[:, 0], count, q))
    return result
