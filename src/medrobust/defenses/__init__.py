"""Defences: the training objectives AdversarialTraining installs on a task module.

:class:`Defense` is the interface (:mod:`medrobust.defenses.base`); one file per defence:

- :class:`MadryObjective` (``madry``): PGD-AT and FGSM-RS, by the attack it is given (``conf/adv/pgd.yaml``,
  ``conf/adv/fgsm.yaml``).
- :class:`TRADES` (``trades``): clean loss + beta x the output divergence at its maximizer, for every task
  (``conf/adv/trades.yaml``).
- :class:`MART` (``mart``): boosted CE at the attack's points + a misclassification-weighted KL, for classifiers
  (``conf/adv/mart.yaml``).
- :class:`MarginObjective` (``margin``): seed 004's per-sample margins, for every task (``conf/adv/margin.yaml``).
"""

from medrobust.defenses.base import Adversary, Defense
from medrobust.defenses.madry import MadryObjective
from medrobust.defenses.margin import MarginObjective
from medrobust.defenses.mart import MART
from medrobust.defenses.trades import TRADES

__all__ = ["Adversary", "Defense", "MadryObjective", "MarginObjective", "MART", "TRADES"]
