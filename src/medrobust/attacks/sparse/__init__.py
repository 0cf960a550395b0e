"""Sparse (L0) attacks: change as few input values as possible, each to an input bound (JSMA)."""
