"""Adversarial attacks: pure torch, Lightning-free, any rank ``(B, C, *spatial)``.

Functional form (adv_lib style)::

    x_adv = pgd_attack(model, x, batch, objective, threat=ThreatModel("linf", eps, bounds), steps=10)

where ``objective`` has ``attack_loss(output, batch) -> (B,)`` and ``is_correct(output, batch) -> (B,)``
(the task modules implement both). Configurable classes for Hydra and callbacks::

    PGD(norm="linf", steps=10)(model, x, batch, objective, eps=eps, bounds=bounds)

and a convenience form for plain classifiers: ``pgd(model, images, labels, eps=...)``.
"""

from medrobust.attacks._engine import AttackResult, index_batch
from medrobust.attacks.base import Attack
from medrobust.attacks.api import ClassifierObjective, fgsm, pgd
from medrobust.attacks.fgsm import FGSM, fgsm_attack
from medrobust.attacks.pgd import PGD, pgd_attack
from medrobust.attacks.threat import EPS_UNITS, NORMS, ThreatModel, batch_view, resolve_eps

__all__ = [
    "Attack",
    "AttackResult",
    "ClassifierObjective",
    "EPS_UNITS",
    "FGSM",
    "NORMS",
    "PGD",
    "ThreatModel",
    "batch_view",
    "fgsm",
    "fgsm_attack",
    "index_batch",
    "pgd",
    "pgd_attack",
    "resolve_eps",
]
