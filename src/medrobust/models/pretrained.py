"""``model.weights``: a pretrained state dict the user has on disk, loaded into the configured network.

The file is a plain state dict (MONAI, timm or torchvision-style ``.pt`` / ``.pth``) or a checkpoint holding one
under ``state_dict`` / ``model`` / ``net`` (Lightning's, or a training script's); nothing is downloaded. Keys are
matched after stripping the wrapper prefixes such files carry (``module.`` from DDP, ``net.`` from a task module,
``model.``). The network's head (its last module with parameters: the classifier) is expected to differ: its
tensors are kept as initialised when their shapes do not match. A shape mismatch anywhere else fails, naming the
key and both shapes; a file that matches nothing fails too (the wrong network, most likely).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("medrobust")

WRAPPERS = ("state_dict", "model", "net", "model_state_dict")
PREFIXES = ("module.", "net.", "model.")


@dataclass
class LoadReport:
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the network, not in the file: kept as initialised
    unused: list[str] = field(default_factory=list)  # in the file, not in the network
    head_skipped: list[str] = field(default_factory=list)  # the head's tensors of another shape

    def summary(self, path: str) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "") if keys else "none"

        return (f"model.weights {path}: {len(self.matched)} tensors loaded; head kept as initialised (other shape): "
                f"{names(self.head_skipped)}; missing from the file: {names(self.missing)}; unused: "
                f"{names(self.unused)}")


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: no such file {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled code, a truncated file, not a torch file at all
        raise ValueError(f"model.weights: {path} is not a state dict torch.load(weights_only=True) can read "
                         f"({type(error).__name__}: {error})") from error
    while isinstance(loaded, dict) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        inner = next((loaded[k] for k in WRAPPERS if isinstance(loaded.get(k), dict)), None)
        if inner is None:
            break
        loaded = inner
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)} if isinstance(loaded, dict) else {}
    if not tensors:
        raise ValueError(f"model.weights: {path} holds no tensors (expected a state dict, or a checkpoint with one "
                         f"under {', '.join(WRAPPERS)})")
    return tensors


def _strip(keys: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """The file's keys with wrapper prefixes removed, each only while that matches more of ``wanted``."""
    for prefix in PREFIXES:
        stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in keys.items()}
        if len(wanted & stripped.keys()) > len(wanted & keys.keys()):
            keys = stripped
    return keys


def head_prefix(net: nn.Module) -> str:
    """The name of the network's last module that holds parameters of its own (its output layer), with a dot."""
    names = [name for name, module in net.named_modules() if any(True for _ in module.parameters(recurse=False))]
    return (names[-1] + ".") if names and names[-1] else ""


def load_pretrained(net: nn.Module, path: str | Path) -> LoadReport:
    """Load ``path`` into ``net`` (see the module docstring); returns what matched, and logs it."""
    path = Path(path).expanduser()
    own = net.state_dict()
    found = _strip(_state_dict(path), set(own))
    head = head_prefix(net)
    report = LoadReport(missing=[k for k in own if k not in found], unused=[k for k in found if k not in own])
    load = {}
    for key, value in found.items():
        if key not in own:
            continue
        if value.shape != own[key].shape:
            if head and key.startswith(head):
                report.head_skipped.append(key)
                continue
            raise ValueError(f"model.weights: {path}: {key} has shape {tuple(value.shape)} in the file and "
                             f"{tuple(own[key].shape)} in the configured network (only the head, {head.rstrip('.')}, "
                             f"may differ; e.g. in_channels or spatial_dims not as the weights were trained)")
        load[key] = value
        report.matched.append(key)
    if not load:
        raise ValueError(f"model.weights: {path}: none of its {len(found)} tensors matches the configured network "
                         f"{type(net).__name__} (file keys like {', '.join(list(found)[:3])}; network keys like "
                         f"{', '.join(list(own)[:3])})")
    net.load_state_dict({**own, **load})
    log.info(report.summary(str(path)))
    return report
