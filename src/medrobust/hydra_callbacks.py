"""Hydra callbacks (``hydra.callbacks`` in a config): work on a whole sweep, outside any one job.

    hydra:
      callbacks:
        comparison:
          _target_: medrobust.hydra_callbacks.CompareRuns
          label_key: model
          metric: dice
          eps: 0.004
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from medrobust.reporting.comparison import compare_runs, write_comparison

log = logging.getLogger("medrobust")


class CompareRuns(Callback):
    """Writes ``comparison.md`` / ``.csv`` / ``.png`` into the sweep folder (:mod:`medrobust.reporting.comparison`;
    the arguments are those of :func:`~medrobust.reporting.comparison.compare_runs`).

    At the end of the multirun, and also after each job: Hydra's sweeper raises on a failed job before it calls
    ``on_multirun_end``, so without the per-job writes a sweep with one failed run would leave no table at all
    (with one, the table names the failed run). Single runs write nothing."""

    def __init__(self, metric: str | None = None, eps: float | None = None, split: str = "test",
                 label_key: str | None = None, attacks: list[str] | None = None, count_params: bool = True) -> None:
        self.options = dict(metric=metric, eps=None if eps is None else float(eps), split=split, label_key=label_key,
                            attacks=None if attacks is None else list(attacks), count_params=count_params)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._write(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = self._write(config.hydra.sweep.dir)
        print("Comparison of the sweep's runs: " + ", ".join(map(str, paths)))  # as train.py prints its outputs

    def _write(self, sweep_dir: str) -> list:
        return write_comparison(compare_runs(sweep_dir, **self.options))
