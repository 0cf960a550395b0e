"""RunCheckpoint: Lightning's ModelCheckpoint, with files that survive a kill and say which run wrote them.

Three changes to ``ModelCheckpoint``, each for a preempted run that must resume where it stopped:

- ``last.ckpt`` is written after every epoch. Lightning (2.6) writes it only when a top-k checkpoint is written too,
  so a run whose monitored metric stops improving would resume from its best epoch, not its last.
- Checkpoints are written atomically (:class:`AtomicCheckpointIO`): Lightning's own writer stages the file in the
  system's temp folder and moves it, which is a copy (and a half-written file after a kill) when that folder is
  on another file system.
- Every checkpoint says which task and module wrote it (``checkpoint["medrobust"]``), so ``eval.py`` can refuse a
  checkpoint of another task with a message saying so (:mod:`medrobust.checkpoints`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from medrobust.checkpoints import RUN_KEY, run_info
from medrobust.reporting.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file next to the target, then ``os.replace``: whole or absent, never half."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes ``last.ckpt`` every epoch, atomically, with the task that wrote it.

    Args:
        task_name: the run's task (``task_name`` in the config), stored in every checkpoint.
        *args, **kwargs: ``ModelCheckpoint``'s.
    """

    def __init__(self, *args, task_name: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.task_name = task_name

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so checkpoints written with the plain callback keep their best-model state
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a user's own CheckpointIO alone
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_KEY] = run_info(pl_module, self.task_name)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and self.last_model_path:
            # Lightning stops quietly on SIGTERM: say where the run can resume from
            rank_zero_warn(f"training stopped by {'SIGTERM' if isinstance(exception, SIGTERMException) else 'SIGINT'} "
                           f"in epoch {trainer.current_epoch}; resume with ckpt_path={self.last_model_path}")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_skipped(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_skipped(trainer)

    def _save_last_if_skipped(self, trainer: Trainer) -> None:
        """``last.ckpt`` at the end of every ``every_n_epochs``-th epoch, unless a checkpoint (and with it
        ``last.ckpt``) was just written at this step."""
        every = self._every_n_epochs
        due = every >= 1 and (trainer.current_epoch + 1) % every == 0
        if self.save_last is True and due and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
