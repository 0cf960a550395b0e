"""Synthetic lung CT around real LIDC nodule shapes (the ``phantom`` source of the LIDC DataModule).

Each patch is rendered in Hounsfield units on the same isotropic, nodule-centred grid the DICOM
source resamples to (:mod:`medrobust.data.patches`):

* parenchyma around -850 HU with a smooth low-frequency field and a gravity-like gradient;
* a few vessels (straight tubes, ~+40 HU) crossing the patch at random 3-D angles, and sometimes a
  pleural wall (soft tissue) near the nodule -- both independent of the label;
* the nodule's consensus shape from the annotation DB as a partial-volume occupancy; its intensity
  follows the readers' median texture rating (ground glass, part solid with a solid core, solid) and
  calcification rating (bright core, blobs or whole lesion);
* a Gaussian point-spread function and slightly correlated Gaussian noise (20-40 HU).

Nothing but the real lesion (shape, size, texture, calcification) depends on the label, and every
random draw comes from a generator seeded by ``(seed, nodule_id)``, so a patch does not depend on
which other nodules are rendered or in what order.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from medrobust.data.lidc_annotations import Nodule
from medrobust.data.patches import overlap_slices, patch_offsets, stable_seed

HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT stores


def _grid(spatial_dims: int, patch_size: int, spacing: float) -> list[np.ndarray]:
    """Broadcastable (z, y, x) offsets (mm) of a ``(D, H, W)`` grid; D = 1 for 2-D (the centre slice)."""
    oz = patch_offsets(patch_size, spacing) if spatial_dims == 3 else np.zeros(1)
    oy = ox = patch_offsets(patch_size, spacing)
    return np.meshgrid(oz, oy, ox, indexing="ij", sparse=True)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cell: float, std: float) -> np.ndarray:
    """Zero-mean smooth random field of ``shape`` (Gaussian-filtered white noise, features ~``cell`` voxels)."""
    sigma = [cell / 2 if n > 1 else 0 for n in shape]
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-8) * std


def _unit_vector(rng: np.random.Generator, planar: bool = False) -> np.ndarray:
    v = rng.standard_normal(3)
    if planar:
        v[0] = 0.0
    return v / np.linalg.norm(v)


def _background(rng: np.random.Generator, zyx: list[np.ndarray], spacing: float, half_mm: float) -> np.ndarray:
    """Parenchyma with smooth variation, a gradient and vessels, in HU: ``(D, H, W)``."""
    shape = np.broadcast_shapes(*(a.shape for a in zyx))
    hu = rng.uniform(-880, -820) + _smooth_field(rng, shape, cell=8.0 / spacing, std=rng.uniform(10, 30))
    g = _unit_vector(rng)
    hu = hu + rng.uniform(0, 40) * sum(a * c for a, c in zip(zyx, g)) / half_mm
    points = np.stack(np.broadcast_arrays(*zyx), axis=-1)
    for _ in range(rng.integers(1, 6)):
        # a straight vessel through a random point of the patch; thin ones are more common
        p0 = rng.uniform(-half_mm, half_mm, 3) * (1.0 if shape[0] > 1 else np.array([0.3, 1, 1]))
        d = _unit_vector(rng)
        radius = float(np.clip(rng.lognormal(np.log(1.0), 0.45), 0.4, 3.5))
        rel = points - p0
        dist = np.linalg.norm(rel - (rel @ d)[..., None] * d, axis=-1)
        cover = np.clip(radius - dist + 0.5 * spacing, 0, spacing) / spacing  # partial volume at the wall
        hu = hu + cover * (rng.uniform(10, 60) - hu)
    return hu


def _pleura(
    rng: np.random.Generator, zyx: list[np.ndarray], radius_mm: float, spacing: float, hu: np.ndarray
) -> np.ndarray:
    """Sometimes (20 %) a chest wall: soft tissue beyond a plane a few mm outside the nodule."""
    if rng.random() >= 0.2:
        return hu
    n = _unit_vector(rng, planar=True)
    offset = radius_mm + rng.uniform(1.0, 12.0)
    signed = sum(a * c for a, c in zip(zyx, n)) - offset
    cover = np.clip(0.5 + signed / spacing, 0, 1)
    return hu + cover * (rng.uniform(20, 60) - hu)


def _nodule_intensity(rng: np.random.Generator, nodule: Nodule, occ: np.ndarray, spacing: float) -> np.ndarray:
    """HU inside the nodule on its own occupancy grid ``(d, h, w)``: texture mix plus calcification."""
    solid_fraction = float(np.clip((nodule.texture - 2.0) / 3.0, 0.0, 1.0))  # 1-2 GGO, 3-4 part solid, 5 solid
    solid_hu = rng.uniform(-20, 60)
    ggo_hu = rng.uniform(-680, -430)
    inside = occ >= 0.5
    depth = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1, 1:-1] * spacing
    rel_depth = depth / max(depth.max(), 1e-6)  # 0 at the surface, 1 at the deepest point
    if solid_fraction >= 1.0:
        core = np.ones_like(occ)
    elif solid_fraction <= 0.0:
        core = np.zeros_like(occ)
    else:  # a solid core occupying roughly the inner part of the lesion, soft edged
        core = 1.0 / (1.0 + np.exp(-(rel_depth - (1.0 - solid_fraction)) * 12.0))
    hu = ggo_hu + core * (solid_hu - ggo_hu)
    hu = hu + _smooth_field(rng, occ.shape, cell=3.0 / spacing, std=rng.uniform(5, 25))
    if nodule.calcification < 6:  # 1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central; 6 absent
        hu = hu + _calcification(rng, int(round(nodule.calcification)), inside, rel_depth, spacing)
    return hu


def _calcification(
    rng: np.random.Generator, pattern: int, inside: np.ndarray, rel_depth: np.ndarray, spacing: float
) -> np.ndarray:
    """Extra HU for a calcification pattern on the nodule grid."""
    calc_hu = rng.uniform(200, 700)
    if pattern == 3:
        return calc_hu * inside
    if pattern == 5:
        return calc_hu * np.clip((rel_depth - 0.5) * 4.0, 0, 1)
    extra = np.zeros(inside.shape)
    candidates = np.argwhere(inside)
    if len(candidates) == 0:
        return extra
    idx = np.indices(inside.shape).reshape(3, -1).T.reshape(*inside.shape, 3)
    for _ in range(rng.integers(1, 4)):
        centre = candidates[rng.integers(len(candidates))]
        r = rng.uniform(0.8, 2.0) / spacing
        extra = np.maximum(extra, np.clip(r + 0.5 - np.linalg.norm(idx - centre, axis=-1), 0, 1))
    return calc_hu * extra * inside


def render_patch(nodule: Nodule, spatial_dims: int, patch_size: int, spacing: float, seed: int) -> np.ndarray:
    """One phantom patch in HU, int16: ``(H, W)`` (axial slice through the centroid) or ``(D, H, W)``.

    ``spacing`` must equal the spacing the nodule's occupancy was resampled to.
    """
    rng = np.random.default_rng(stable_seed("lidc-phantom", seed, nodule.nodule_id))
    zyx = _grid(spatial_dims, patch_size, spacing)
    half_mm = patch_size * spacing / 2
    hu = _background(rng, zyx, spacing, half_mm)
    hu = _pleura(rng, zyx, nodule.diameter_mm / 2, spacing, hu)

    occ_full = nodule.occupancy
    nod_hu = _nodule_intensity(rng, nodule, occ_full, spacing)
    centre = list(nodule.occupancy_centre)
    if spatial_dims == 2:  # the slice through the centroid
        k = centre[0]
        occ_full, nod_hu, centre[0] = occ_full[k : k + 1], nod_hu[k : k + 1], 0
    occ = np.zeros(hu.shape)
    body = np.zeros(hu.shape)
    dst, src = overlap_slices(hu.shape, occ_full.shape, centre)
    occ[dst], body[dst] = occ_full[src], nod_hu[src]
    hu = hu + occ * (body - hu)
    return _scanned(rng, hu, spacing, spatial_dims)


def _scanned(rng: np.random.Generator, hu: np.ndarray, spacing: float, spatial_dims: int) -> np.ndarray:
    """``hu`` ``(D, H, W)`` as the scanner gives it: its point-spread function, then slightly correlated quantum noise;
    int16 HU, ``(H, W)`` in 2-D."""
    axes_sigma = rng.uniform(0.5, 0.9) / spacing
    sigma = (0, axes_sigma, axes_sigma) if spatial_dims == 2 else axes_sigma
    hu = ndimage.gaussian_filter(hu, sigma)
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape), (0, 0.6, 0.6) if spatial_dims == 2 else 0.6)
    hu = hu + noise / noise.std() * rng.uniform(20, 40)
    hu = np.clip(np.round(hu), HU_MIN, HU_MAX).astype(np.int16)
    return hu[0] if spatial_dims == 2 else hu


def render_patches(
    nodules: list[Nodule], spatial_dims: int, patch_size: int, spacing: float, seed: int, progress: bool = True
) -> np.ndarray:
    """All patches stacked: ``(N, *patch)`` int16 HU, with a progress bar."""
    out = np.empty((len(nodules),) + (patch_size,) * spatial_dims, dtype=np.int16)
    for i, nod in enumerate(tqdm(nodules, desc=f"LIDC phantom {spatial_dims}-D", disable=not progress, leave=False)):
        out[i] = render_patch(nod, spatial_dims, patch_size, spacing, seed)
    return out


def render_background_patch(spatial_dims: int, patch_size: int, spacing: float, seed: int) -> np.ndarray:
    """A phantom patch with no nodule, in HU, int16: ``(H, W)`` or ``(D, H, W)``.

    Lung parenchyma, vessels and sometimes a pleural wall (a plane 1-12 mm from the centre), blurred and noised as
    :func:`render_patch` does, from a generator seeded by ``seed`` alone: out-of-distribution inputs for a model
    trained on nodule patches (seed 002's OOD attack), on the same grid and in the same units.
    """
    rng = np.random.default_rng(stable_seed("lidc-phantom-background", seed))
    zyx = _grid(spatial_dims, patch_size, spacing)
    hu = _background(rng, zyx, spacing, patch_size * spacing / 2)
    hu = _pleura(rng, zyx, 0.0, spacing, hu)  # no nodule: the wall's distance is from the patch centre
    return _scanned(rng, hu, spacing, spatial_dims)
