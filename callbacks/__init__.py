from medrobust.callbacks.adversarial_training import AdversarialTraining
from medrobust.callbacks.robustness_evaluation import RobustnessEvaluation
from medrobust.callbacks.universal_shift import UniversalShiftEvaluation

__all__ = ["AdversarialTraining", "RobustnessEvaluation", "UniversalShiftEvaluation"]
