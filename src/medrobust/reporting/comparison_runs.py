"""What a run folder tells the comparison (:mod:`medrobust.reporting.comparison`), read from the files a run
writes, so copied folders work: where the runs are, the overrides that tell them apart, the task's metric and its
direction, the parameter count, the best epoch and the run time.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("medrobust")

RESULTS = "robustness.csv"
CONFIGS = ("config.yaml", ".hydra/config.yaml")  # train.py / eval.py write the first resolved; Hydra the second
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", re.MULTILINE)  # hydra's job-log prefix
_CKPT_EPOCH = re.compile(r"epoch[=_]?(\d+)")


# -- where the runs are -----------------------------------------------------------------------------------------
def is_run(folder: Path) -> bool:
    return (folder / ".hydra" / "overrides.yaml").is_file() or (folder / "config.yaml").is_file()


def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """The run folders under ``sweep_dir`` (those holding ``.hydra/overrides.yaml``, or ``config.yaml`` and
    ``robustness.csv``: a copy without Hydra's folder), in job-number order; not the folders inside a run."""
    sweep_dir = Path(sweep_dir)
    found = {path.parent.parent for path in sweep_dir.rglob("overrides.yaml") if path.parent.name == ".hydra"}
    found |= {path.parent for path in sweep_dir.rglob(RESULTS) if (path.parent / "config.yaml").is_file()}
    jobs = [job for job in found if not any(other in job.parents for other in found)]
    return sorted(jobs, key=lambda job: _natural(job.relative_to(sweep_dir).as_posix()))


def _natural(text: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


# -- the overrides that tell the runs apart -----------------------------------------------------------------------
def overrides(job: Path) -> dict[str, str]:
    """The run's command-line overrides, ``{key: value}`` (``+``/``~`` prefixes dropped); ``{}`` without Hydra's."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = (str(item).partition("=") for item in OmegaConf.load(path))
    return {name.lstrip("+~"): value for name, _, value in items}


def run_config(job: Path):
    """The run's config (``config.yaml``, else Hydra's copy), or ``None``."""
    path = next((job / name for name in CONFIGS if (job / name).is_file()), None)
    return OmegaConf.load(path) if path is not None else None


def setting(job: Path, key: str) -> str | None:
    """``key``'s value in the run: its override, else its config-group choice (``hydra.yaml``), else its config."""
    given = overrides(job)
    if key in given:
        return given[key]
    hydra_yaml = job / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        choice = (OmegaConf.load(hydra_yaml).hydra.runtime.get("choices") or {}).get(key)
        if choice is not None:
            return str(choice)
    cfg = run_config(job)
    value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False) if cfg is not None else None
    if value is None:
        return None
    return OmegaConf.to_yaml(value).strip() if OmegaConf.is_config(value) else str(value)


def differing_settings(jobs: list[Path]) -> list[dict[str, str]]:
    """Per run, the overridden keys whose values differ between the runs (a key a run did not override is read
    from that run's choices or config, so runs of different sweeps compare on what they really ran)."""
    given = [overrides(job) for job in jobs]
    keys = list(dict.fromkeys(key for items in given for key in items))
    values = [{key: setting(job, key) for key in keys} for job in jobs]
    differ = [key for key in keys if len({str(v[key]) for v in values}) > 1] if len(jobs) > 1 else []
    return [{key: "-" if v[key] is None else v[key] for key in differ} for v in values]


# -- what the task tells: the default metric, its direction, the parameter count ------------------------------------
def task_metric(job: Path) -> str | None:
    """The task's headline continuous metric (the first it declares its attack loss drives, segmentation's
    ``dice``), else its success metric (``accuracy``); ``None`` without a readable config."""
    from hydra.utils import get_class

    cfg = run_config(job)
    target = OmegaConf.select(cfg, "module._target_") if cfg is not None else None
    if target is None:
        return None
    try:
        task = get_class(target)
    except (ImportError, ValueError):  # a task class from code not installed here: no default from it
        return None
    attacked = getattr(task, "attacked_metrics", None)
    return attacked[0] if isinstance(attacked, (tuple, list)) and attacked else task.success_metric


def build_net(job: Path):
    """The run's network from its config (``None`` where it cannot be built)."""
    from medrobust.runner import build_net as build

    cfg = run_config(job)
    if cfg is None or OmegaConf.select(cfg, "model._target_") is None:
        return None
    try:
        return build(cfg, load_weights=False)  # the parameter count needs no pretrained weights
    except Exception as error:  # a model needing data or a missing package: the table says n/a, not fail
        log.warning("comparison: cannot build the model of %s: %s", job, error)
        return None


def count_parameters(job: Path) -> int | None:
    """Parameters of the run's network, built from its config (``None`` where it cannot be built)."""
    net = build_net(job)
    return None if net is None else sum(p.numel() for p in net.parameters())


def metric_facts(job: Path) -> tuple[dict[str, bool | None], tuple[str, ...]] | None:
    """``({metric: higher_is_better}, bounded_metrics)`` of the run's task, as its evaluation decides them (the
    torchmetrics' ``higher_is_better`` of the task module built from the config); ``None`` where it cannot be
    built."""
    from hydra.utils import instantiate

    cfg, net = run_config(job), build_net(job)
    if net is None or OmegaConf.select(cfg, "module._target_") is None:
        return None
    try:
        module = instantiate(cfg.module, net=net, _convert_="all")
        metrics = {**module.clean_metrics(), **module.robust_metrics()}
    except Exception as error:  # as above: the comparison goes on without the task's directions
        log.warning("comparison: cannot build the task module of %s: %s", job, error)
        return None
    return {name: metric.higher_is_better for name, metric in metrics.items()}, tuple(module.bounded_metrics)


# -- the best epoch and the run time --------------------------------------------------------------------------------
def best_epoch(job: Path, test_rows: list[dict]) -> tuple[int | None, str]:
    """The epoch of the tested (best) weights and where it was read: the test rows of ``robustness.csv`` (they carry
    the tested checkpoint's epoch), else the one ``checkpoints/epochNNN.ckpt`` besides ``last.ckpt``."""
    epochs = {row["epoch"] for row in test_rows}
    if len(epochs) == 1:
        return epochs.pop(), RESULTS
    names = [p.name for p in (job / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    found = {int(m[1]) for m in map(_CKPT_EPOCH.search, names) if m}
    return (found.pop(), "checkpoint name") if len(found) == 1 else (None, "")


def run_time(job: Path) -> tuple[float | None, str]:
    """Seconds the run took and where it was read: from the first to the last timestamp of its job log
    (``train.log``, ``eval.log``), else from its Hydra config's file time to its newest file's (file times survive
    ``cp -p`` and rsync ``-t``, not a plain copy)."""
    for path in sorted(job.glob("*.log")):
        stamps = _LOG_TIME.findall(path.read_text(errors="replace"))
        if stamps:
            first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in (stamps[0], stamps[-1]))
            return (last - first).total_seconds(), path.name
    start = next((job / name for name in (".hydra/config.yaml", *CONFIGS) if (job / name).is_file()), None)
    if start is None:
        return None, ""
    newest = max(p.stat().st_mtime for p in job.rglob("*") if p.is_file())
    return newest - start.stat().st_mtime, "file times"
