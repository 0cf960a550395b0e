"""Base of the configurable attack classes and the argument checks they share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from torch import Tensor

from medrobust.attacks.threat import ThreatModel


def check_at_least(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value: float | None) -> float | None:
    if value is not None and not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return None if value is None else float(value)


def check_fraction(name: str, value: float) -> float:
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


class Attack:
    """Base of the configurable attacks: hyperparameters at construction, ``eps`` and ``bounds`` per call.

    Subclasses set ``name`` and ``norm`` and implement :meth:`attack` (the functional form).
    """

    name: str
    norm: str

    def __call__(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
                 eps: float | Tensor, bounds: tuple[float, float] | None) -> Tensor:
        """Adversarial images ``(B, C, *spatial)`` for ``x``; ``eps`` in model units, float or ``(B,)``."""
        return self.attack(model, x, batch, objective, threat=ThreatModel(self.norm, eps, bounds))

    def attack(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if key != "name")
        return f"{type(self).__name__}({args})"
