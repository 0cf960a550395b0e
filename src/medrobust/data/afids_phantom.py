"""Anatomical fiducials (AFIDs) on deformed MNI152 brains: the ``phantom`` source of the landmark DataModule.

The 32 AFIDs (Lau et al., Hum Brain Mapp 2019) have public coordinates on the MNI152 2009 symmetric template
(``afids_mni152.csv``, RAS mm, packaged with this module). The template is the one nilearn's wheel ships
(:func:`medrobust.data.brain_anatomy.template_paths`). Fiducials and deformations live in its RAS mm; its voxels
are reached only through its own affine (:func:`mm_to_voxels`), never through a hard-coded offset.

Each subject is the template under a random smooth deformation, as the brain phantoms vary
(:func:`~medrobust.data.brain_phantom.random_pose` for the affine part, :func:`~medrobust.data.brain_phantom.
smooth_fields` for the elastic part), with their T1 contrast, bias field and Rician noise
(:func:`~medrobust.data.brain_phantom.draw_contrast`, :func:`~medrobust.data.brain_phantom.scanner_effects`).

The image is resampled by pulling back: output voxel ``q`` shows the template at (mm)
``x(q) = centre + L^-1 (h (q - (n - 1) / 2) - shift) + u(q)``, ``u`` an elastic displacement stored on the output
grid and interpolated linearly in between (:class:`Deformation`). A fiducial at template ``p`` therefore lands where
``x(q) = p``, solved by fixed-point iterations to far below a voxel (:meth:`Deformation.push_forward`).

* ``spatial_dims=2``: the mid-sagittal plane (RAS x = 0) under an in-plane deformation, with the 10 midline
  fiducials (their |x| <= 0.25 mm is dropped); image axes ``(Y, Z)`` = (posterior -> anterior, inferior ->
  superior);
* ``spatial_dims=3``: the volume, axes ``(X, Y, Z)`` in RAS order, with all 32.

Landmarks are voxel coordinates in the order of the image axes; voxels are ``spacing_mm`` isotropic.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from medrobust.data.brain_anatomy import template_paths
from medrobust.data.brain_phantom import draw_contrast, random_pose, scanner_effects, single_threaded_blas
from medrobust.data.brain_phantom import smooth_fields
from medrobust.data.patches import stable_seed

AFIDS_CSV = Path(__file__).with_name("afids_mni152.csv")
MIDLINE = ("AC", "PC", "ICS", "PMJ", "SIPF", "CUL", "IMS", "PG", "GENU", "SPLE")
DEFAULT_IMAGE_SIZE = {2: 64, 3: 40}  # voxels per side, sized for a 2-core CPU (3-D at 48: 2x the time of 40)
DEFAULT_SPACING_MM = {2: 2.5, 3: 3.6}  # 160 mm sagittal field of view; 144 mm cube: every fiducial with margin
ELASTIC_MM = 2.0  # std of each displacement component at the lattice nodes (inter-subject variation after affine);
# at 2 mm the local volume change det(I + grad u) stays above ~0.45, at 4 mm the field starts to fold
ELASTIC_CELL_MM = 32.0  # lattice step of the elastic field: smooth on the scale of brain structures
SHIFT_MM = 3.0  # std of the head's position in the field of view


@dataclass(frozen=True)
class Fiducials:
    """``names`` (acronyms), ``descriptions`` and ``ras_mm`` ``(K, 3)`` template coordinates, in the csv's order."""

    names: tuple[str, ...]
    descriptions: tuple[str, ...]
    ras_mm: np.ndarray


def load_fiducials(midline_only: bool = False) -> Fiducials:
    """The AFIDs from the packaged csv (columns ``x_sym..``: nilearn's template is the symmetric one)."""
    with open(AFIDS_CSV, newline="") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    if midline_only:
        rows = [r for r in rows if r["acronym"] in MIDLINE]
    ras = np.array([[float(r[f"{a}_sym"]) for a in "xyz"] for r in rows])
    return Fiducials(tuple(r["acronym"] for r in rows), tuple(r["name"] for r in rows), ras)


@dataclass(frozen=True)
class Template:
    """Template tissue fractions ``(3, *spatial)`` float32 (CSF, GM, WM), blurred for the output voxel size, and
    the ``affine`` ``(D + 1, D + 1)`` from their voxels to mm (3-D: RAS; 2-D: (y, z) of the plane x = 0)."""

    tissue: np.ndarray
    affine: np.ndarray

    def to_voxels(self, mm: np.ndarray) -> np.ndarray:
        """Template mm ``(..., D)`` -> template voxel coordinates, through the inverse affine."""
        return mm_to_voxels(self.affine, mm)


def mm_to_voxels(affine: np.ndarray, mm: np.ndarray) -> np.ndarray:
    """Points ``(..., D)`` in mm -> voxel coordinates of the image with voxel -> mm ``affine`` ``(D + 1, D + 1)``."""
    inverse = np.linalg.inv(affine)
    return np.asarray(mm) @ inverse[:-1, :-1].T + inverse[:-1, -1]


def template_fiducials(fiducials: Fiducials, spatial_dims: int) -> np.ndarray:
    """Fiducials in template mm of the image's axes: RAS ``(K, 3)`` (3-D) or the sagittal ``(y, z)`` (2-D)."""
    return fiducials.ras_mm if spatial_dims == 3 else fiducials.ras_mm[:, 1:]


@functools.lru_cache(maxsize=2)
def load_template(spatial_dims: int, blur_mm: float) -> Template:
    """The template's CSF / GM / WM fractions (3-D, or its mid-sagittal plane), blurred by ``blur_mm`` (the output
    voxels' partial volume), cropped to the intracranial box. Cached per process."""
    import nibabel as nib

    images = {k: nib.load(str(p)) for k, p in template_paths().items()}
    affine = images["t1"].affine
    icv = np.asarray(images["t1"].dataobj) > 0  # the template is skull-stripped
    lo = [int(np.flatnonzero(icv.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    hi = [int(np.flatnonzero(icv.any(axis=tuple(b for b in range(3) if b != a)))[-1]) + 1 for a in range(3)]
    if spatial_dims == 2:  # a slab around x = 0 is all the plane needs
        if not (np.allclose(affine[0, 1:3], 0) and np.allclose(affine[1:3, 0], 0)):
            raise ValueError(f"2-D AFIDs need a template whose first voxel axis is RAS x; affine {affine.tolist()}")
        x0 = float(np.linalg.inv(affine)[0] @ [0.0, 0.0, 0.0, 1.0])  # voxel index of the plane x = 0
        lo[0], hi[0] = int(np.floor(x0)) - 8, int(np.floor(x0)) + 10
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    gm, wm = (np.asarray(images[k].dataobj[crop], dtype=np.float32) / 255.0 for k in ("gm", "wm"))
    csf = np.clip(icv[crop] - gm - wm, 0.0, 1.0)
    shift = np.eye(4)
    shift[:3, 3] = lo
    affine = affine @ shift  # voxel 0 of the crop
    sigma = blur_mm / np.linalg.norm(affine[:3, :3], axis=0)  # in template voxels, per axis
    tissue = np.stack([ndimage.gaussian_filter(t, sigma, truncate=2.5) for t in (csf, gm, wm)])
    if spatial_dims == 3:
        return Template(tissue, affine)
    x0 = float(np.linalg.inv(affine)[0] @ [0.0, 0.0, 0.0, 1.0])
    w = x0 - np.floor(x0)
    plane = (1 - w) * tissue[:, int(np.floor(x0))] + w * tissue[:, int(np.floor(x0)) + 1]
    affine2 = np.eye(3)
    affine2[:2, :2], affine2[:2, 2] = affine[1:3, 1:3], affine[1:3, 3] + affine[1:3, 0] * x0
    return Template(np.ascontiguousarray(plane, dtype=np.float32), affine2)


@dataclass(frozen=True)
class Deformation:
    """Pull-back map from output voxels to template mm (module docstring). ``linear`` ``(D, D)``: template ->
    subject; ``shift_mm``, ``centre_mm`` ``(D,)``; ``displacement_mm`` ``(D, *shape)`` on the output grid."""

    linear: np.ndarray
    shift_mm: np.ndarray
    centre_mm: np.ndarray
    displacement_mm: np.ndarray
    spacing_mm: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.displacement_mm.shape[1:])

    @classmethod
    def identity(cls, shape: Sequence[int], spacing_mm: float, centre_mm: Sequence[float]) -> Deformation:
        d = len(shape)
        return cls(np.eye(d), np.zeros(d), np.asarray(centre_mm, dtype=np.float64),
                   np.zeros((d, *shape), np.float32), float(spacing_mm))  # fmt: skip

    def _affine_part(self, q: np.ndarray) -> np.ndarray:
        subject_mm = (q - (np.asarray(self.shape) - 1) / 2) * self.spacing_mm - self.shift_mm
        return self.centre_mm + subject_mm @ np.linalg.inv(self.linear).T

    def displacement_at(self, q: np.ndarray) -> np.ndarray:
        """The elastic displacement (mm) at output voxel coordinates ``q`` ``(N, D)``, linear between voxels."""
        return np.stack([ndimage.map_coordinates(u, q.T, order=1, mode="nearest") for u in self.displacement_mm], 1)

    def pull_back(self, q: np.ndarray) -> np.ndarray:
        """Output voxel coordinates ``(N, D)`` -> template mm ``(N, D)``."""
        q = np.asarray(q, dtype=np.float64)
        return self._affine_part(q) + self.displacement_at(q)

    def grid_mm(self) -> np.ndarray:
        """Template mm of every output voxel, ``(D, *shape)`` (what the image is resampled at)."""
        q = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in self.shape], indexing="ij"), -1)
        x = self._affine_part(q.reshape(-1, len(self.shape))).T.reshape(-1, *self.shape)
        return x + self.displacement_mm

    def push_forward(self, x_mm: np.ndarray, tol_voxels: float = 1e-6, max_iter: int = 200) -> np.ndarray:
        """Template mm ``(N, D)`` -> the output voxel coordinates ``q`` with ``pull_back(q) = x``: fixed-point
        iterations ``q <- affine^-1(x - u(q))``, a contraction while the elastic field is smooth (|grad u| < 1)."""
        x = np.asarray(x_mm, dtype=np.float64)
        centre = (np.asarray(self.shape) - 1) / 2
        q = np.zeros_like(x)
        u = np.zeros_like(x)
        for _ in range(max_iter):
            q = centre + ((x - self.centre_mm - u) @ self.linear.T + self.shift_mm) / self.spacing_mm
            u = self.displacement_at(q)
            residual = (self._affine_part(q) + u - x) @ self.linear.T / self.spacing_mm  # in output voxels
            if np.abs(residual).max() < tol_voxels:
                return q
        raise RuntimeError(f"the deformation's inverse did not converge (residual {np.abs(residual).max():.2g} "
                           "voxels): the elastic field is too strong to be invertible")  # fmt: skip


def warp(volume: np.ndarray, affine: np.ndarray, deformation: Deformation, order: int = 1) -> np.ndarray:
    """Resample ``volume`` (with its voxel -> mm ``affine``) onto the output grid by pulling back; 0 outside."""
    idx = np.moveaxis(mm_to_voxels(affine, np.moveaxis(deformation.grid_mm(), 0, -1)), -1, 0)
    return ndimage.map_coordinates(volume, idx, order=order, mode="constant", cval=0.0)


def draw_deformation(rng: np.random.Generator, shape: Sequence[int], spacing_mm: float, centre_mm: np.ndarray,
                     elastic_mm: float = ELASTIC_MM) -> Deformation:  # fmt: skip
    """A subject's pose (the brain phantoms' head scale, anisotropy and rotation; 2-D: its sagittal block), a
    position shift and a smooth elastic field."""
    d = len(shape)
    linear = random_pose(rng)[-d:, -d:]  # 2-D: the (y, z) block
    shift = rng.normal(0.0, SHIFT_MM, d)
    field_shape = tuple(shape) + (1,) * (3 - d)  # smooth_fields is 3-D
    u = smooth_fields(rng, field_shape, ELASTIC_CELL_MM / spacing_mm, [elastic_mm] * d).reshape(d, *shape)
    return Deformation(linear, shift, np.asarray(centre_mm, dtype=np.float64), u, float(spacing_mm))


def field_centre(fiducials_mm: np.ndarray) -> np.ndarray:
    """The field of view's centre (template mm): the middle of the fiducials' bounding box."""
    return (fiducials_mm.min(axis=0) + fiducials_mm.max(axis=0)) / 2


def subject_rng(seed: int, spatial_dims: int, subject_id: str) -> np.random.Generator:
    """The generator of one subject's draws (deformation first, then contrast and scanner effects)."""
    return np.random.default_rng(stable_seed("afids-phantom", seed, spatial_dims, subject_id))


def generate_afids(subject_ids: Sequence[str], seed: int, spatial_dims: int = 2, image_size: int | None = None,
                   spacing_mm: float | None = None, elastic_mm: float = ELASTIC_MM,
                   progress: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """Draw the subjects. Returns ``images`` uint16 ``(N, *spatial)`` (native a.u., the brain phantom's
    :data:`~medrobust.data.brain_phantom.NATIVE_WINDOW`), ``landmarks`` float64 ``(N, K, D)`` voxel coordinates,
    ``subject_ids`` ``(N,)`` and ``names`` ``(K,)``. Each subject's draws come from a generator seeded by
    ``(seed, spatial_dims, subject_id)``: a subject does not depend on which others are drawn."""
    n = DEFAULT_IMAGE_SIZE[spatial_dims] if image_size is None else int(image_size)
    h = DEFAULT_SPACING_MM[spatial_dims] if spacing_mm is None else float(spacing_mm)
    fiducials = load_fiducials(midline_only=spatial_dims == 2)
    points = template_fiducials(fiducials, spatial_dims)
    template = load_template(spatial_dims, round(0.4 * h, 6))  # partial volume of the output voxels
    shape, centre = (n,) * spatial_dims, field_centre(points)
    out = {"images": np.zeros((len(subject_ids), *shape), np.uint16),
           "landmarks": np.zeros((len(subject_ids), len(points), spatial_dims)),
           "subject_ids": np.asarray(subject_ids, dtype=str), "names": np.asarray(fiducials.names)}  # fmt: skip
    with single_threaded_blas():
        for i, sid in enumerate(tqdm(subject_ids, desc="AFIDs phantom", unit="subject", disable=not progress)):
            rng = subject_rng(seed, spatial_dims, sid)
            deformation = draw_deformation(rng, shape, h, centre, elastic_mm)
            landmarks = deformation.push_forward(points)
            if landmarks.min() < 0 or landmarks.max() > n - 1:
                raise ValueError(f"AFIDs phantom: a fiducial of {sid} falls outside the {n}-voxel image at "
                                 f"{h} mm; raise data.image_size or data.spacing_mm")  # fmt: skip
            wm, contrast = draw_contrast(rng)
            tissue = np.stack([warp(t, template.affine, deformation) for t in template.tissue])
            signal = wm * np.tensordot(contrast[[1, 3, 4]], tissue, axes=1)  # CSF, GM, WM
            out["images"][i], out["landmarks"][i] = scanner_effects(signal, rng, wm), landmarks
    return out
