from medrobust.callbacks.adversarial_training import AdversarialTraining
from medrobust.callbacks.robustness_evaluation import RobustnessEvaluation

__all__ = ["AdversarialTraining", "RobustnessEvaluation"]
