from medrobust.models.hybrid import HybridRegressor
from medrobust.models.small_cnn import SmallCNN

__all__ = ["HybridRegressor", "SmallCNN"]
