"""Defences: the training objectives AdversarialTraining installs on a task module.

:class:`Defense` is the interface (:mod:`medrobust.defenses.base`); one file per defence:

- :class:`MadryObjective` (``madry``): PGD-AT and FGSM-RS, by the attack it is given (``conf/adv/pgd.yaml``,
  ``conf/adv/fgsm.yaml``).
"""

from medrobust.defenses.base import Adversary, Defense
from medrobust.defenses.madry import MadryObjective

__all__ = ["Adversary", "Defense", "MadryObjective"]
