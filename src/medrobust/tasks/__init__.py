from medrobust.tasks.base import RobustTask, clean_objective
from medrobust.tasks.classification import ClassificationTask

__all__ = ["RobustTask", "ClassificationTask", "clean_objective"]
