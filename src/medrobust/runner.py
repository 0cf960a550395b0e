"""What train.py and eval.py share: building the run's parts from the composed config."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from medrobust.allocator import keep_large_blocks
from medrobust.models.pretrained import load_pretrained
from medrobust.reporting.atomic import write_text_atomic
from medrobust.resolvers import register_resolvers

log = logging.getLogger("medrobust")
register_resolvers()  # before any config is composed or instantiated


def build_data_and_module(cfg: DictConfig):
    """The datamodule and the task module (network inside) from ``cfg.data``, ``cfg.model``, ``cfg.module``."""
    if cfg.get("keep_large_blocks", True):
        keep_large_blocks()
    # plain lists and dicts, not OmegaConf containers: hyperparameters land in checkpoints, which torch.load
    # (weights_only) reads back only when they hold plain types
    datamodule = instantiate(cfg.data, _convert_="all")
    take_from_data(cfg, datamodule)
    net = build_net(cfg)
    module = instantiate(cfg.module, net=net, _convert_="all")
    return datamodule, module


def build_net(cfg: DictConfig, load_weights: bool = True):
    """The network of ``cfg.model``, with ``model.weights`` (a pretrained state dict on disk) loaded when set and
    ``load_weights``."""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    weights = spec.pop("weights", None)
    net = instantiate(spec, _convert_="all")
    if weights and load_weights:
        load_pretrained(net, weights)
    return net


def take_from_data(cfg: DictConfig, datamodule) -> None:
    """Settings a task leaves ``null`` for its data to give (``task=classify``: the classes and the channels the files
    have), filled in ``cfg`` before the network and module are built, so config.yaml records them."""
    with open_dict(cfg):
        if "num_classes" in cfg.module and cfg.module.num_classes is None:
            cfg.module.num_classes = len(_data_fact(datamodule, "class_names", "module.num_classes"))
        if "class_names" in cfg.module and cfg.module.class_names is None and getattr(datamodule, "class_names", None):
            cfg.module.class_names = list(datamodule.class_names)
        if "in_channels" in cfg and cfg.in_channels is None:
            cfg.in_channels = int(_data_fact(datamodule, "in_channels", "in_channels"))


def _data_fact(datamodule, name: str, key: str):
    if getattr(datamodule, name, None) is None:
        raise ValueError(f"{key} is null (to come from the data), but {type(datamodule).__name__} gives no {name}; "
                         f"set {key} in the config")
    return getattr(datamodule, name)


def _enabled(node) -> bool:
    return node is not None and isinstance(node, DictConfig) and "_target_" in node


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """``cfg.callbacks`` (checkpointing, ...) plus the ``adv`` and ``eval`` callbacks when enabled."""
    nodes = [node for node in (cfg.get("callbacks") or {}).values() if _enabled(node)]
    nodes += [cfg[key] for key in ("adv", "eval") if _enabled(cfg.get(key))]
    return [instantiate(node) for node in nodes]


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(node) for node in (cfg.get("logger") or {}).values() if _enabled(node)]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def optimized_value(names, metrics: Mapping) -> float | list[float] | None:
    """What train.py returns to a sweeper: the value of ``optimized_metric`` in ``metrics`` (the trainer's
    ``callback_metrics``), or a list of values when it names several (a multi-objective sweep). A name the run did not
    log fails here, with the names it did log, instead of handing the sweeper a None."""
    if names is None:
        return None
    wanted = [names] if isinstance(names, str) else list(names)
    missing = [name for name in wanted if name not in metrics]
    if missing:
        raise ValueError(f"optimized_metric: {', '.join(missing)} not logged by this run; expected one of the logged "
                         f"metrics: {', '.join(sorted(metrics)) or '(none)'}")
    values = [float(metrics[name]) for name in wanted]
    return values[0] if isinstance(names, str) else values


def finish_wandb_run() -> None:
    """End this process's W&B run, if any: the next job of an in-process multirun (Hydra's basic launcher, Optuna's
    trials) then starts a run of its own, where Lightning's WandbLogger would log into this one."""
    wandb = sys.modules.get("wandb")  # imported only when a W&B logger was built
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def report(run_dir: Path) -> str:
    """The lines printed at the end of a run: where the outputs are and the clean-vs-robust table."""
    lines = [f"Outputs: {run_dir}"]
    for name in ("robustness.csv", "ood.csv", "summary.md", "checkpoints", "curves"):
        if (run_dir / name).exists():
            lines.append(f"  {name}")
    summary = run_dir / "summary.md"
    if summary.exists():
        lines += ["", summary.read_text()]
    return "\n".join(lines)
