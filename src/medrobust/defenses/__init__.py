"""Defences: the training objectives AdversarialTraining installs on a task module."""
