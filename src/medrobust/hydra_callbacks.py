"""Hydra callbacks (``hydra.callbacks`` in a config): work on a whole sweep, outside any one job.

conf/hydra/default.yaml enables ``CompareRuns`` for every multirun; a config sets its options by the same key:

    hydra:
      callbacks:
        comparison:
          label_key: model
          metric: dice
          eps: 0.004
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig

from medrobust.reporting.comparison import SelectionError, compare_runs, write_comparison

log = logging.getLogger("medrobust")


class CompareRuns(Callback):
    """Writes ``compare.md`` / ``.csv`` / ``.png`` and the overlaid curves into the sweep folder, and prints which
    run is the most robust at the end (:mod:`medrobust.reporting.comparison`; the arguments are those of
    :func:`~medrobust.reporting.comparison.compare_runs`).

    At the end of the multirun, and also after each job: Hydra's sweeper raises on a failed job before it calls
    ``on_multirun_end``, so without the per-job writes a sweep with one failed run would leave no table at all
    (with one, the table names the failed run). Single runs write nothing. A comparison that cannot be made (an
    ``eps`` the sweep did not evaluate) is a warning: the runs themselves are done and kept."""

    def __init__(self, metric: str | None = None, eps: float | list[float] | None = None, split: str = "test",
                 label_key: str | None = None, attacks: list[str] | None = None, count_params: bool = True,
                 higher_is_better: bool | None = None) -> None:
        if eps is not None:  # one eps or several (a list from the config arrives as a ListConfig)
            eps = [float(e) for e in eps] if isinstance(eps, (list, tuple, ListConfig)) else float(eps)
        self.options = dict(metric=metric, eps=eps, split=split, label_key=label_key,
                            attacks=None if attacks is None else list(attacks), count_params=count_params,
                            higher_is_better=higher_is_better)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._write(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        written = self._write(config.hydra.sweep.dir)
        if written is not None:  # as train.py prints its outputs
            paths, comparison = written
            print(f"Comparison of the sweep's runs: {paths[0]} (and {len(paths) - 1} more files there)")
            print(comparison.verdict)

    def _write(self, sweep_dir: str):
        try:
            comparison = compare_runs(sweep_dir, **self.options)
        except SelectionError as error:
            log.warning("comparison of the runs under %s not written: %s", sweep_dir, error)
            return None
        return write_comparison(comparison), comparison
