"""Adversarial-example grids: clean image, adversarial image, the perturbation (amplified) and, for dense tasks,
label maps (ground truth, clean and adversarial predictions) over the clean image."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

MASK_COLOURS = "tab10"  # label value k -> colour k (mod 10); 0 (background) is left transparent
EXAMPLES_SHOWN = 6  # samples per example grid (and W&B images per grid)


def display_index(spatial: tuple[int, ...], mask: torch.Tensor | None = None) -> tuple[int, ...]:
    """Leading indices that reduce a sample's spatial shape to 2-D: ``()`` for 2-D; for volumes, the slice along
    the first spatial axis with the most foreground (``mask > 0``) in ``mask`` ``(*spatial)``, or the middle one
    without a mask (or with an empty one)."""
    index = []
    while len(spatial) - len(index) > 2:
        middle = spatial[len(index)] // 2
        if mask is None:
            index.append(middle)
            continue
        sub = mask[tuple(index)] > 0
        counts = sub.flatten(1).sum(1)
        index.append(int(counts.argmax()) if bool(counts.any()) else middle)
    return tuple(index)


def shown_planes(x: torch.Tensor, masks: dict[str, torch.Tensor] | None, n: int = EXAMPLES_SHOWN
                 ) -> list[tuple[int, ...]]:
    """The plane each of the first ``n`` samples of ``x`` ``(B, C, *spatial)`` is shown at: ``display_index``
    with the sample's first label map in ``masks``. The PNG grid and the W&B images both use it, so they agree."""
    first = next(iter((masks or {}).values()), None)
    return [display_index(tuple(x.shape[2:]), None if first is None else first[i]) for i in range(min(n, len(x)))]


def _plane(array: torch.Tensor, index: tuple[int, ...]) -> np.ndarray:
    """``(*spatial)`` -> the 2-D plane at ``index``, as a float NumPy array."""
    return array[index].detach().float().cpu().numpy()


def save_example_grid(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    path: Path,
    title: str,
    n: int = EXAMPLES_SHOWN,
    masks: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Rows: clean, adversarial, perturbation (amplified to the full colour range, 0 = grey), then one row per
    label map in ``masks``, drawn over the clean image.

    Args:
        x, x_adv: ``(B, C, *spatial)`` clean and adversarial images; the first ``n`` are shown (first channel).
        masks: optional ``name -> (B, *spatial)`` integer label maps, e.g. ``{"ground truth": label,
            "clean prediction": logits.argmax(1), "adversarial prediction": adv_logits.argmax(1)}``.
            Volumes show, per sample, the slice (first spatial axis) with the most foreground in the first map.
    """
    masks = dict(masks or {})
    for name, mask in masks.items():
        if tuple(mask.shape) != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"save_example_grid: masks[{name!r}] must have shape (B, *spatial) = "
                             f"{(x.shape[0], *x.shape[2:])}, got {tuple(mask.shape)}")  # fmt: skip
    planes = shown_planes(x, masks, n)
    n = len(planes)
    rows = ["clean", "adversarial", "perturbation", *masks]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.65 * len(rows) + 0.1), dpi=100, squeeze=False)
    low, high = float(x[:n].min()), float(x[:n].max())
    for i, index in enumerate(planes):
        clean, adv = _plane(x[i, 0], index), _plane(x_adv[i, 0], index)
        delta = adv - clean
        scale = float(np.abs(delta).max()) or 1.0
        axes[0, i].imshow(clean, cmap="gray", vmin=low, vmax=high)
        axes[1, i].imshow(adv, cmap="gray", vmin=low, vmax=high)
        axes[2, i].imshow(delta, cmap="seismic", vmin=-scale, vmax=scale)
        axes[2, i].set_xlabel(f"max {scale:.2g}" + (f", slice {index[0]}" if index else ""), fontsize=7)
        for row, mask in enumerate(masks.values(), start=3):
            labels = _plane(mask[i], index)
            axes[row, i].imshow(clean, cmap="gray", vmin=low, vmax=high)
            axes[row, i].imshow(np.ma.masked_where(labels == 0, labels % 10), cmap=MASK_COLOURS, vmin=0, vmax=9,
                                alpha=0.6, interpolation="nearest")  # fmt: skip
    for row, name in enumerate(rows):
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
