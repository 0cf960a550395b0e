"""Compose the project's Hydra configs from Python (notebooks, tests, benchmarks), as the scripts would."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from medrobust.resolvers import register_resolvers

register_resolvers()

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


def compose_config(config_name: str, overrides: list[str], output_dir: str | Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` as ``python <config_name>.py`` would, run dir ``output_dir``."""
    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"config directory {CONF_DIR} not found (medrobust must be installed from a checkout)")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=[*overrides, f"hydra.run.dir={output_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.output_dir} and ${hydra:runtime.cwd}
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO_ROOT)
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg
