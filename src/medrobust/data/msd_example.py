"""Write a small, valid Decathlon or nnU-Net v2 dataset folder with nibabel (tests, smoke runs, a format example).

Each case is a noisy volume with two nested ellipsoids (labels 1 "outer" and 2 "inner") at a random offset, on an
anisotropic grid with a non-identity affine (so reorientation and resampling are exercised).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

CLASS_NAMES = ("background", "outer", "inner")


def example_case(rng: np.random.Generator, shape: tuple[int, int, int], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32 (*shape, channels), label uint8 shape)``: nested ellipsoids, brighter inside, plus noise."""
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"), axis=-1)
    centre = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, 3)
    radii = np.array(shape) * rng.uniform(0.25, 0.35, 3)
    r = np.linalg.norm((grid - centre) / radii, axis=-1)
    label = np.where(r < 0.5, 2, np.where(r < 1.0, 1, 0)).astype(np.uint8)
    means = rng.uniform(50, 150, channels) * np.array([[1.0], [1.6], [2.2]])  # (class, channel)
    image = means[label] + rng.normal(0, 20, (*shape, channels))
    return image.astype(np.float32), label


def write_example_dataset(
    root: str | os.PathLike, layout: str = "msd", n_cases: int = 6, shape: tuple[int, int, int] = (12, 12, 12),
    channels: int = 1, seed: int = 0,
) -> Path:
    """Write ``root/dataset.json``, ``imagesTr/`` and ``labelsTr/`` in the ``"msd"`` or ``"nnunet"`` layout."""
    if layout not in ("msd", "nnunet"):
        raise ValueError(f"layout must be 'msd' or 'nnunet', got {layout!r}")
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([-0.8, 0.8, 1.5, 1.0])  # LPS-like x flip, anisotropic voxels
    affine[:3, 3] = [10.0, -20.0, 5.0]
    training = []
    for i in range(n_cases):
        case = f"case_{i:03d}"
        image, label = example_case(rng, shape, channels)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{case}.nii.gz")
        if layout == "msd":
            volume = image[..., 0] if channels == 1 else image
            nib.save(nib.Nifti1Image(volume, affine), root / "imagesTr" / f"{case}.nii.gz")
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        else:
            for c in range(channels):
                nib.save(nib.Nifti1Image(image[..., c], affine), root / "imagesTr" / f"{case}_{c:04d}.nii.gz")
    channel_names = {str(c): f"MR{c}" for c in range(channels)}
    if layout == "msd":
        meta = {"name": "Example", "modality": channel_names, "labels": {str(k): n for k, n in enumerate(CLASS_NAMES)},
                "numTraining": n_cases, "training": training, "test": []}  # fmt: skip
    else:
        meta = {"channel_names": channel_names, "labels": {n: k for k, n in enumerate(CLASS_NAMES)},
                "numTraining": n_cases, "file_ending": ".nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
