"""Evaluating robustness: curves over eps, attack suites, gradient-masking checks, corruptions, eps units."""

from medrobust.evaluation.corruptions import CORRUPTIONS, BiasField, Corruption, GaussianBlur, GaussianNoise, RicianNoise
from medrobust.evaluation.curve import attack_curve
from medrobust.evaluation.eps_units import EPS_UNITS, resolve_eps
from medrobust.evaluation.masking import MaskingFlag, check_rows, probe_model
from medrobust.evaluation.suites import SUITES, Cascade, MinimumNormCurve, build_suite, robust_accuracy

__all__ = ["BiasField", "CORRUPTIONS", "Cascade", "Corruption", "EPS_UNITS", "GaussianBlur", "GaussianNoise",
           "MaskingFlag", "MinimumNormCurve", "RicianNoise", "SUITES", "attack_curve", "build_suite", "check_rows",
           "probe_model", "resolve_eps", "robust_accuracy"]
