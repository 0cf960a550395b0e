"""Attacks and objectives that only make sense for classifiers: targeted attacks, plain-classifier forms."""
