"""Targeted attacks on classifiers: any attack, aimed at a chosen class instead of any wrong one.

``Targeted(PGD(steps=10), target=0)`` pushes every sample towards class 0 (on LIDC: makes malignant nodules
look benign, the error a screening model must not make); ``target="least_likely"`` or ``"runner_up"`` picks
each sample's class from its clean logits. The wrapped attack climbs
:class:`~medrobust.attacks.classification.objectives.TargetedObjective` and is done with a sample once the model predicts its
target; samples whose label already is the target are returned unchanged. The points it returns are judged
by the task as usual, so robust accuracy under a targeted attack counts every error, wanted or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.classification.objectives import TargetedObjective
from medrobust.attacks.core.base import Attack
from medrobust.attacks.core.batch import TARGET_KEY
from medrobust.attacks.core.session import attack_session
from medrobust.attacks.core.threat import ThreatModel
from medrobust.losses.classification import check_logits

TARGET_RULES = ("least_likely", "runner_up")


def _check_rule(target: int | str) -> int | str:
    if isinstance(target, str) and target not in TARGET_RULES:
        raise ValueError(f"target must be a class index or one of {TARGET_RULES}, got {target!r}")
    return target


def pick_targets(logits: Tensor, labels: Tensor, target: int | str) -> Tensor:
    """Target class per sample ``(B,)`` from clean ``logits`` ``(B, K)``: a fixed class, the least likely class,
    or the likeliest class other than the label (``runner_up``)."""
    k = check_logits(logits, "a targeted attack")
    k = 2 if k == 1 else k
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise ValueError(f"a targeted attack needs integer class labels, got {labels[:4].tolist()} (a regression "
                         f"target?); shift a regressor's prediction with the directional attack instead")
    if isinstance(_check_rule(target), str):
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
        attack: a fixed-eps attack that climbs the objective's own loss (PGD, FGSM, FMN, APGD with
            ``loss="default"``, ...).
        target: a class index, ``"least_likely"`` or ``"runner_up"`` (the same on binary tasks).
        label_key: where the batch keeps the labels.
    """

    targeted = True
    requires = ("num_classes",)  # classifiers only; RobustnessEvaluation checks it at setup

    def __init__(self, attack: Attack, target: int | str = "least_likely", label_key: str = "label") -> None:
        _check_rule(target)
        if attack.climbs_own_loss:  # APGD with its own CE / DLR on the label
            raise ValueError(f"Targeted needs an attack that climbs the objective's own loss; {attack.name} "
                             f"climbs loss={attack.loss!r} against the label (give it loss='default')")
        self.inner, self.target, self.label_key = attack, target, label_key
        self.norm = attack.norm
        aim = target.replace("_", "-") if isinstance(target, str) else f"class{target}"
        self.name = f"{attack.name}-to-{aim}"

    def attack(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel) -> Tensor:
        with attack_session(model, bn_eval=self.inner.bn_eval, dropout_eval=self.inner.dropout_eval), torch.no_grad():  # eval-mode layers: no statistics move
            targets = pick_targets(model(x).float(), batch[self.label_key], self.target)
        aimed = {**batch, TARGET_KEY: targets}
        objective = TargetedObjective(TARGET_KEY, self.label_key)
        return self.inner(model, x, aimed, objective, eps=threat.eps, bounds=threat.bounds)
