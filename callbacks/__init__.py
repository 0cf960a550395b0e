from medrobust.callbacks.adversarial_training import AdversarialTraining
from medrobust.callbacks.batch_seeding import BatchSeeding
from medrobust.callbacks.checkpointing import AtomicCheckpointIO, RunCheckpoint
from medrobust.callbacks.ood_evaluation import OODEvaluation
from medrobust.callbacks.robustness_evaluation import RobustnessEvaluation
from medrobust.callbacks.universal_shift import UniversalShiftEvaluation

__all__ = ["AdversarialTraining", "AtomicCheckpointIO", "BatchSeeding", "OODEvaluation", "RobustnessEvaluation",
           "RunCheckpoint", "UniversalShiftEvaluation"]
