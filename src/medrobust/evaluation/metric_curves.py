"""Curves a metric draws beside its single value: a detector's FROC behind its CPM, at each (attack, eps).

A metric of a task's ``robust_metrics`` that has a ``curve()`` method (returning a :class:`MetricCurve`, or
``None`` without samples) gets it read on the same states as its value, so the curve at an attacked eps comes
from the same points (the attack's worst-loss points) as the row in ``robustness.csv``. The files, the summary
section and the W&B table are :mod:`medrobust.reporting.metric_curves`'.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from torchmetrics import MetricCollection


class MetricCurve(NamedTuple):
    """One curve: ``x`` / ``y`` (the points in drawing order) with ``thresholds`` (the score each point is reached
    at, or empty), their axis names, ``log_x`` for a logarithmic x axis; ``marks``: the x values a summary table
    reads it at, with the y values there (LUNA16's 1/8 ... 8 false positives per scan); ``summary``: the metric's
    own value, named ``summary_name`` (the mean of the marks: the CPM); ``kind`` names files and sections."""

    kind: str
    x: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray
    x_name: str
    y_name: str
    log_x: bool
    marks: tuple[tuple[float, float], ...]
    summary_name: str
    summary: float


def collection_curves(collection: MetricCollection) -> dict[str, MetricCurve]:
    """The curves of ``collection``'s metrics that draw one, by metric name (without the collection's prefix),
    each read on its states synced over the DDP ranks: every rank must call this in the same order, as it
    computes the values."""
    curves = {}
    for name, metric in collection.items(keep_base=True):
        if callable(getattr(metric, "curve", None)):
            with metric.sync_context():
                curve = metric.curve()
            if curve is not None:
                curves[name] = curve
    return curves
