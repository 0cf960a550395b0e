from medrobust.models.small_cnn import SmallCNN

__all__ = ["SmallCNN"]
