"""BatchSeeding: every training step draws from a seed of its own, so a resumed run repeats the uninterrupted one.

Lightning restores the loops' position from a checkpoint, not the global RNGs: a run resumed at epoch ``k`` would
otherwise draw dropout masks (and anything else a step draws from the global RNG) from the state the process
started with. Seeding before every batch from ``(seed, epoch, batch index, rank)`` makes those draws a function of
the step alone. The attacks, the augmentation and the data order seed themselves the same way.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from medrobust.attacks.core.seeding import derived_seed, run_seed, seed_global


class BatchSeeding(Callback):
    """Seed torch, NumPy and ``random`` before every training batch from ``(seed, epoch, batch index, rank)``.

    Args:
        seed: the run's seed; ``None``: ``seed_everything``'s (``$PL_GLOBAL_SEED``).
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"callbacks.batch_seeding.seed must be an integer or null, got {seed!r}")
        self.seed = seed

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        seed_global(derived_seed("train_batch", run_seed(self.seed), trainer.current_epoch, batch_idx,
                                 trainer.global_rank))
