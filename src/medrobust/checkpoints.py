"""Reading a run's checkpoint safely: ``torch.load(weights_only=True)`` and errors that say what is wrong.

Checkpoints hold plain values only (tensors, numbers, strings, lists, dicts): the callbacks' states and the
hyperparameters are built that way, so a checkpoint loads without unpickling arbitrary objects.
:func:`check_checkpoint` reads one before a run uses it and names the file and the problem: unreadable
(truncated, not a checkpoint), holding objects ``weights_only`` refuses, written by another task, or weights that do
not fit the task's model.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

RUN_KEY = "medrobust"  # checkpoint["medrobust"]: which task and module wrote the checkpoint


def run_info(module: nn.Module, task_name: str | None) -> dict:
    """What :func:`check_checkpoint` compares: the task's name and the task module's class."""
    return {"task_name": task_name, "module": f"{type(module).__module__}.{type(module).__qualname__}"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message names the file and what is wrong."""


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU; a clear error for a missing, truncated or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file (expected a Lightning .ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only load failed" in str(error):
            raise CheckpointError(f"checkpoint {str(path)!r} holds objects other than tensors, numbers, strings, lists "
                                  f"and dicts, which torch.load(weights_only=True) refuses to unpickle: "
                                  f"{str(error).splitlines()[0]}") from None
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {error}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable checkpoint ({path.stat().st_size} bytes; "
                              f"truncated by a stopped write, or not a torch.save file): "
                              f"{str(error).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (no 'state_dict' mapping)")
    return checkpoint


def check_checkpoint(path: str | Path, task_name: str, module: nn.Module) -> dict:
    """The checkpoint at ``path``, checked to fit ``module`` of task ``task_name``; raises :class:`CheckpointError`.

    A checkpoint that says which task wrote it (``checkpoint["medrobust"]``) must name ``task_name``; every
    checkpoint's weights must match ``module``'s parameter names and shapes."""
    checkpoint = load_checkpoint(path)
    written_by = (checkpoint.get(RUN_KEY) or {}).get("task_name")
    if written_by is not None and written_by != task_name:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by task={written_by}, not task={task_name}: "
                              f"evaluate it with task={written_by}, or give a task={task_name} checkpoint")
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in checkpoint["state_dict"].items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    reshaped = [f"{key} {found[key]} (model: {expected[key]})" for key in expected.keys() & found.keys()
                if expected[key] != found[key]]
    if missing or unexpected or reshaped:
        what = "; ".join(f"{name}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                         for name, items in (("missing", missing), ("unexpected", unexpected),
                                             ("other shape", sorted(reshaped))) if items)
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit task={task_name}'s model "
                              f"({type(module).__name__}): {what}")
    return checkpoint
