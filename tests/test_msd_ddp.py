"""task=msd validation under DDP (ddp_spawn, 2 CPU processes): batches stay same-shape. The datamodule's loaders
give each rank whole batches of the one-process order; a loader made before the run gets Lightning's
DistributedSampler, around which Lightning rebuilds SameShapeBatchSampler (duplicates only as Lightning pads)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest

from medrobust.data.msd_example import example_case, write_example_dataset
from medrobust.runner import build_data_and_module
from conftest import DEBUG, compose_config

# cases of three slice shapes (2-D mode: each case's axial slices), and an odd number of validation slices
SHAPES = {0: (32, 32, 3), 1: (40, 32, 2), 2: (32, 32, 3), 3: (32, 40, 1), 4: (32, 32, 2)}


class RecordBatches(L.Callback):
    """Each rank writes the ids and image shape of every validation batch it saw (``rank<r>.json``)."""

    def __init__(self, out: str):
        self.out, self.seen = out, []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append({"ids": list(batch["id"]), "shape": list(batch["image"].shape[2:])})

    def on_validation_end(self, trainer, pl_module):
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> str:
    root = write_example_dataset(tmp_path_factory.mktemp("msd_mixed") / "Task00_Mixed", "msd", n_cases=len(SHAPES),
                                 shape=SHAPES[0])  # fmt: skip
    rng, affine = np.random.default_rng(1), nib.load(root / "labelsTr" / "case_000.nii.gz").affine
    for i, shape in SHAPES.items():  # rewrite the cases at their own sizes
        image, label = example_case(rng, shape, 1)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(image[..., 0], affine), root / "imagesTr" / f"case_{i:03d}.nii.gz")
    return str(root)


@pytest.mark.parametrize("loader_from", ["datamodule", "dataloaders"])
@pytest.mark.slow
def test_ddp_validation_sees_every_slice_in_same_shape_batches(mixed_root, tmp_path, loader_from):
    """``datamodule``: the loader comes from a hook (what train.py does); ``dataloaders``: made before the run, which
    Lightning rebuilds without this sampler's arguments (it raised a TypeError under DDP)."""
    cfg = compose_config("train", ["task=msd", DEBUG, f"data.root={mixed_root}", f"data.cache_dir={mixed_root}_cache",
                                   "data.split=[0.2,0.8,0]", "data.batch_size=2", "model.features=[4,4,4,4,4,4]"],
                         tmp_path)  # fmt: skip
    dm, module = build_data_and_module(cfg)
    dm.prepare_data()
    dm.setup()
    val = dm.data_val
    shape_of = {val[i]["id"]: list(val[i]["image"].shape[1:]) for i in range(len(val))}
    ids = list(shape_of)
    assert len({tuple(s) for s in shape_of.values()}) >= 2 and len(ids) % 2 == 1  # shapes to keep apart, padding

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=None,
                        callbacks=[RecordBatches(str(tmp_path))], default_root_dir=str(tmp_path))  # fmt: skip
    if loader_from == "datamodule":
        trainer.validate(module, datamodule=dm)
    else:
        trainer.validate(module, dataloaders=dm.val_dataloader())

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    if loader_from == "datamodule":
        # the datamodule's own sharding: rank r takes every other batch of the one-process order, nothing repeated
        one_process = [[ids[i] for i in batch] for batch in dm.eval_batches(val)]
        assert [[batch["ids"] for batch in rank] for rank in ranks] == [one_process[0::2], one_process[1::2]]
    else:
        # a loader made before the run: Lightning's DistributedSampler, rank r takes every other sample; the first
        # sample pads the odd count
        seen = [[i for batch in rank for i in batch["ids"]] for rank in ranks]
        padded = ids + ids[: len(ids) % 2]
        assert seen == [padded[0::2], padded[1::2]]
    for batch in (batch for rank in ranks for batch in rank):
        assert 1 <= len(batch["ids"]) <= 2
        assert all(shape_of[i] == batch["shape"] for i in batch["ids"]), batch
