"""Common corruptions on the same metric-vs-strength footing as attacks: ``eps`` is the severity.

Each corruption is a :class:`~medrobust.attacks.core.base.Perturbation` (called exactly like an attack, so suites and
callbacks draw robustness curves for them too) that ignores the model and the objective:

=================  ==========================================================================  =============
name               what ``eps`` is (model units)                                               made with
=================  ==========================================================================  =============
``gaussian_noise``  std of additive Gaussian noise                                              torch
``rician_noise``    std of each of the two Gaussian components of MR magnitude noise            torch
``bias_field``      range ``(-eps, eps)`` of the polynomial coefficients of ``log(field)``       MONAI
``blur``            Gaussian sigma in pixels / voxels, every spatial axis                        MONAI
=================  ==========================================================================  =============

``eps`` may be a float or one value per sample ``(B,)`` (e.g. from ``resolve_eps(..., "range")``); a sample
with severity 0 is returned unchanged, and every result is clamped into ``bounds``. Their ``norm`` is
``"none"``: the change is not bounded in any Lp ball, so suites must not check ``||x_adv - x|| <= eps``.

Randomness is deterministic: with an integer ``seed`` (default 0) the draw is re-seeded on every call, so
the same images give the same corrupted images (the same noise for every batch of a given shape); with
``seed=None`` the draw comes from torch's global RNG (reproducible under ``seed_everything``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Perturbation, check_at_least
from medrobust.attacks.core.threat import batch_view, check_bounds, check_eps, clamp_bounds, per_sample_eps


# -- functional forms (no clamping; severities float or (B,)) ----------------------------------------
def _per_sample(severity: float | Tensor, x: Tensor) -> Tensor:
    return per_sample_eps(check_eps(severity), x)  # validated (finite, >= 0) and shaped (B,)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(int(seed))


def _normal(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def gaussian_noise(x: Tensor, sigma: float | Tensor, *, seed: int | None = 0) -> Tensor:
    """``x + sigma * n``, ``n ~ N(0, 1)`` i.i.d. per pixel; ``x`` ``(B, C, *spatial)``, sigma float or ``(B,)``."""
    sigma = batch_view(_per_sample(sigma, x), x)
    return x + sigma * _normal(x, _generator(seed, x.device))


def rician_noise(x: Tensor, sigma: float | Tensor, *, floor: float | None = None, seed: int | None = 0) -> Tensor:
    """Rician (MR magnitude) noise: ``floor + sqrt((m + sigma n1)^2 + (sigma n2)^2)`` with ``m = x - floor``.

    A magnitude image is >= 0 with its background at 0, where the noise is biased upwards (mean
    ``sigma sqrt(pi / 2)``) rather than zero-mean. ``floor`` is the model-unit value of magnitude 0: the lower
    bound of ``[low, high]`` inputs; ``None`` takes each image's minimum (the background of a z-scored MR
    image). Shapes as :func:`gaussian_noise`.
    """
    sigma = batch_view(_per_sample(sigma, x), x)
    base = x.flatten(1).amin(dim=1) if floor is None else torch.full((x.shape[0],), float(floor)).to(x)
    base = batch_view(base, x)
    generator = _generator(seed, x.device)
    real = x - base + sigma * _normal(x, generator)
    imaginary = sigma * _normal(x, generator)
    return base + torch.sqrt(real ** 2 + imaginary ** 2)


def gaussian_blur(x: Tensor, sigma: float | Tensor) -> Tensor:
    """Gaussian blur with ``sigma`` pixels / voxels along every spatial axis, images of rank 1 to 3.

    MONAI's separable erf-sampled Gaussian kernels (``monai.networks.layers.GaussianFilter``'s), truncated at
    4 sigma, with replicate padding so borders keep their intensity (MONAI's filter pads with zeros, which
    darkens them). Samples with the same sigma are filtered together.
    """
    from monai.networks.layers.convutils import gaussian_1d
    from monai.networks.layers.simplelayers import separable_filtering

    spatial_dims = x.ndim - 2
    if not 1 <= spatial_dims <= 3:
        raise ValueError(f"blur supports images (B, C, *spatial) with 1 to 3 spatial dims, got {tuple(x.shape)}")
    sigma = _per_sample(sigma, x)
    out = x.clone()
    for value in torch.unique(sigma[sigma > 0]).tolist():
        kernel = gaussian_1d(torch.tensor(value, dtype=torch.float64), truncated=4.0, approx="erf")
        kernel = kernel / kernel.sum()  # exactly normalized: a flat image stays flat, even in float64
        chosen = sigma == value
        # under autocast the convolution returns bfloat16 / float16: the corrupted image keeps the input's dtype
        out[chosen] = separable_filtering(x[chosen], [kernel] * spatial_dims, mode="replicate").to(out.dtype)
    return out


def bias_field(x: Tensor, coeff: float | Tensor, *, degree: int = 3, seed: int | None = 0) -> Tensor:
    """A smooth multiplicative field: ``x * exp(P)``, ``P`` a Legendre polynomial in coordinates on [-1, 1].

    MONAI's ``RandBiasField`` (NiftyNet's model of MR intensity inhomogeneity) with ``coeff_range =
    (-coeff, coeff)`` per sample: the coefficients are ``coeff * u``, ``u`` uniform in ``(-1, 1)`` and drawn
    from ``seed`` image by image, so ``log(field)`` scales linearly with the severity. ``P`` has the terms
    ``P_i(y) P_j(x)``, ``j <= i <= degree`` in 2-D and ``P_i P_j P_k``, ``i + j + k <= degree`` in 3-D (MONAI's
    choice), so it is at most of ``degree`` along each axis. One field per image, shared by its channels.
    Images ``(B, C, H, W)`` or ``(B, C, D, H, W)``; coeff float or ``(B,)``.
    """
    from monai.data import MetaTensor
    from monai.transforms import RandBiasField

    if x.ndim not in (4, 5):
        raise ValueError(f"bias_field supports 2-D and 3-D images (B, C, H, W) / (B, C, D, H, W), "
                         f"got {tuple(x.shape)}")
    coeff = _per_sample(coeff, x).tolist()
    transform = RandBiasField(degree=check_at_least("degree", degree, 1), prob=1.0, dtype=None)
    # seed None: a seed from torch's global RNG, so seed_everything governs MONAI's numpy draw too
    transform.set_random_state(int(torch.randint(2 ** 31, ())) if seed is None else int(seed))
    out = []
    for image, value in zip(x, coeff):
        transform.coeff_range = (-value, value)
        field = transform(image)
        out.append(field.as_tensor() if isinstance(field, MetaTensor) else torch.as_tensor(field))
    return torch.stack(out).to(dtype=x.dtype, device=x.device)


# -- the Attack classes ------------------------------------------------------------------------------
class Corruption(Perturbation):
    """Base of the corruptions: ``eps`` is the severity, the model and objective are not used.

    ``__call__(model, x, batch, objective, *, eps, bounds)`` returns corrupted images ``(B, C, *spatial)``,
    detached, like ``x``, clamped into ``bounds``; samples with severity 0 are returned as they are.
    ``norm`` is ``"none"``: a corruption has no Lp ball, so it is no :class:`~medrobust.attacks.Attack`.
    """

    norm = "none"
    seeks_errors = False  # a fixed transform per severity: curves take each severity alone, masking checks skip it

    def __init__(self, seed: int | None = 0, scale: float = 1.0) -> None:
        """``scale``: severity per unit of eps, so corruptions of different kinds share one eps list
        (e.g. eps in [0, 1] as a fraction of each corruption's largest severity)."""
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.seed = None if seed is None else int(seed)
        self.scale = float(scale)

    def __call__(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
                 eps: float | Tensor, bounds: tuple[float, float] | None) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"corruptions apply to floating-point images, got {getattr(x, 'dtype', type(x))}")
        bounds = check_bounds(bounds)
        with torch.inference_mode(False), torch.no_grad():
            x = x.detach().clone()  # a normal tensor even when the caller is in inference mode
            severity = _per_sample(eps, x) * self.scale
            if not bool((severity > 0).any()):
                return x
            out = self.corrupt(x, severity, bounds)
            out = torch.where(batch_view(severity > 0, x), out, x)  # severity 0 is exactly the identity
            return clamp_bounds(out, bounds)

    def corrupt(self, x: Tensor, severity: Tensor, bounds: tuple[float, float] | None) -> Tensor:
        """Corrupted ``x`` ``(B, C, *spatial)`` at per-sample ``severity`` ``(B,)``, before clamping."""
        raise NotImplementedError


class GaussianNoise(Corruption):
    """Additive Gaussian noise, std ``eps`` (model units); see :func:`gaussian_noise`."""

    name = "gaussian_noise"

    def corrupt(self, x, severity, bounds):
        return gaussian_noise(x, severity, seed=self.seed)


class RicianNoise(Corruption):
    """MR magnitude noise, std ``eps`` per component; magnitude 0 at ``bounds[0]`` (else each image's
    minimum); see :func:`rician_noise`."""

    name = "rician_noise"

    def corrupt(self, x, severity, bounds):
        return rician_noise(x, severity, floor=None if bounds is None else bounds[0], seed=self.seed)


class BiasField(Corruption):
    """Smooth multiplicative intensity inhomogeneity, coefficients in ``(-eps, eps)``; see :func:`bias_field`.

    Args:
        degree: total degree of the Legendre polynomial ``log(field)`` (>= 1; MONAI's default 3).
        seed: see the module docstring.
    """

    name = "bias_field"

    def __init__(self, degree: int = 3, seed: int | None = 0, scale: float = 1.0) -> None:
        super().__init__(seed, scale)
        self.degree = check_at_least("degree", degree, 1)

    def corrupt(self, x, severity, bounds):
        return bias_field(x, severity, degree=self.degree, seed=self.seed)


class GaussianBlur(Corruption):
    """Gaussian blur, sigma ``eps`` pixels / voxels (deterministic: ``seed`` is unused); see
    :func:`gaussian_blur`."""

    name = "blur"

    def corrupt(self, x, severity, bounds):
        return gaussian_blur(x, severity)


CORRUPTIONS: dict[str, type[Corruption]] = {
    cls.name: cls for cls in (GaussianNoise, RicianNoise, BiasField, GaussianBlur)
}
