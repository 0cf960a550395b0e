"""Attacks that only make sense on object-detection tasks (CenterNet heatmaps): TOG (vanishing, fabrication,
mislabel, untargeted) and DAG for detection. Each declares ``requires`` from ``DETECTION_MEMBERS``: detection
tasks only."""
