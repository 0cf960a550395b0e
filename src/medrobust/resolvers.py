"""OmegaConf resolvers the configs use, registered by whoever composes them (train.py / eval.py via the runner,
``medrobust.config`` for tests and notebooks), before anything is instantiated.

``${dataset_json:<root>,<key>}``: ``num_classes``, ``in_channels`` or ``class_names`` of a Decathlon / nnU-Net
dataset (``conf/task/msd.yaml``); the reader is imported only when a config asks for it.
``${landmarks:<what>,${data}}``: ``dims``, ``names``, ``count`` or ``coordinates`` of the landmark data that the
data config describes (``conf/task/afids.yaml``, ...), from :func:`medrobust.datamodules.landmark_info.landmark_info`.
``${by_dims:${data.spatial_dims},<2-D value>,<3-D value>}``: a setting that differs between 2-D and 3-D data
(``conf/task/brainseg.yaml``'s learning rate).
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def _dataset_json(root: str, key: str):
    from medrobust.data.msd import dataset_json_field  # MONAI-heavy: only when a config uses it

    return dataset_json_field(root, key)


def _landmarks(what: str, data):
    from medrobust.datamodules.landmark_info import landmark_info

    settings = {key: data.get(key) for key in ("spatial_dims", "csv", "root", "landmark_names")}
    return landmark_info(what, data.get("source", "phantom"), **settings)


def _by_dims(dims, value_2d, value_3d):
    if dims not in (2, 3):
        raise ValueError(f"${{by_dims:...}} takes spatial_dims 2 or 3 first, got {dims!r}")
    return value_2d if dims == 2 else value_3d


def _launch_dir() -> str:
    """Hydra's runtime cwd once it is set, else the process's working directory (the same folder: jobs do not
    chdir). ``${hydra:runtime.cwd}`` alone fails where a sweeper resolves ``hydra.sweep.dir`` before Hydra's
    runtime config exists (``python train.py -m ...``)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def register_resolvers() -> None:
    """Register every resolver (idempotent)."""
    if not OmegaConf.has_resolver("dataset_json"):
        OmegaConf.register_new_resolver("dataset_json", _dataset_json, use_cache=True)
    if not OmegaConf.has_resolver("landmarks"):
        OmegaConf.register_new_resolver("landmarks", _landmarks)  # no cache: its argument is a config node
    if not OmegaConf.has_resolver("launch_dir"):
        OmegaConf.register_new_resolver("launch_dir", _launch_dir)
    if not OmegaConf.has_resolver("by_dims"):
        OmegaConf.register_new_resolver("by_dims", _by_dims)
