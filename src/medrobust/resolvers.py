"""OmegaConf resolvers the configs use, registered by whoever composes them (train.py / eval.py via the runner,
``medrobust.config`` for tests and notebooks), before anything is instantiated.

``${dataset_json:<root>,<key>}``: ``num_classes``, ``in_channels`` or ``class_names`` of a Decathlon / nnU-Net
dataset (``conf/task/msd.yaml``); the reader is imported only when a config asks for it.
"""

from __future__ import annotations

from omegaconf import OmegaConf


def _dataset_json(root: str, key: str):
    from medrobust.data.msd import dataset_json_field  # MONAI-heavy: only when a config uses it

    return dataset_json_field(root, key)


def register_resolvers() -> None:
    """Register every resolver (idempotent)."""
    if not OmegaConf.has_resolver("dataset_json"):
        OmegaConf.register_new_resolver("dataset_json", _dataset_json, use_cache=True)
