"""Optimizer steps with non-finite gradients (a bf16 overflow, a NaN loss) are skipped with a warning and counted; a
few in a row stop the run naming the cause (RobustTask.on_before_optimizer_step)."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from medrobust.tasks import ClassificationTask
from medrobust.tasks.base import MAX_NONFINITE_IN_A_ROW


def _batches(nan_at: set[int], n: int = 6) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(n):
        image = torch.rand(4, 1, 4, 4, generator=generator)
        if index in nan_at:
            image[0, 0, 0, 0] = float("nan")
        batches.append({"image": image, "label": torch.randint(0, 2, (4,), generator=generator)})
    return batches


def _fit(nan_at: set[int]) -> ClassificationTask:
    torch.manual_seed(0)
    module = ClassificationTask(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), input_bounds=(0.0, 1.0),
                                optimizer=partial(torch.optim.AdamW, lr=0.01), memory_format="contiguous")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(nan_at), batch_size=None))  # the batches as they are
    return module


def test_a_step_with_nan_gradients_is_skipped_and_the_weights_stay_finite():
    with pytest.warns(UserWarning, match=r"optimizer step 2 skipped: non-finite gradients \(1 skipped in this run\)"):
        module = _fit({2})
    assert module.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    clean = _fit(set())  # the other five steps moved the weights as a run without the bad batch would
    assert clean.nonfinite_steps == 0
    assert not torch.equal(module.net[1].weight, clean.net[1].weight)


def test_steps_non_finite_in_a_row_stop_the_run_naming_the_cause():
    with pytest.raises(FloatingPointError, match=rf"{MAX_NONFINITE_IN_A_ROW} optimizer steps in a row \(up to step 3\) "
                                                 r"had non-finite gradients: the model has diverged"):
        _fit({1, 2, 3})
