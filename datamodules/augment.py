"""Random spatial transforms drawn once per batch and applied alike to the image and to the maps aligned with it.

Only flips and 90-degree rotations: they move voxels without interpolating, so integer labels and boolean masks
keep their values and dtype (nearest-neighbour by construction).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class FlipRot90:
    """Per-sample flips of some spatial axes and an in-plane rot90, as drawn by :func:`draw_flip_rot90`.

    Applies to any ``(B, ..., *spatial)`` tensor whose last ``n_spatial`` axes are the image's: the image
    ``(B, C, *spatial)``, a label map ``(B, *spatial)``, reader masks ``(B, R, *spatial)``.
    """

    def __init__(self, n_spatial: int, flips: dict[int, torch.Tensor], k: torch.Tensor | None):
        self.n_spatial, self.flips, self.k = n_spatial, flips, k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        out = x
        for axis, flip in self.flips.items():  # axis: index among the spatial axes
            dim = x.dim() - self.n_spatial + axis
            out = torch.where(flip.to(x.device).reshape(shape), out.flip(dim), out)
        if self.k is None:
            return out
        k = self.k.to(x.device).reshape(shape)
        rotated = out
        for r in (1, 2, 3):
            rotated = torch.where(k == r, torch.rot90(out, r, dims=(-2, -1)), rotated)
        return rotated


def draw_flip_rot90(batch_size: int, n_spatial: int, generator: torch.Generator, axes: Sequence[int] | None = None,
                    rotate: bool = True) -> FlipRot90:  # fmt: skip
    """A flip with probability 1/2 of each of ``axes`` (spatial axis indices; default all) per sample, then
    (``rotate``) an in-plane rot90 by 0-3 quarter turns. Draws flips axis by axis, then the turns."""
    axes = range(n_spatial) if axes is None else axes
    flips = {a: torch.rand(batch_size, generator=generator) < 0.5 for a in axes}
    k = torch.randint(0, 4, (batch_size,), generator=generator) if rotate else None
    return FlipRot90(n_spatial, flips, k)
