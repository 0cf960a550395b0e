"""Attacks on dense per-voxel outputs: DAG, SegPGD, CosPGD and the lowest-Dice APGD ensemble; their losses and
target maps (``dense``, ``losses``). Each declares ``requires = DENSE_OUTPUT``: segmentation tasks only."""
