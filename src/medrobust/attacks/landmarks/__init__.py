"""Attacks that only make sense on landmark tasks: the targeted landmark attack."""
