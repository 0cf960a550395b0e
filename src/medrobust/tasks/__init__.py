from medrobust.tasks.base import RobustTask, clean_objective
from medrobust.tasks.brainage import BrainAgeTask
from medrobust.tasks.classification import ClassificationTask
from medrobust.tasks.regression import RegressionTask

__all__ = ["RobustTask", "BrainAgeTask", "ClassificationTask", "RegressionTask", "clean_objective"]
