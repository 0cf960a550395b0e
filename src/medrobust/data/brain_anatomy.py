"""A young-adult brain atlas from the MNI152 (ICBM 2009a, symmetric) template that nilearn's wheel ships.

The template's T1 is skull-stripped (its non-zero voxels are the intracranial volume) and comes with
grey- and white-matter probability maps at 1 mm (197 x 233 x 189, values 0-255). Averaged over 2 mm
blocks (tissue fractions), they give:

* tissue labels by the largest of (CSF = intracranial - GM - WM, GM, WM) inside the intracranial mask;
* ventricles: the CSF deeper than 12 mm inside the intracranial volume, in a central box around the
  thalamus (|x| < 35, -60 < y < 40, -20 < z < 40 mm), kept as the large connected components (the
  lateral ventricles and the third ventricle); the rest of the CSF is sulcal CSF;
* four signed distance fields (mm, positive inside) whose zero level sets are the surfaces that move
  with age: the intracranial surface, the outer brain surface (grey matter / sulcal CSF), the
  grey / white-matter interface (white matter with the ventricles filled in) and the ventricular wall.

The fields are computed once (a few seconds), cropped to the intracranial box and cached on disk
(and per process in memory). Arrays are in RAS voxel order ``(x, y, z)``: x left -> right,
y posterior -> anterior, z inferior -> superior.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medrobust.data.patches import file_fingerprint, load_npz, save_npz_atomic, settings_key

ATLAS_VERSION = 1  # bump when the derivation below changes, so cached atlases miss
FIELD_NAMES = ("icv", "brain", "white_matter", "ventricles")
ATLAS_SPACING_MM = 2  # the 1 mm template averaged over 2x2x2 blocks: fine enough for 32^3-64^3 images
SDF_CLIP_MM = 40.0  # surfaces never move this far; clipping keeps the fields compact
CROP_MARGIN_VOXELS = 4  # around the intracranial box
VENTRICLE_DEPTH_MM = 12.0
VENTRICLE_MIN_ML = 0.5


@dataclass(frozen=True)
class BrainAtlas:
    """Signed distance fields of the template's tissue surfaces on a regular grid.

    Attributes:
        sdf: float32 ``(4, X, Y, Z)`` in mm, positive inside, in the order of :data:`FIELD_NAMES`.
        origin_mm: MNI coordinates (mm) of voxel ``(0, 0, 0)``.
        spacing_mm: voxel size (isotropic).
        centre_mm: MNI coordinates of the centre of the intracranial bounding box.
    """

    sdf: np.ndarray
    origin_mm: np.ndarray
    spacing_mm: float
    centre_mm: np.ndarray


def template_paths() -> dict[str, Path]:
    """The MNI152 T1, GM and WM files inside nilearn's installed package (no download)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the brain-age phantom needs nilearn's MNI152 template files: pip install nilearn")
    folder = Path(spec.origin).parent / "datasets" / "data"
    paths = {k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNI152 template files missing from the nilearn package: {missing}")
    return paths


def signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Euclidean signed distance (mm) to the boundary of a boolean mask: > 0 inside, < 0 outside.

    The boundary lies half a voxel beyond the last inside voxel, as for a voxelised solid.
    """
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return np.where(mask, inside - spacing / 2, spacing / 2 - outside).astype(np.float32)


def block_mean(volume: np.ndarray, k: int) -> np.ndarray:
    """Average over non-overlapping ``k^3`` blocks (trailing voxels that do not fill a block are dropped)."""
    n = [s // k for s in volume.shape]
    v = volume[: n[0] * k, : n[1] * k, : n[2] * k]
    return v.reshape(n[0], k, n[1], k, n[2], k).mean(axis=(1, 3, 5), dtype=np.float32)


def ventricle_mask(csf: np.ndarray, icv: np.ndarray, xyz: list[np.ndarray], spacing: float) -> np.ndarray:
    """Deep, central CSF as its large connected components (the lateral and third ventricles)."""
    x, y, z = xyz
    depth = ndimage.distance_transform_edt(icv, sampling=spacing)
    box = (np.abs(x) < 35) & (y > -60) & (y < 40) & (z > -20) & (z < 40)
    candidates = csf & (depth > VENTRICLE_DEPTH_MM) & box
    components, n = ndimage.label(candidates)
    sizes = np.bincount(components.ravel(), minlength=n + 1) * spacing**3 / 1000
    keep = np.flatnonzero(sizes >= VENTRICLE_MIN_ML)
    mask = np.isin(components, keep[keep > 0])
    # recover the ventricles' rim that the depth cut removed: CSF connected to them, still deep-ish
    rim = csf & (depth > VENTRICLE_DEPTH_MM / 2) & box
    return ndimage.binary_dilation(mask, iterations=2, mask=rim) | mask


def derive_atlas() -> dict[str, np.ndarray]:
    """Read the template and compute the atlas arrays at ``ATLAS_SPACING_MM`` (see :func:`load_atlas`)."""
    import nibabel as nib

    images = {k: nib.load(str(p)) for k, p in template_paths().items()}
    affine = images["t1"].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ValueError(f"expected the 1 mm RAS MNI152 template, got affine {affine.tolist()}")
    k = ATLAS_SPACING_MM
    # tissue fractions per 2 mm voxel: the 1 mm maps averaged over 2x2x2 blocks
    icv = block_mean((np.asarray(images["t1"].dataobj) > 0).astype(np.float32), k)
    gm, wm = (block_mean(np.asarray(images[n].dataobj, dtype=np.float32) / 255.0, k) for n in ("gm", "wm"))
    origin = affine[:3, 3] + (k - 1) / 2  # centre of the first block
    xyz = np.meshgrid(*[origin[a] + k * np.arange(n) for a, n in enumerate(icv.shape)], indexing="ij", sparse=True)

    inside = ndimage.binary_fill_holes(icv >= 0.5)
    csf = np.clip(icv - gm - wm, 0.0, 1.0)
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0)  # 0 CSF, 1 GM, 2 WM
    ventricles = ventricle_mask(inside & (tissue == 0), inside, xyz, k)
    brain = inside & ((tissue >= 1) | ventricles)  # outer surface only: the ventricles are filled in
    white = inside & ((tissue == 2) | ventricles)  # the GM/WM interface; around the ventricles, their wall
    sdf = np.stack([signed_distance(m, k) for m in (inside, brain, white, ventricles)])

    # crop to the intracranial box plus a margin: beyond it everything is background
    lo, hi = [], []
    for a in range(3):
        used = np.flatnonzero(inside.any(axis=tuple(b for b in range(3) if b != a)))
        lo.append(max(int(used[0]) - CROP_MARGIN_VOXELS, 0))
        hi.append(min(int(used[-1]) + CROP_MARGIN_VOXELS + 1, inside.shape[a]))
    crop = (slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))
    centre = [(xyz[a].ravel()[lo[a] + CROP_MARGIN_VOXELS] + xyz[a].ravel()[hi[a] - 1 - CROP_MARGIN_VOXELS]) / 2
              for a in range(3)]  # fmt: skip
    return {"sdf": np.clip(sdf[crop], -SDF_CLIP_MM, SDF_CLIP_MM), "origin_mm": origin + k * np.asarray(lo),
            "spacing_mm": np.float64(k), "centre_mm": np.asarray(centre)}  # fmt: skip


def load_atlas(cache_dir: str | os.PathLike) -> BrainAtlas:
    """The atlas from ``cache_dir``, or derived from the template (a few seconds) and cached there."""
    fingerprints = {k: file_fingerprint(p) for k, p in template_paths().items()}
    settings = dict(kind="mni152_brain_atlas", version=ATLAS_VERSION, template=fingerprints)
    key = settings_key(settings)
    path = Path(cache_dir) / f"mni152_atlas_{key}.npz"
    arrays = load_npz(path)
    if arrays is None:
        arrays = _derived_atlas(key)
        save_npz_atomic(path, settings, **arrays)
    return BrainAtlas(sdf=arrays["sdf"], origin_mm=np.asarray(arrays["origin_mm"], dtype=np.float64),
                      spacing_mm=float(arrays["spacing_mm"]), centre_mm=np.asarray(arrays["centre_mm"]))  # fmt: skip


@functools.lru_cache(maxsize=1)
def _derived_atlas(key: str) -> dict[str, np.ndarray]:
    """:func:`derive_atlas`, once per process and settings key (another cache folder reuses it)."""
    return derive_atlas()
