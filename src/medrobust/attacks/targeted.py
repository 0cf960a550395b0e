"""Targeted attacks on classifiers: any attack, aimed at a chosen class instead of any wrong one.

``Targeted(PGD(steps=10), target=0)`` pushes every sample towards class 0 (on LIDC: makes malignant nodules
look benign, the error a screening model must not make); ``target="least_likely"`` or ``"runner_up"`` picks
each sample's class from its clean logits. The wrapped attack climbs
:class:`~medrobust.attacks.losses.TargetedObjective` and is done with a sample once the model predicts its
target; samples whose label already is the target are returned unchanged. The points it returns are judged
by the task as usual, so robust accuracy under a targeted attack counts every error, wanted or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.base import Attack
from medrobust.attacks.losses import TargetedObjective, check_logits
from medrobust.attacks.threat import ThreatModel

TARGET_RULES = ("least_likely", "runner_up")
TARGET_KEY = "target"


def pick_targets(logits: Tensor, labels: Tensor, target: int | str) -> Tensor:
    """Target class per sample ``(B,)`` from clean ``logits`` ``(B, K)``: a fixed class, the least likely class,
    or the likeliest class other than the label (``runner_up``)."""
    k = check_logits(logits, "a targeted attack")
    k = 2 if k == 1 else k
    if isinstance(target, str):
        if target not in TARGET_RULES:
            raise ValueError(f"target must be a class index or one of {TARGET_RULES}, got {target!r}")
        if k == 2:  # binary: the only other class, whatever the rule
            return 1 - labels.long()
        masked = logits.detach().scatter(1, labels.long()[:, None], float("inf" if target == "least_likely" else "-inf"))
        return masked.argmin(1) if target == "least_likely" else masked.argmax(1)
    if isinstance(target, bool) or int(target) != target or not 0 <= int(target) < k:
        raise ValueError(f"target class must be an integer in [0, {k}), got {target!r}")
    return torch.full_like(labels.long(), int(target))


class Targeted(Attack):
    """``attack`` aimed at a target class per sample (see the module docstring).

    ``targeted`` keeps it out of the masking checks' strength order: it seeks one error, not any, so a higher
    accuracy than the untargeted attacks' is expected, not a sign of masking.

    Args:
        attack: a fixed-eps attack working through an objective (PGD, FGSM, APGD, FMN, ...).
        target: a class index, ``"least_likely"`` or ``"runner_up"`` (the same on binary tasks).
        label_key: where the batch keeps the labels.
    """

    targeted = True

    def __init__(self, attack: Attack, target: int | str = "least_likely", label_key: str = "label") -> None:
        if isinstance(target, str) and target not in TARGET_RULES:
            raise ValueError(f"target must be a class index or one of {TARGET_RULES}, got {target!r}")
        self.inner, self.target, self.label_key = attack, target, label_key
        self.norm = attack.norm
        aim = target.replace("_", "-") if isinstance(target, str) else f"class{target}"
        self.name = f"{attack.name}-to-{aim}"

    def attack(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel) -> Tensor:
        with torch.no_grad():
            targets = pick_targets(model(x).float(), batch[self.label_key], self.target)
        aimed = {**batch, TARGET_KEY: targets}
        return self.inner(model, x, aimed, TargetedObjective(TARGET_KEY), eps=threat.eps, bounds=threat.bounds)
