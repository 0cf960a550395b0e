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
from medrobust.attacks.apgd import APGD, apgd_attack
from medrobust.attacks.api import ClassifierObjective, fgsm, minimal_perturbation, pgd
from medrobust.attacks.corruptions import CORRUPTIONS, BiasField, Corruption, GaussianBlur, GaussianNoise, RicianNoise
from medrobust.attacks.cw import CWL2, cw_l2_attack
from medrobust.attacks.dag import DAG, dag_attack
from medrobust.attacks.deepfool import DeepFool, deepfool_attack
from medrobust.attacks.fgsm import FGSM, fgsm_attack
from medrobust.attacks.fmn import FMN, MinimumNormAttack, fmn_attack
from medrobust.attacks.losses import TargetedObjective, dlr_loss, margin_loss, targeted_dlr_loss, with_loss
from medrobust.attacks.pgd import PGD, pgd_attack
from medrobust.attacks.curve import attack_curve
from medrobust.attacks.masking import MaskingFlag, check_rows, probe_model
from medrobust.attacks.suites import SUITES, Cascade, MinimumNormCurve, build_suite, robust_accuracy
from medrobust.attacks.square import Square, square_attack
from medrobust.attacks.targeted import Targeted, pick_targets
from medrobust.attacks.threat import EPS_UNITS, NORMS, ThreatModel, batch_view, resolve_eps
from medrobust.attacks.universal import UniversalPerturbation, apply_universal, fit_universal_perturbation
from medrobust.attacks.directional import Directional, ShiftObjective, directional_attack, with_clean_prediction
from medrobust.attacks.universal_shift import DEFAULT_GROUP_SIZES, universal_shift

__all__ = [
    "Cascade",
    "MaskingFlag",
    "MinimumNormCurve",
    "SUITES",
    "attack_curve",
    "build_suite",
    "check_rows",
    "probe_model",
    "robust_accuracy",
    "APGD",
    "Attack",
    "AttackResult",
    "BiasField",
    "CORRUPTIONS",
    "CWL2",
    "ClassifierObjective",
    "Corruption",
    "DAG",
    "DeepFool",
    "EPS_UNITS",
    "FGSM",
    "FMN",
    "GaussianBlur",
    "GaussianNoise",
    "MinimumNormAttack",
    "NORMS",
    "PGD",
    "RicianNoise",
    "Square",
    "Targeted",
    "TargetedObjective",
    "ThreatModel",
    "UniversalPerturbation",
    "apgd_attack",
    "apply_universal",
    "batch_view",
    "cw_l2_attack",
    "dag_attack",
    "deepfool_attack",
    "dlr_loss",
    "fgsm",
    "fgsm_attack",
    "fit_universal_perturbation",
    "fmn_attack",
    "index_batch",
    "margin_loss",
    "minimal_perturbation",
    "pgd",
    "pgd_attack",
    "pick_targets",
    "resolve_eps",
    "square_attack",
    "targeted_dlr_loss",
    "with_loss",
    "DEFAULT_GROUP_SIZES",
    "Directional",
    "ShiftObjective",
    "directional_attack",
    "universal_shift",
    "with_clean_prediction",
]
