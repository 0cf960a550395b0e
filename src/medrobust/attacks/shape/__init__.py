"""Attacks on shape-reconstruction networks (outline points + mask; seed 002, Chen et al., SPIE MI 2021):
``ood``, the out-of-distribution attack that makes a network output a chosen in-distribution shape from an image
that is not a nodule patch."""

from medrobust.attacks.shape.ood import OODShapeAttack, mean_point_error, shape_objective

__all__ = ["OODShapeAttack", "mean_point_error", "shape_objective"]
