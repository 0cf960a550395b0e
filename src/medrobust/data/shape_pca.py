"""Point-distribution model of nodule outlines, for PCA shape augmentation (Chen et al., SPIE MI 2021).

Outlines are ``(k, 2)`` ``(row, col)`` points from :func:`medrobust.data.shape_outline.outline_points`, whose
start and orientation rule makes point ``i`` correspond across outlines. Alignment removes only each outline's
centroid: scale and rotation are kept, since a nodule's size is part of its shape. All shapes here are centred
at the origin; a caller adds the centre it wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _centred(outlines: np.ndarray) -> np.ndarray:
    """``(..., k, 2)`` outlines less their own centroid (mean point)."""
    return outlines - outlines.mean(axis=-2, keepdims=True)


@dataclass(frozen=True, eq=False)  # arrays: compare with np.allclose, not ==
class ShapeModel:
    """Mean shape ``mean (k, 2)``, unit principal modes ``modes (m, k, 2)`` ordered by decreasing variance,
    and their standard deviations ``sd (m,)`` (px, the square roots of the covariance's eigenvalues)."""

    mean: np.ndarray
    modes: np.ndarray
    sd: np.ndarray

    def __post_init__(self) -> None:
        k = self.mean.shape[0] if self.mean.ndim == 2 else -1
        if self.mean.shape != (k, 2) or self.modes.shape[1:] != (k, 2) or self.sd.shape != self.modes.shape[:1]:
            raise ValueError(
                f"inconsistent shape model: mean {self.mean.shape} (want (k, 2)), modes {self.modes.shape} "
                f"(want (m, k, 2)), sd {self.sd.shape} (want (m,))"
            )

    @property
    def n_modes(self) -> int:
        """Number of modes available, ``min(N - 1, 2k)`` for ``N`` training outlines."""
        return len(self.sd)

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """``(m,)`` share of the training shapes' total variance along each mode."""
        var = self.sd**2
        return var / var.sum() if var.sum() > 0 else np.zeros_like(var)

    @classmethod
    def fit(cls, outlines: np.ndarray) -> ShapeModel:
        """Fit on ``outlines (N, k, 2)`` (corresponding points, any centres); needs ``N >= 2``."""
        x = np.asarray(outlines, dtype=np.float64)
        if x.ndim != 3 or x.shape[2] != 2:
            raise ValueError(f"shape model needs outlines of shape (N, k, 2), got {x.shape}")
        n, k = x.shape[:2]
        if n < 2:
            raise ValueError(f"shape model needs at least 2 outlines to find modes, got {n}")
        flat = _centred(x).reshape(n, 2 * k)
        mean = flat.mean(axis=0)
        _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
        m = min(n - 1, 2 * k)  # the centred data's rank is at most N - 1
        return cls(mean.reshape(k, 2), vt[:m].reshape(m, k, 2), s[:m] / np.sqrt(n - 1))

    def _check_modes(self, modes: int) -> int:
        if int(modes) != modes or not 0 <= modes <= self.n_modes:
            raise ValueError(f"asked for {modes} modes, the shape model has {self.n_modes} (0..{self.n_modes})")
        return int(modes)

    def _check_outline(self, outline: np.ndarray) -> np.ndarray:
        outline = np.asarray(outline, dtype=np.float64)
        if outline.shape != self.mean.shape:
            raise ValueError(f"outline of shape {outline.shape} does not match the model's {self.mean.shape}")
        return outline

    def shape(self, coefficients: np.ndarray) -> np.ndarray:
        """``(k, 2)`` shape ``mean + sum_i c_i sd_i mode_i`` for ``coefficients (c,)`` in units of sd
        (the first ``c`` modes), centred at the origin."""
        c = np.asarray(coefficients, dtype=np.float64).reshape(-1)
        m = self._check_modes(len(c))
        return self.mean + np.tensordot(c * self.sd[:m], self.modes[:m], axes=1)

    def sample(self, modes: int, rng: np.random.Generator, limit: float = 2.0) -> np.ndarray:
        """A random ``(k, 2)`` shape, centred at the origin: the first ``modes`` coefficients drawn from
        ``Uniform[-limit, limit]`` (in sd); ``modes=0`` gives the mean shape."""
        m = self._check_modes(modes)
        return self.shape(rng.uniform(-limit, limit, size=m))

    def project(self, outline: np.ndarray, modes: int) -> np.ndarray:
        """Coefficients ``(modes,)`` in units of sd of ``outline (k, 2)`` (any centre) on the first modes;
        a mode of zero variance gets coefficient 0."""
        m = self._check_modes(modes)
        b = np.tensordot(self.modes[:m], _centred(self._check_outline(outline)) - self.mean, axes=2)
        sd = self.sd[:m]
        return np.divide(b, sd, out=np.zeros_like(b), where=sd > 1e-12 * max(float(self.sd.max(initial=0)), 1.0))

    def residual(self, outline: np.ndarray, modes: int) -> float:
        """RMS point distance (px) between the centred ``outline (k, 2)`` and its reconstruction from the first
        ``modes`` modes: large for shapes the model cannot explain."""
        m = self._check_modes(modes)
        d = _centred(self._check_outline(outline)) - self.mean
        recon = np.tensordot(np.tensordot(self.modes[:m], d, axes=2), self.modes[:m], axes=1)
        return float(np.sqrt(np.mean(np.sum((d - recon) ** 2, axis=1))))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays to cache the model (e.g. with ``np.savez``); :meth:`from_state` restores it."""
        return {"mean": self.mean.copy(), "modes": self.modes.copy(), "sd": self.sd.copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ShapeModel:
        """Inverse of :meth:`state_dict`."""
        missing = {"mean", "modes", "sd"} - set(state)
        if missing:
            raise ValueError(f"shape model state lacks {sorted(missing)}")
        return cls(*(np.asarray(state[key], dtype=np.float64) for key in ("mean", "modes", "sd")))
