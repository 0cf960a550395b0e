"""Adversarial attacks: pure torch, Lightning-free, any rank ``(B, C, *spatial)``, one folder per family.

- ``core``: the threat model, the model session, batches, best-point tracking, objective adapters, the
  :class:`Attack` base class (what an attack declares);
- ``gradient``: FGSM, PGD, APGD; ``minimum_norm``: FMN, DeepFool, C&W; ``black_box``: Square;
  ``group``: universal perturbations; ``sparse``: JSMA (L0, changed input values);
- task families, for attacks that only make sense there: ``classification`` (targeted attacks, the
  convenience forms for plain classifiers), ``regression`` (prediction shifts), ``segmentation`` (DAG, SegPGD, CosPGD, the
  lowest-Dice ensemble), ``landmarks`` (the targeted landmark attack), ``detection`` (TOG and DAG on CenterNet
  detectors).

Functional form (adv_lib style)::

    x_adv = pgd_attack(model, x, batch, objective, threat=ThreatModel("linf", eps, bounds), steps=10)

where ``objective`` has ``attack_loss(output, batch) -> (B,)`` and ``is_correct(output, batch) -> (B,)``
(the task modules implement both). Configurable classes for Hydra and callbacks::

    PGD(norm="linf", steps=10)(model, x, batch, objective, eps=eps, bounds=bounds)

and a convenience form for plain classifiers: ``pgd(model, images, labels, eps=...)``.

Curves, suites, masking checks, corruptions and eps units live in :mod:`medrobust.evaluation`; their names
are also reachable here, as they were before the split.
"""

from importlib import import_module

from medrobust.attacks.black_box.square import Square, square_attack
from medrobust.attacks.classification.api import fgsm, minimal_perturbation, pgd
from medrobust.attacks.classification.objectives import ClassifierObjective, TargetedObjective
from medrobust.attacks.classification.targeted import Targeted, pick_targets
from medrobust.attacks.core.base import Attack, CurveAttack
from medrobust.attacks.core.batch import index_batch
from medrobust.attacks.core.objectives import with_loss
from medrobust.attacks.core.threat import NORMS, ThreatModel, batch_view
from medrobust.attacks.core.tracking import AttackResult
from medrobust.attacks.detection.dag import DetectionDAG, detection_dag_attack
from medrobust.attacks.detection.tog import TOG, TogObjective
from medrobust.attacks.gradient.apgd import APGD, apgd_attack
from medrobust.attacks.gradient.fgsm import FGSM, fgsm_attack
from medrobust.attacks.gradient.pgd import PGD, pgd_attack
from medrobust.attacks.group.universal import (
    UniversalPerturbation,
    apply_universal,
    fit_universal_perturbation,
    universal_attack,
)
from medrobust.attacks.landmarks.targeted import LandmarkAimObjective, LandmarkTargeted
from medrobust.attacks.minimum_norm.base import MinimumNormAttack
from medrobust.attacks.minimum_norm.cw import CWL2, cw_l2_attack
from medrobust.attacks.minimum_norm.deepfool import DeepFool, deepfool_attack
from medrobust.attacks.minimum_norm.fmn import FMN, fmn_attack
from medrobust.attacks.regression.directional import (
    Directional,
    ShiftObjective,
    directional_attack,
    with_clean_prediction,
)
from medrobust.attacks.regression.universal_shift import DEFAULT_GROUP_SIZES, universal_shift
from medrobust.attacks.segmentation.cospgd import CosPGD, cospgd_attack
from medrobust.attacks.segmentation.dag import DAG, dag_attack
from medrobust.attacks.segmentation.ensemble import SegEnsemble, seg_ensemble_attack
from medrobust.attacks.segmentation.segpgd import SegPGD, segpgd_attack
from medrobust.attacks.sparse.jsma import JSMA, jsma_attack
from medrobust.losses.classification import dlr_loss, margin_loss, targeted_dlr_loss

# names that moved to medrobust.evaluation, resolved on first use: the evaluation imports the attacks, so an
# eager import here would be circular
_EVALUATION = {
    "attack_curve": "curve", "Cascade": "suites", "MinimumNormCurve": "suites", "SUITES": "suites",
    "build_suite": "suites", "robust_accuracy": "suites", "MaskingFlag": "masking", "check_rows": "masking",
    "probe_model": "masking", "CORRUPTIONS": "corruptions", "BiasField": "corruptions", "Corruption": "corruptions",
    "GaussianBlur": "corruptions", "GaussianNoise": "corruptions", "RicianNoise": "corruptions",
    "EPS_UNITS": "eps_units", "resolve_eps": "eps_units",
}


def __getattr__(name: str):
    if name in _EVALUATION:
        return getattr(import_module(f"medrobust.evaluation.{_EVALUATION[name]}"), name)
    raise AttributeError(f"module 'medrobust.attacks' has no attribute {name!r}")


__all__ = [
    "APGD", "Attack", "AttackResult", "BiasField", "CORRUPTIONS", "CWL2", "Cascade", "ClassifierObjective",
    "Corruption", "CosPGD", "CurveAttack", "DAG", "DEFAULT_GROUP_SIZES", "DeepFool", "DetectionDAG", "Directional",
    "EPS_UNITS", "FGSM", "FMN", "GaussianBlur", "GaussianNoise", "JSMA", "LandmarkAimObjective", "LandmarkTargeted",
    "MaskingFlag", "MinimumNormAttack", "MinimumNormCurve", "NORMS", "PGD", "RicianNoise", "SUITES", "SegEnsemble",
    "SegPGD", "ShiftObjective", "Square", "TOG", "Targeted", "TargetedObjective", "ThreatModel", "TogObjective",
    "UniversalPerturbation", "apgd_attack", "apply_universal", "attack_curve", "batch_view", "build_suite",
    "check_rows", "cospgd_attack", "cw_l2_attack", "dag_attack", "deepfool_attack", "detection_dag_attack",
    "directional_attack", "dlr_loss", "fgsm", "fgsm_attack", "fit_universal_perturbation", "fmn_attack",
    "index_batch", "jsma_attack", "margin_loss", "minimal_perturbation", "pgd", "pgd_attack", "pick_targets",
    "probe_model", "resolve_eps", "robust_accuracy", "seg_ensemble_attack", "segpgd_attack", "square_attack",
    "targeted_dlr_loss", "universal_attack", "universal_shift", "with_clean_prediction", "with_loss",
]
