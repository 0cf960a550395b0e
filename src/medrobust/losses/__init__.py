"""Losses and margins shared by the task modules and the attacks (pure torch, no Lightning)."""
