"""Each LIDC reader's own mask of a nodule, their consensus and their agreement, on a nodule-centred patch grid.

The classification patches (:mod:`medrobust.data.lung_phantom`, :mod:`medrobust.data.lidc_dicom`) put the
nodule's consensus centroid on voxel ``n // 2`` of an isotropic grid. Here every reader's outlines (the
annotation DB's contours) are rasterized on the scan's native grid exactly as
:mod:`medrobust.data.lidc_annotations` rasterizes them, and resampled onto that same patch grid as a
partial-volume occupancy; a reader includes a voxel when it covers at least half of it. The consensus
is LIDC's usual rule: a voxel belongs to the nodule when at least half of the readers include it.

Readers whose outlines have zero area are left out, as the consensus of the annotation parser leaves them out.
"""

from __future__ import annotations

import itertools

import numpy as np

from medrobust.data.lidc_annotations import MAX_READERS, Annotation, Nodule, native_box, nodule_id, scan_clusters
from medrobust.data.patches import occupancy_around, patch_offsets


def nodule_groups(db_path: str) -> dict[str, tuple[dict, list[Annotation]]]:
    """``nodule_id -> (scan header, the readers' annotations)``, clustered and numbered as
    :func:`medrobust.data.lidc_annotations.parse_nodules` numbers its nodules (:func:`scan_clusters` for both)."""
    return {nodule_id(scan, index): (scan, group) for scan, index, group in scan_clusters(db_path)}


def reader_masks(
    scan: dict, group: list[Annotation], centre_zyx: tuple[float, float, float], spatial_dims: int,
    patch_size: int, spacing: float,
) -> np.ndarray:
    """Boolean ``(R, *patch)`` masks of the ``R`` readers with a nonzero outline, on the patch grid centred on
    ``centre_zyx`` (mm); ``*patch`` is ``(H, W)`` (the axial plane through the centre) or ``(D, H, W)``."""
    ps, box = scan["pixel_spacing"], native_box(scan, group)  # the box the nodule's consensus was built in
    local_centre = np.asarray(centre_zyx) - np.array([0.0, box.origin[1] * ps, box.origin[2] * ps])
    offsets = [patch_offsets(patch_size, spacing) if spatial_dims == 3 else np.zeros(1)]
    offsets += [patch_offsets(patch_size, spacing)] * 2
    out = [occupancy_around(native, box.box_z, ps, local_centre, offsets, spacing) >= 0.5
           for native in box.masks(group) if native.any()]  # fmt: skip
    masks = np.stack(out) if out else np.zeros((0, *(len(o) for o in offsets)), dtype=bool)
    return masks[:, 0] if spatial_dims == 2 else masks


def consensus(masks: np.ndarray) -> np.ndarray:
    """Voxels at least half of the readers include: ``(R, *spatial)`` bool -> ``(*spatial)`` bool."""
    if len(masks) == 0:
        raise ValueError("consensus of zero readers: every reader's outline had zero area")
    return masks.mean(axis=0) >= 0.5 - 1e-9


def pairwise_dice(masks: np.ndarray) -> float:
    """Mean Dice over all pairs of readers (``(R, *spatial)`` bool); two empty masks agree (Dice 1).
    NaN with fewer than two readers: agreement is undefined for a single reader."""
    scores = []
    for a, b in itertools.combinations(masks, 2):
        total = int(a.sum()) + int(b.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((a & b).sum()) / total)
    return float(np.mean(scores)) if scores else float("nan")


def nodule_reader_masks(
    db_path: str, nodules: list[Nodule], spatial_dims: int, patch_size: int, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    """Every nodule's reader masks padded to four readers, ``(N, 4, *patch)`` bool, and the reader counts ``(N,)``.

    ``nodules`` must come from the same annotation DB (their ids name the clusters of :func:`nodule_groups`).
    """
    groups = nodule_groups(db_path)
    shape = (patch_size,) * spatial_dims
    masks = np.zeros((len(nodules), MAX_READERS, *shape), dtype=bool)
    counts = np.zeros(len(nodules), dtype=np.int64)
    for i, nod in enumerate(nodules):
        if nod.nodule_id not in groups:
            raise KeyError(f"data.annotation_db {db_path!r}: no reader cluster for nodule {nod.nodule_id!r}")
        scan, group = groups[nod.nodule_id]
        m = reader_masks(scan, group, nod.centroid_zyx, spatial_dims, patch_size, spacing)
        masks[i, : len(m)], counts[i] = m, len(m)
    return masks, counts
