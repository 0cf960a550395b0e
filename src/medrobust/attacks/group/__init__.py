"""Group attacks: one perturbation for many images (universal perturbations)."""
