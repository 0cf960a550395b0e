from medrobust.models.hybrid import HybridRegressor
from medrobust.models.landmark_regressor import LandmarkRegressor
from medrobust.models.small_cnn import SmallCNN

__all__ = ["HybridRegressor", "LandmarkRegressor", "SmallCNN"]
