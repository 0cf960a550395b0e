"""Convenience forms for plain classifiers: ``pgd(model, images, labels, eps=...)``, ``fgsm(...)``.

The task modules are objectives themselves; a bare ``nn.Module`` classifier gets :class:`ClassifierObjective`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from medrobust.attacks.classification.objectives import ClassifierObjective, TargetedObjective
from medrobust.attacks.core.batch import TARGET_KEY
from medrobust.attacks.core.threat import ThreatModel
from medrobust.attacks.gradient.fgsm import fgsm_attack
from medrobust.attacks.gradient.pgd import pgd_attack
from medrobust.attacks.minimum_norm.fmn import fmn_attack


def pgd(
    model: Callable,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float | Tensor,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    early_stop: bool = False,
    targets: Tensor | None = None,
) -> Tensor:
    """PGD on a plain classifier: ``model(images (B, C, *spatial)) -> logits``, ``labels (B,)``.

    ``norm``: ``"linf"``, ``"l2"`` or ``"l1"``. ``step_size`` is absolute (default ``2.5 * eps / steps``);
    ``bounds=None`` for unbounded inputs. By
    default (``early_stop=False``) every sample runs all steps and the last iterate is returned, or an
    earlier higher-loss iterate where the loss fell at the end; ``early_stop=True`` returns the first misclassified point per sample and skips
    the work on samples already fooled (faster for evaluation). ``targets`` ``(B,)``: a targeted attack, each
    sample pushed towards its target class (done once the model predicts it).
    """
    batch, objective = _batch_and_objective(labels, targets)
    return pgd_attack(model, images, batch, objective,
                      threat=ThreatModel(norm, eps, bounds), steps=steps, step_size=step_size,
                      random_start=random_start, restarts=restarts, early_stop=early_stop)


def fgsm(
    model: Callable,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float | Tensor,
    norm: str = "linf",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    random_start: bool = False,
) -> Tensor:
    """FGSM (FGSM-RS with ``random_start``) on a plain classifier; see :func:`pgd` for the arguments."""
    return fgsm_attack(model, images, {"label": labels}, ClassifierObjective(),
                       threat=ThreatModel(norm, eps, bounds), random_start=random_start)


def minimal_perturbation(
    model: Callable,
    images: Tensor,
    labels: Tensor,
    *,
    norm: str = "linf",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    steps: int = 100,
    targets: Tensor | None = None,
) -> Tensor:
    """Per-sample robustness radius ``(B,)`` of a plain classifier in ``norm`` (``linf``, ``l2``, ``l1``), found by FMN.

    The norm of the smallest adversarial perturbation FMN finds for ``images`` ``(B, C, *spatial)``: ``0``
    where the clean image is already misclassified, ``inf`` where none was found (e.g. the bounds leave no
    room). Robust accuracy at ``eps`` is ``(radii > eps).float().mean()``. With ``targets`` ``(B,)``: the
    smallest perturbation that makes the model predict each sample's target class (0 where it already does).
    """
    batch, objective = _batch_and_objective(labels, targets)
    _, norms = fmn_attack(model, images, batch, objective, bounds=bounds, norm=norm, steps=steps, return_norms=True)
    return norms


def _batch_and_objective(labels: Tensor, targets: Tensor | None) -> tuple[dict, Any]:
    if targets is None:
        return {"label": labels}, ClassifierObjective()
    return {"label": labels, TARGET_KEY: targets}, TargetedObjective(TARGET_KEY)
