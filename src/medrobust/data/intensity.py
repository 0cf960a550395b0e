"""How native intensities (Hounsfield units, raw MR) map to the model's input scale.

An eps can be given in model units, in native units (converted through the window), or as a
fraction of each image's intensity range; this object is what makes the first two interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IntensityWindow:
    """Linear window: native values in ``[low, high]`` map to model values in ``[out_low, out_high]``.

    For CT with the default lung window, ``IntensityWindow(-1000, 400)`` maps HU to ``[0, 1]``, so an
    eps of 1.4 HU is 0.001 in model units.
    """

    low: float
    high: float
    out_low: float = 0.0
    out_high: float = 1.0
    unit: str = "HU"

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"intensity window needs high > low, got low={self.low}, high={self.high}")
        if not self.out_high > self.out_low:
            raise ValueError(f"intensity window needs out_high > out_low, got {self.out_low}, {self.out_high}")

    @property
    def scale(self) -> float:
        """Model units per native unit."""
        return (self.out_high - self.out_low) / (self.high - self.low)

    def to_model(self, values):
        """Native intensities (array or tensor) -> model inputs, clipped to the window."""
        clipped = values.clip(self.low, self.high)
        return (clipped - self.low) * self.scale + self.out_low

    def to_native(self, values):
        return (values - self.out_low) / self.scale + self.low

    def eps_to_model(self, eps_native: float) -> float:
        """A perturbation size in native units (e.g. HU) -> the same size in model units."""
        return float(eps_native) * self.scale

    def eps_to_native(self, eps_model: float) -> float:
        return float(eps_model) / self.scale

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.out_low, self.out_high)
