"""Attacks on dense per-voxel outputs (DAG)."""
