from medrobust.tasks.base import RobustTask, clean_objective
from medrobust.tasks.brainage import BrainAgeTask
from medrobust.tasks.classification import ClassificationTask
from medrobust.tasks.detection import DetectionTask
from medrobust.tasks.landmarks import LandmarkTask
from medrobust.tasks.regression import RegressionTask
from medrobust.tasks.segmentation import SegmentationTask
from medrobust.tasks.shape import ShapeTask

__all__ = ["RobustTask", "BrainAgeTask", "ClassificationTask", "DetectionTask", "LandmarkTask", "RegressionTask",
           "SegmentationTask", "ShapeTask", "clean_objective"]
