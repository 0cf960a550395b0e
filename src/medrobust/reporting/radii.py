"""Per-sample robustness radii from minimum-norm suites: ``radii.csv`` and a histogram per evaluation."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

RADII_KEYS = ("epoch", "split", "attack", "sample", "radius")


def write_radii(out_dir: Path, attack: str, split: str, epoch: int, radii: torch.Tensor) -> None:
    """Append one row per sample to ``radii.csv`` (model units; ``inf`` = no adversarial point found) and
    draw ``curves/<split>_<attack>_radii.png``: the radii's histogram with robust accuracy = 1 - CDF."""
    path = out_dir / "radii.csv"
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(RADII_KEYS)
        writer.writerows([epoch, split, attack, i, float(r)] for i, r in enumerate(radii.tolist()))
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
    fig.savefig(out_dir / "curves" / f"{split}_{attack}_radii.png")
    plt.close(fig)
