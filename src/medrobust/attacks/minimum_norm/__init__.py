"""Minimum-norm attacks: the smallest perturbation that makes each sample wrong (FMN, DeepFool, C&W)."""
