"""Attacks that move a regressor's predictions in a direction (directional, universal shifts)."""
