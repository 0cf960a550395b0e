"""Adversarial-example grids: clean image, adversarial image, the perturbation (amplified) and, for dense tasks,
label maps (ground truth, clean and adversarial predictions) over the clean image; for landmark tasks, named points
(:class:`~medrobust.reporting.points.PointSet`: truth, clean and adversarial predictions) in one row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medrobust.reporting.atomic import save_figure_atomic  # noqa: E402
from medrobust.reporting.points import PointSet  # noqa: E402

MASK_COLOURS = "tab10"  # label value k -> colour k (mod 10); 0 (background) is left transparent
EXAMPLES_SHOWN = 6  # samples per example grid (and W&B images per grid)
POINT_STYLES = (("o", "#00e000"), ("+", "#00bfff"), ("x", "#ff3030"), ("^", "#ffb000"))  # marker, colour per set
POINTS_ROW = "points"  # the row of every point set: landmarks, outlines


@dataclass
class Example:
    """An attack's example batch, on the CPU: the eps, clean and adversarial images ``(B, C, *spatial)``, what the
    grid draws over them (``masks``: label maps, points) and one caption per sample under them."""

    eps: float
    x: torch.Tensor
    x_adv: torch.Tensor
    masks: dict | None = None
    captions: list[str] | None = None


def display_index(spatial: tuple[int, ...], mask: torch.Tensor | None = None) -> tuple[int, ...]:
    """Leading indices that reduce a sample's spatial shape to 2-D: ``()`` for 2-D; for volumes, the slice along
    the first spatial axis with the most foreground (``mask > 0``) in ``mask`` ``(*spatial)``, through the median
    of a :class:`PointSet` ``(K, D)``'s points, or the middle one without a mask (or with an empty one)."""
    index = []
    while len(spatial) - len(index) > 2:
        middle = spatial[len(index)] // 2
        if isinstance(mask, PointSet) and mask.numel():
            index.append(min(max(int(torch.round(mask[:, len(index)].float().median())), 0), spatial[len(index)] - 1))
            continue
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
    captions: list[str] | None = None,
) -> Path:
    """Rows: clean, adversarial, perturbation (amplified to the full colour range, 0 = grey), then one row per
    label map in ``masks``, drawn over the clean image, and one row with every point set in ``masks`` over it.

    Args:
        x, x_adv: ``(B, C, *spatial)`` clean and adversarial images; the first ``n`` are shown (first channel).
        masks: optional ``name -> (B, *spatial)`` integer label maps, e.g. ``{"ground truth": label,
            "clean prediction": logits.argmax(1), "adversarial prediction": adv_logits.argmax(1)}``.
            Entries that are :class:`PointSet` ``(B, K, D)`` (voxel coordinates) are drawn as markers in one row,
            the first set's points labelled with its ``point_names``; in volumes they are projected onto the slice.
            Volumes show, per sample, the slice (first spatial axis) with the most foreground in the first map, or
            through the median of the first point set.
        captions: optional text per sample, written under its column (the true and predicted classes).
    """
    masks = dict(masks or {})
    for name, mask in masks.items():
        expected = (x.shape[0], mask.shape[1], x.ndim - 2) if isinstance(mask, PointSet) else (x.shape[0], *x.shape[2:])
        if tuple(mask.shape) != expected:
            what = "(B, K, D)" if isinstance(mask, PointSet) else "(B, *spatial)"
            raise ValueError(f"save_example_grid: masks[{name!r}] must have shape {what} = {expected}, "
                             f"got {tuple(mask.shape)}")  # fmt: skip
    points = {name: mask for name, mask in masks.items() if isinstance(mask, PointSet)}
    masks = {name: mask for name, mask in masks.items() if name not in points}
    planes = shown_planes(x, masks or points, n)
    n = len(planes)
    rows = ["clean", "adversarial", "perturbation", *masks, *([POINTS_ROW] if points else [])]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.65 * len(rows) + 0.1), dpi=100, squeeze=False)
    low, high = float(x[:n].min()), float(x[:n].max())
    for i, index in enumerate(planes):
        clean, adv = _plane(x[i, 0], index), _plane(x_adv[i, 0], index)
        delta = adv - clean
        scale = float(np.abs(delta).max()) or 1.0
        axes[0, i].imshow(clean, cmap="gray", vmin=low, vmax=high)
        axes[1, i].imshow(adv, cmap="gray", vmin=low, vmax=high)
        axes[2, i].imshow(delta, cmap="seismic", vmin=-scale, vmax=scale)
        caption = f"{captions[i]}\n" if captions else ""
        axes[2, i].set_xlabel(caption + f"max {scale:.2g}" + (f", slice {index[0]}" if index else ""), fontsize=7)
        for row, mask in enumerate(masks.values(), start=3):
            labels = _plane(mask[i], index)
            axes[row, i].imshow(clean, cmap="gray", vmin=low, vmax=high)
            axes[row, i].imshow(np.ma.masked_where(labels == 0, labels % 10), cmap=MASK_COLOURS, vmin=0, vmax=9,
                                alpha=0.6, interpolation="nearest")  # fmt: skip
        if points:
            axes[-1, i].imshow(clean, cmap="gray", vmin=low, vmax=high)
            _draw_points(axes[-1, i], {name: sets[i] for name, sets in points.items()})
    for row, name in enumerate(rows):
        axes[row, 0].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if points:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker=marker, color=colour, linestyle="", markersize=4, label=name)
                   for name, (marker, colour) in zip(points, POINT_STYLES * len(points))]
        columns = len(handles) if n >= 3 else 1  # below the grid, not over an image
        fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=6, frameon=False)
    fig.suptitle(title, fontsize=9)
    legend_rows = 0 if not points else 1 if n >= 3 else len(points)
    fig.tight_layout(rect=(0, 0.12 * legend_rows / fig.get_figheight(), 1, 1))
    try:
        return save_figure_atomic(fig, path)  # a stopped run leaves the previous grid, never half a PNG
    finally:
        plt.close(fig)


def _draw_points(ax, sets: dict[str, PointSet]) -> None:
    """One sample's point sets ``(K, D)`` on ``ax`` (the last two axes are the image's rows and columns), each in its
    marker and colour; the first set's points carry their names, and so do those of a set named otherwise (a targeted
    attack's targets). Points off the image leave the view as it is."""
    limits = ax.get_xlim(), ax.get_ylim()
    first_names = next(iter(sets.values())).point_names if sets else ()
    for index, (name, points) in enumerate(sets.items()):
        marker, colour = POINT_STYLES[index % len(POINT_STYLES)]
        rows, cols = points[:, -2].float().numpy(), points[:, -1].float().numpy()
        ax.scatter(cols, rows, marker=marker, c=colour, s=12, linewidths=0.8)
        if index == 0 or points.point_names != first_names:
            for label, r, c in zip(points.point_names, rows, cols):
                ax.annotate(label, (c, r), xytext=(2, 2), textcoords="offset points", fontsize=4, color="yellow",
                            annotation_clip=True)
    ax.set_xlim(limits[0])
    ax.set_ylim(limits[1])
