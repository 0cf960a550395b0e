"""Synthetic T1 brains that age like real ones (the ``phantom`` source of the brain-age DataModule).

Each subject is the MNI152 atlas (:mod:`medrobust.data.brain_anatomy`) with its tissue surfaces moved
by age, drawn on a moderate grid (~3 mm) in atlas space, then placed in the scanner by a random affine
and sampled onto the ``image_size^3`` image:

* grey matter thins: the outer brain surface moves inwards linearly with age, faster frontally than
  occipitally and in the cerebellum ("last in, first out"); sulcal CSF fills the space;
* white matter shrinks late: the grey / white interface moves inwards from about 50 on;
* the ventricles grow, slowly at first and faster after about 60;
* subjects differ in head size and shape (scale, anisotropy, rotation, position), in how far their
  brain is from its chronological age (a "brain-age gap"), in how large each structure was to begin
  with (per-tissue offsets and smooth local shape fields), and in the scanner: tissue contrast, gain,
  a smooth multiplicative bias field and Rician noise.

The image is T1-like in arbitrary native units (white matter ~550 a.u. times the gain), stored as
uint16; :data:`NATIVE_WINDOW` maps it to [0, 1]. Every random draw comes from a generator seeded by
``(seed, subject_id)``, so a subject does not depend on which others are generated. Spatial arrays are
in RAS voxel order ``(x, y, z)`` (x left -> right), like the NIfTI source after reorientation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from medrobust.data.brain_anatomy import BrainAtlas, load_atlas
from medrobust.data.intensity import IntensityWindow
from medrobust.data.patches import linear_weights, separable_resample, stable_seed

TISSUE_LABELS = ("background", "csf", "ventricles", "gm", "wm")  # label value = index
REGION_NAMES = ("frontal", "parietal", "temporal", "occipital", "cerebellum")
FEATURE_NAMES = ["icv_ml", "gm_ml", "wm_ml", "csf_ml", "ventricles_ml"] + [f"gm_{r}_ml" for r in REGION_NAMES]
NATIVE_WINDOW = IntensityWindow(0.0, 1000.0, unit="a.u.")
FOV_MM = 200.0  # the image's field of view per side: the largest heads still fit after rotation

# ageing model: surface shifts (mm, in atlas space) at "biological age" a = age + gap
GM_MM_PER_YEAR = 0.040  # outer brain surface, inwards, times the regional weight
WM_MM_AT_90 = 0.6  # grey / white interface, inwards, ((a - 50) / 40)^2 from 50 on
VENTRICLE_MM_LINEAR = 1.0  # ventricular wall, outwards: this much from 20 to 90 ...
VENTRICLE_MM_LATE = 2.2  # ... plus this much times ((a - 60) / 30)^2 from 60 on
BRAIN_AGE_GAP_SD = 5.0  # years
GM_MIN_MM = 0.8  # the cortex never thins below this


@dataclass(frozen=True)
class BuildGrid:
    """The atlas resampled onto the grid subjects are drawn on (atlas space, ``spacing_mm`` isotropic).

    ``sdf``: float32 ``(4, X, Y, Z)``; ``region``: uint8 ``(X, Y, Z)`` index into :data:`REGION_NAMES`;
    ``gm_weight``: float32 ``(X, Y, Z)`` regional speed of cortical thinning; ``origin_mm``: atlas
    coordinates of voxel 0; ``centre_mm``: the intracranial box centre.
    """

    sdf: np.ndarray
    region: np.ndarray
    gm_weight: np.ndarray
    origin_mm: np.ndarray
    spacing_mm: float
    centre_mm: np.ndarray

    @property
    def voxel_ml(self) -> float:
        return self.spacing_mm**3 / 1000.0


def build_grid(atlas: BrainAtlas, spacing_mm: float) -> BuildGrid:
    """Resample the atlas (trilinear; exact enough for distance fields) and lay out regions and weights."""
    extent = np.asarray(atlas.sdf.shape[1:]) - 1  # atlas voxels
    n = np.floor(extent * atlas.spacing_mm / spacing_mm).astype(int) + 1
    idx = [np.arange(k) * spacing_mm / atlas.spacing_mm for k in n]
    weights = [linear_weights(i, m) for i, m in zip(idx, atlas.sdf.shape[1:])]
    sdf = np.ascontiguousarray(np.stack([separable_resample(f, weights) for f in atlas.sdf]), dtype=np.float32)
    x, y, z = (atlas.origin_mm[a] + idx[a].reshape([-1 if b == a else 1 for b in range(3)]) * atlas.spacing_mm
               for a in range(3))  # fmt: skip
    cerebellum = (z < -20) & (y < -40)
    occipital = (y < -70) & ~cerebellum
    temporal = (z < 0) & (np.abs(x) > 30) & ~occipital & ~cerebellum
    frontal = (y >= -10) & ~temporal & ~cerebellum
    region = np.select([frontal, temporal, occipital, cerebellum], [0, 2, 3, 4], default=1).astype(np.uint8)
    region = np.broadcast_to(region, sdf.shape[1:]).copy()
    # frontal cortex thins fastest, occipital and cerebellar slowest (smooth in space: no seams)
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    weight = (1.0 + 0.3 * np.tanh((y + 15.0) / 30.0)) * (1.0 - 0.4 * sig((-20.0 - z) / 5.0) * sig((-40.0 - y) / 5.0))
    weight = np.broadcast_to(weight, sdf.shape[1:]).astype(np.float32)
    return BuildGrid(sdf, region, weight, atlas.origin_mm.copy(), float(spacing_mm), atlas.centre_mm.copy())


def smooth_fields(
    rng: np.random.Generator, shape: Sequence[int], cell_voxels: float, stds: Sequence[float]
) -> np.ndarray:
    """Smooth random fields, float32 ``(len(stds), *shape)``: Gaussian values on a coarse lattice (one per
    ``cell_voxels``), interpolated linearly one axis at a time (three small matrix products)."""
    coarse = [max(int(np.ceil(n / cell_voxels)) + 1, 2) for n in shape]
    values = (rng.standard_normal((len(stds), *coarse)) * np.reshape(stds, (-1, 1, 1, 1))).astype(np.float32)
    wx, wy, wz = (linear_weights(np.linspace(0, c - 1, n), c).astype(np.float32) for n, c in zip(shape, coarse))
    f, nx, ny, nz = len(stds), *shape
    v = values @ wz.T  # (f, cx, cy, nz)
    v = wy @ v  # (f, cx, ny, nz)
    v = wx @ v.reshape(f, coarse[0], ny * nz)  # (f, nx, ny * nz)
    return v.reshape(f, nx, ny, nz)


def age_shifts_mm(bio_age: float) -> tuple[float, float, float]:
    """Mean surface shifts (mm) at a biological age: (cortex inwards before regional weighting,
    white matter inwards, ventricles outwards)."""
    years = bio_age - 20.0
    wm = WM_MM_AT_90 * (max(bio_age - 50.0, 0.0) / 40.0) ** 2
    ventricles = VENTRICLE_MM_LINEAR * years / 70.0 + VENTRICLE_MM_LATE * (max(bio_age - 60.0, 0.0) / 30.0) ** 2
    return GM_MM_PER_YEAR * years, wm, ventricles


def draw_labels(grid: BuildGrid, rng: np.random.Generator, age: float) -> np.ndarray:
    """The subject's tissue labels on the build grid (uint8, values index :data:`TISSUE_LABELS`)."""
    gap = rng.normal(0.0, BRAIN_AGE_GAP_SD)
    rate = float(np.exp(rng.normal(0.0, 0.15)))  # some age faster than others
    gm_shift, wm_shift, vent_shift = (rate * s for s in age_shifts_mm(age + gap))
    # where each structure starts (mm): as large as a decade or two of ageing
    reserve = rng.normal(0.0, [0.4, 0.3, 0.6])
    cell = 25.0 / grid.spacing_mm  # local shape variation on a ~25 mm scale
    local = smooth_fields(rng, grid.sdf.shape[1:], cell, [1.0, 0.5, 0.4, 0.5])
    icv, brain, white, vent = grid.sdf + local
    brain = brain - gm_shift * grid.gm_weight + reserve[0]
    white = np.minimum(white - wm_shift + reserve[1], brain - GM_MIN_MM)
    vent = vent + vent_shift + reserve[2]
    labels = np.where(white > 0, 4, np.where(brain > 0, 3, 1)).astype(np.uint8)
    labels[vent > 0] = 2
    labels[icv <= 0] = 0
    return labels


def regional_volumes_ml(labels: np.ndarray, region: np.ndarray, voxel_ml: float) -> np.ndarray:
    """:data:`FEATURE_NAMES` volumes (mL) of a label map: tissue totals, then grey matter per region."""
    counts = np.bincount((labels.astype(np.int64) * len(REGION_NAMES) + region).ravel(),
                         minlength=len(TISSUE_LABELS) * len(REGION_NAMES)).reshape(len(TISSUE_LABELS), -1)  # fmt: skip
    per_tissue = counts.sum(axis=1) * voxel_ml
    totals = [per_tissue[1:].sum(), per_tissue[3], per_tissue[4], per_tissue[1], per_tissue[2]]
    return np.array(totals + list(counts[3] * voxel_ml), dtype=np.float64)


def random_pose(rng: np.random.Generator) -> np.ndarray:
    """Atlas -> scanner linear map ``(3, 3)``: rotation times head scale and anisotropy."""
    scale = float(np.clip(rng.normal(0.92, 0.035), 0.8, 1.04)) * (1.0 + np.clip(rng.normal(0.0, 0.02, 3), -0.05, 0.05))
    angles = np.deg2rad(np.clip(rng.normal(0.0, 3.0, 3), -8, 8))
    rotation = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [b for b in range(3) if b != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    return rotation @ np.diag(scale)


def render_image(grid: BuildGrid, labels: np.ndarray, rng: np.random.Generator, image_size: int) -> tuple:
    """Place the subject in the scanner and make its T1 image.

    Returns ``(image, label_map, linear)``: uint16 native a.u. ``(n, n, n)``, uint8 labels ``(n, n, n)``
    (nearest neighbour) and the atlas -> scanner linear map ``(3, 3)`` (its determinant scales volumes).
    """
    linear = random_pose(rng)
    shift_mm = rng.normal(0.0, 3.0, 3)
    wm, contrast = draw_contrast(rng)
    tissue_image = (contrast * wm).astype(np.float32)[labels]
    out_mm = image_spacing_mm(image_size)
    # partial volume of the coarser output voxels: blur before sampling (sigma ~ 0.4 output voxels)
    tissue_image = ndimage.gaussian_filter(tissue_image, 0.4 * out_mm / grid.spacing_mm, truncate=2.5)
    # output voxel index -> build-grid index: q = centre + L^-1 (p - shift), p = (i - (n - 1) / 2) * out_mm
    inverse = np.linalg.inv(linear)
    matrix = inverse * out_mm / grid.spacing_mm
    start = -(image_size - 1) / 2 * out_mm * np.ones(3) - shift_mm
    offset = (grid.centre_mm + inverse @ start - grid.origin_mm) / grid.spacing_mm
    shape = (image_size,) * 3
    signal = ndimage.affine_transform(tissue_image, matrix, offset, output_shape=shape, order=1, cval=0.0)
    label_map = ndimage.affine_transform(labels, matrix, offset, output_shape=shape, order=0, cval=0)
    return scanner_effects(signal, rng, wm), label_map.astype(np.uint8), linear


def draw_contrast(rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """A subject's T1 contrast: white-matter signal (a.u.) and the signal per tissue label relative to it,
    ``(len(TISSUE_LABELS),)``. Shared with the AFIDs landmark phantom."""
    wm = 550.0 * rng.uniform(0.8, 1.2)
    csf, gm = rng.normal(0.25, 0.04), rng.normal(0.66, 0.03)  # relative to white matter
    return wm, np.array([0.0, csf, csf, gm, 1.0])


def scanner_effects(signal: np.ndarray, rng: np.random.Generator, wm: float) -> np.ndarray:
    """A smooth multiplicative bias field and Rician noise on a 2-D or 3-D ``signal`` (a.u.), as uint16.
    ``wm`` (the white-matter signal) scales the noise."""
    shape = signal.shape
    field_shape = tuple(shape) + (1,) * (3 - len(shape))  # smooth_fields is 3-D: a 2-D image is one slab
    bias = np.exp(smooth_fields(rng, field_shape, max(shape) / 3, [rng.uniform(0.05, 0.15)])[0]).reshape(shape)
    sigma = wm * rng.uniform(0.02, 0.05)
    noisy = np.hypot(signal * bias + rng.normal(0.0, sigma, shape), rng.normal(0.0, sigma, shape))  # Rician
    return np.clip(np.rint(noisy), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def image_spacing_mm(image_size: int) -> float:
    """The output image's voxel size (mm): the fixed field of view over ``image_size`` voxels."""
    return FOV_MM / image_size


def grid_spacing_mm(image_size: int) -> float:
    """Build-grid spacing: about half an output voxel, between 2 and 3 mm."""
    return float(np.clip(FOV_MM / image_size / 2.0, 2.0, 3.0))


def generate_subjects(
    subject_ids: Sequence[str],
    seed: int,
    image_size: int,
    age_range: Sequence[float],
    atlas_dir: str | os.PathLike,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Draw the phantom subjects.

    Returns ``images`` uint16 ``(N, n, n, n)`` (native a.u., see :data:`NATIVE_WINDOW`), ``label_maps``
    uint8 ``(N, n, n, n)``, ``ages`` float64 ``(N,)`` (years), ``volumes_ml`` float64 ``(N, F)`` in the
    order of :data:`FEATURE_NAMES` (counted on the build grid, scaled by the head's size) and
    ``subject_ids`` ``(N,)``.
    """
    grid = build_grid(load_atlas(atlas_dir), grid_spacing_mm(image_size))
    n = len(subject_ids)
    cube = (n,) + (image_size,) * 3
    out = {"images": np.zeros(cube, np.uint16), "label_maps": np.zeros(cube, np.uint8), "ages": np.zeros(n),
           "volumes_ml": np.zeros((n, len(FEATURE_NAMES))),
           "subject_ids": np.asarray(subject_ids, dtype=str)}  # fmt: skip
    with single_threaded_blas():
        for i, sid in enumerate(tqdm(subject_ids, desc="brain-age phantom", unit="subject", disable=not progress)):
            rng = np.random.default_rng(stable_seed("brainage-phantom", seed, sid))
            age = rng.uniform(*age_range)
            labels = draw_labels(grid, rng, age)
            image, label_map, linear = render_image(grid, labels, rng, image_size)
            out["images"][i], out["label_maps"][i], out["ages"][i] = image, label_map, age
            out["volumes_ml"][i] = regional_volumes_ml(labels, grid.region, grid.voxel_ml) * abs(np.linalg.det(linear))
    return out


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """The matrix products here are tiny: BLAS threads only spin (5-10x slower on a busy 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn, which nilearn needs
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
