"""Out-of-distribution source images for seed 002's OOD attack: inputs that are not nodule patches.

Every source gives ``(n, 1, H, W)`` float32 images in the model's input bounds, the same for the same seed:

- ``noise``: Gaussian noise with the mean and standard deviation of in-distribution images (a reference batch),
  clamped into the bounds;
- ``lung``: lung-phantom patches with no nodule (:func:`medrobust.data.lung_phantom.render_background_patch`,
  parenchyma, vessels, sometimes a pleural wall), in HU, windowed to model units by the data's intensity window:
  the nodule patches' own background, with the nodule left out;
- ``other``: another task's images: mid-axial slices of one brain-age MRI phantom subject
  (:func:`medrobust.data.brain_phantom.generate_subjects`), each min-max scaled into the bounds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from medrobust.data.intensity import IntensityWindow
from medrobust.data.lung_phantom import render_background_patch
from medrobust.data.patches import stable_seed

SOURCES = ("noise", "lung", "other")
BRAIN_AGE_RANGE = (20.0, 90.0)  # the brain-age phantom's default ages


def ood_sources(names: Sequence[str], n: int, reference_images: Tensor, shape: tuple[int, int],
                intensity: IntensityWindow | None, bounds: tuple[float, float] | None, seed: int, *,
                spacing_mm: float = 1.0, cache_dir: str | None = None) -> dict[str, Tensor]:
    """``{name: (n, 1, H, W) float32}`` for each source in ``names`` (module docstring), on the CPU.

    Args:
        names: sources, from :data:`SOURCES`.
        n: images per source, >= 1.
        reference_images: in-distribution images ``(B, C, H, W)`` (``noise`` takes their mean and std).
        shape: ``(H, W)``.
        intensity: the data's window from native units (HU) to model units; ``lung`` needs it.
        bounds: ``(low, high)`` of valid inputs; ``None``: the reference images' range.
        seed: every draw follows from it.
        spacing_mm: pixel size of the lung patches (the data's ``spacing_mm``).
        cache_dir: where the brain atlas ``other`` renders from is cached (derived in a few seconds otherwise).
    """
    unknown = [name for name in names if name not in SOURCES]
    if unknown:
        raise ValueError(f"eval.sources: unknown OOD source(s) {unknown}; choose from {list(SOURCES)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"ood_sources needs n >= 1 images per source, got {n!r}")
    height, width = (int(s) for s in shape)
    reference = reference_images.detach().float().cpu()
    low, high = bounds if bounds is not None else (float(reference.min()), float(reference.max()))
    makers = {"noise": lambda: noise_images(n, reference, (height, width), (low, high), seed),
              "lung": lambda: lung_images(n, (height, width), intensity, (low, high), seed, spacing_mm),
              "other": lambda: brain_images(n, (height, width), (low, high), seed, cache_dir)}
    return {name: makers[name]() for name in names}


def noise_images(n: int, reference: Tensor, shape: tuple[int, int], bounds: tuple[float, float], seed: int) -> Tensor:
    """Gaussian noise ``(n, 1, H, W)`` with the reference images' mean and std (over all their pixels), clamped."""
    generator = torch.Generator().manual_seed(stable_seed("ood-noise", seed))
    mean, std = float(reference.mean()), float(reference.std())
    images = torch.randn((n, 1, *shape), generator=generator) * std + mean
    return images.clamp(*bounds)


def lung_images(n: int, shape: tuple[int, int], intensity: IntensityWindow | None, bounds: tuple[float, float],
                seed: int, spacing_mm: float) -> Tensor:
    """Nodule-free lung-phantom patches ``(n, 1, H, W)``, windowed to model units and clamped into ``bounds``."""
    if intensity is None:
        raise ValueError("OOD source 'lung' renders CT patches in HU and needs the data's intensity window to map "
                         "them to model units; this datamodule has none (drop 'lung' from eval.sources)")
    side = max(shape)
    patches = [_crop(render_background_patch(2, side, spacing_mm, stable_seed("ood-lung", seed, i)), shape)
               for i in range(n)]
    hu = np.stack(patches).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(intensity.to_model(hu)))[:, None].float().clamp(*bounds)


def brain_images(n: int, shape: tuple[int, int], bounds: tuple[float, float], seed: int,
                 cache_dir: str | None) -> Tensor:
    """``n`` axial slices around the middle of one brain-age phantom subject ``(n, 1, H, W)``, anterior up, each
    min-max scaled into ``bounds``. One subject of ``max(H, W)^3`` voxels: about a second (the atlas cached)."""
    from medrobust.data.brain_phantom import generate_subjects  # nilearn's template: only when asked for

    side = max(shape)
    with tempfile.TemporaryDirectory(prefix="medrobust-atlas-") as folder:
        subject = generate_subjects([f"ood-{seed}"], seed, side, BRAIN_AGE_RANGE, cache_dir or folder, progress=False)
    volume = subject["images"][0]
    middle, spread = side // 2, max(side // 8, 1)
    depths = np.round(np.linspace(middle - spread, middle + spread, n)).astype(int) if n > 1 else [middle]
    low, high = bounds
    slices = []
    for z in depths:
        image = _crop(np.rot90(volume[:, :, z]).astype(np.float32), shape)  # RAS (x, y) -> rows posterior-down
        span = float(image.max() - image.min())
        scaled = (image - image.min()) / span if span > 0 else np.zeros_like(image)
        slices.append(low + scaled * (high - low))
    return torch.from_numpy(np.stack(slices))[:, None].float()


def _crop(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The central ``shape`` ``(H, W)`` of a square 2-D ``image`` at least that large."""
    top, left = (image.shape[0] - shape[0]) // 2, (image.shape[1] - shape[1]) // 2
    return image[top:top + shape[0], left:left + shape[1]]
