"""Points to draw on example images (landmarks: truth, clean and adversarial predictions), as opposed to label maps.

A task's ``example_masks`` returns label maps ``(B, *spatial)`` (segmentation) or :class:`PointSet` ``(B, K, D)``
(landmarks) under their row names; the example grid draws label maps as overlays and point sets as named markers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PointSet(torch.Tensor):
    """Points ``(B, K, D)`` in voxel coordinates of the image axes (voxel centres at integers), with ``point_names``
    (``K``, or empty). A tensor subclass, so it travels through code that moves label maps (``.detach().cpu()``,
    indexing), and the names with it."""

    point_names: tuple[str, ...] = ()  # not `names`: torch.Tensor.names are dimension names

    @staticmethod
    def __new__(cls, points: torch.Tensor, names: Sequence[str] = ()) -> "PointSet":
        points = torch.as_tensor(points).detach()
        if points.ndim != 3 or (names and len(names) != points.shape[1]):
            raise ValueError(f"PointSet takes points (B, K, D) and K names (or none), got {tuple(points.shape)} and "
                             f"{len(names)} names")
        result = points.as_subclass(cls)
        result.point_names = tuple(str(name) for name in names)
        return result

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        if isinstance(result, PointSet):  # results of ops on a point set keep its names
            result.point_names = next((a.point_names for a in args if isinstance(a, PointSet)), ())
        return result
