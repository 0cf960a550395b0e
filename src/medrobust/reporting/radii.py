"""Per-sample robustness radii from minimum-norm suites: a histogram per evaluation (the values themselves are
``metric="radius"`` rows of ``robustness.csv``, see :func:`medrobust.reporting.robustness.radius_rows`)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from medrobust.reporting.atomic import save_figure_atomic  # noqa: E402

def plot_radii(out_dir: Path, attack: str, split: str, epoch: int, radii: torch.Tensor) -> None:
    """``curves/<split>_<attack>_radii.png``: the radii's histogram (model units; ``inf`` = no adversarial point
    found) with robust accuracy = 1 - CDF."""
    finite = sorted(r for r in radii.tolist() if math.isfinite(r))
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    if finite:
        ax.hist(finite, bins=30, color="#4477aa", alpha=0.6, label="radius histogram")
        twin = ax.twinx()
        n = len(radii)
        twin.step(finite, [1 - (i + 1) / n for i in range(len(finite))], where="post", color="k",
                  label="robust accuracy (1 - CDF)")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("robust accuracy")
    ax.set_xlabel("radius (model units)")
    ax.set_ylabel("samples")
    ax.set_title(f"{split}: {attack} radii, epoch {epoch} ({len(radii) - len(finite)} never fooled)")
    fig.tight_layout()
    (out_dir / "curves").mkdir(parents=True, exist_ok=True)
    save_figure_atomic(fig, out_dir / "curves" / f"{split}_{attack}_radii.png")
    plt.close(fig)
