"""Adversarial-example grids: clean image, adversarial image and the perturbation, amplified."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _display_slice(image: torch.Tensor) -> torch.Tensor:
    """``(C, *spatial)`` -> a 2-D array to show: first channel, middle axial slice for volumes."""
    image = image[0]
    while image.ndim > 2:
        image = image[image.shape[0] // 2]
    return image.float().cpu()


def save_example_grid(x: torch.Tensor, x_adv: torch.Tensor, path: Path, title: str, n: int = 6) -> Path:
    """Rows: clean, adversarial, perturbation (amplified to the full colour range, 0 = grey).

    Args:
        x, x_adv: ``(B, C, *spatial)`` clean and adversarial images; the first ``n`` are shown.
    """
    n = min(n, len(x))
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.0), dpi=100, squeeze=False)
    low, high = float(x[:n].min()), float(x[:n].max())
    for i in range(n):
        clean, adv = _display_slice(x[i]), _display_slice(x_adv[i])
        delta = adv - clean
        scale = float(delta.abs().max()) or 1.0
        axes[0, i].imshow(clean, cmap="gray", vmin=low, vmax=high)
        axes[1, i].imshow(adv, cmap="gray", vmin=low, vmax=high)
        axes[2, i].imshow(delta, cmap="seismic", vmin=-scale, vmax=scale)
        axes[2, i].set_xlabel(f"max {scale:.2g}", fontsize=7)
    for row, name in enumerate(("clean", "adversarial", "perturbation")):
        axes[row, 0].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
