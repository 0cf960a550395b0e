"""LIDC nodule segmentation data: the readers' masks from their contours, the consensus, the readers' agreement,
and the datamodule (mini annotation DB, tmp caches)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from medrobust.data.lidc_annotations import Annotation
from medrobust.data.reader_masks import consensus, pairwise_dice, reader_masks
from medrobust.datamodules.lidc_seg import LIDCSegDataModule
from test_lidc_data import square


@pytest.fixture(scope="module")
def dm2d(lidc_mini_db, tmp_path_factory) -> LIDCSegDataModule:
    dm = LIDCSegDataModule(root=str(tmp_path_factory.mktemp("lseg")), annotation_db=lidc_mini_db, patch_size=32,
                           max_nodules=24, batch_size=8)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm


def items(dm: LIDCSegDataModule) -> dict[str, list[dict]]:
    sets = zip(("train", "val", "test"), (dm.data_train, dm.data_val, dm.data_test))
    return {name: [ds[i] for i in range(len(ds))] for name, ds in sets}


# ------------------------------------------------------------------------------ masks, consensus, agreement
SCAN = {"slice_z": np.arange(10) * 1.0, "pixel_spacing": 1.0}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_reader_masks_have_the_exact_area_of_the_readers_outlines(spatial_dims):
    # a 10-pixel square outline on slice z=5: the 9 x 9 pixels strictly inside are the lesion (as lidc_annotations
    # rasterizes); the patch grid (1 mm, centred on the lesion's centre pixel) samples them one to one
    readers = [Annotation(1, {}, [(True, 5.0, square(10, 10, 10))]), Annotation(2, {}, [(True, 5.0, square(10, 12, 10))])]
    masks = reader_masks(SCAN, readers, (5.0, 15.0, 15.0), spatial_dims, patch_size=32, spacing=1.0)
    assert masks.shape == (2, *(32,) * spatial_dims) and masks.dtype == bool
    assert masks[0].sum() == masks[1].sum() == 81
    centre_slice = masks[0] if spatial_dims == 2 else masks[0, 16]
    assert centre_slice[12:21, 12:21].all()  # rows 11..19 of the scan are patch rows 12..20
    overlap = 9 * 7  # the second reader's square is two columns to the right
    assert pairwise_dice(masks) == pytest.approx(2 * overlap / 162)
    assert consensus(masks).sum() == 81 + 81 - overlap  # two readers: one of them is half of them


def test_consensus_takes_voxels_at_least_half_of_the_readers_include():
    votes = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool).T  # (R=4, 4 voxels)
    assert consensus(votes).tolist() == [True, True, False, False]
    assert consensus(votes[:3]).tolist() == [True, True, False, False]  # 2 of 3 in, 1 of 3 out
    with pytest.raises(ValueError, match="zero readers"):
        consensus(votes[:0])


def test_pairwise_dice_of_readers():
    a = np.zeros((3, 4), dtype=bool)
    a[0, :2] = a[1, :2] = True
    assert pairwise_dice(a[:2]) == 1.0
    assert pairwise_dice(a) == pytest.approx((1 + 0 + 0) / 3)  # the empty third reader disagrees with both
    assert np.isnan(pairwise_dice(a[2:]))  # one reader: no agreement defined
    assert pairwise_dice(np.zeros((2, 4), dtype=bool)) == 1.0  # both readers leave the patch empty


# ------------------------------------------------------------------------------ the datamodule
def test_batches_carry_image_consensus_and_reader_masks(dm2d):
    batch = next(iter(dm2d.val_dataloader()))
    b = len(batch["id"])
    assert batch["image"].shape == (b, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["label"].shape == (b, 32, 32) and batch["label"].dtype == torch.int64
    assert batch["reader_masks"].shape == (b, 4, 32, 32) and batch["reader_masks"].dtype == torch.bool
    assert torch.equal(batch["spacing"], torch.ones(b, 2))
    assert dm2d.num_classes == 2 and dm2d.class_names == ["background", "nodule"]


def test_every_nodule_stays_with_masks_where_its_readers_drew(dm2d):
    samples = [s for split in items(dm2d).values() for s in split]
    assert len(samples) == 24 and len({s["id"] for s in samples}) == 24  # no nodule dropped (small or rated 3)
    for s in samples:
        r = int(s["n_readers"])
        assert 1 <= r <= 4 and not s["reader_masks"][r:].any()
        assert s["reader_masks"][:r].any(), f"{s['id']}: no reader's mask in the patch"
        assert torch.equal(s["label"].bool(), s["reader_masks"][:r].float().mean(0) >= 0.5)  # the consensus rule
        assert s["label"].any(), f"{s['id']}: empty consensus"
        inside, outside = s["image"][0][s["label"].bool()], s["image"][0][~s["label"].bool()]
        assert inside.mean() > outside.mean(), f"{s['id']}: the phantom's nodule is not where the readers drew it"


def test_reader_agreement_per_split_and_split_by_patient(dm2d):
    per_split = items(dm2d)
    patients = {name: {s["patient_id"] for s in split} for name, split in per_split.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    for name, split in per_split.items():
        values = np.array([float(s["reader_agreement"]) for s in split if s["n_readers"] >= 2])
        assert 0.0 <= dm2d.reader_agreement[name] <= 1.0
        assert dm2d.reader_agreement[name] == pytest.approx(values.mean())
    assert 0.5 < dm2d.reader_agreement["train"] < 1.0  # readers agree, not perfectly
    (note,) = dm2d.summary_notes("test")  # what summary.md prints beside the model's Dice
    assert f"{dm2d.reader_agreement['test']:.4f}" in note and "human baseline" in note


def test_3d_patches_and_cache(lidc_mini_db, tmp_path):
    kwargs = dict(root=str(tmp_path), annotation_db=lidc_mini_db, spatial_dims=3, patch_size=16, max_nodules=6)
    dm = LIDCSegDataModule(**kwargs)
    dm.setup("fit")
    s = dm.data_train[0]
    assert s["image"].shape == (1, 16, 16, 16) and s["label"].shape == s["reader_masks"].shape[1:] == (16, 16, 16)
    assert dm.cache_path().name.startswith("lidc_seg_phantom_") and dm.cache_path().exists()
    again = LIDCSegDataModule(**kwargs)
    again.setup("fit")  # from the cache
    assert torch.equal(again.data_train[0]["reader_masks"], s["reader_masks"])


def test_augmentation_moves_the_masks_with_the_image(dm2d):
    batch = next(iter(dm2d.train_dataloader()))
    batch = {**batch, "image": batch["label"][:, None].float()}  # an image that is its own label
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.training = True
    dm2d.trainer = trainer
    try:
        out = dm2d.on_after_batch_transfer(batch, 0)
    finally:
        dm2d.trainer, dm2d._aug_generator = None, None
    assert torch.equal(out["image"][:, 0], out["label"].float())
    assert out["label"].dtype == torch.int64 and out["reader_masks"].dtype == torch.bool
    assert not torch.equal(out["label"], batch["label"])  # something moved
    kept = out["reader_masks"].flatten(1).sum(1) == batch["reader_masks"].flatten(1).sum(1)
    assert kept.all()  # flips and rotations keep every reader's area


def test_augmentation_3d_moves_label_and_reader_masks_with_the_image(lidc_mini_db, tmp_path):
    dm = LIDCSegDataModule(root=str(tmp_path), annotation_db=lidc_mini_db, spatial_dims=3, patch_size=16,
                           max_nodules=6, batch_size=6)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    # the image encodes the label and every reader's mask, so any mismatch after the transform shows
    bits = torch.tensor([2, 4, 8, 16]).reshape(1, 4, 1, 1, 1)
    code = lambda b: b["label"] + (b["reader_masks"].long() * bits).sum(1)  # noqa: E731
    out = dm.augment_batch({**batch, "image": code(batch)[:, None].float()}, torch.Generator().manual_seed(1))
    assert torch.equal(out["image"][:, 0], code(out).float())
    assert out["label"].dtype == torch.int64 and out["reader_masks"].dtype == torch.bool
    assert not torch.equal(out["label"], batch["label"])
    # and the same draw on the real image moves it as it moves the label
    real = dm.augment_batch(batch, torch.Generator().manual_seed(1))
    assert torch.equal(real["label"], out["label"]) and torch.equal(real["reader_masks"], out["reader_masks"])
    values = lambda x: x.flatten(1).sort(1).values  # noqa: E731 -- flips and turns only permute the voxels
    assert torch.equal(values(real["image"]), values(batch["image"]))


def test_mask_of_the_wrong_grid_is_refused_naming_the_key(dm2d):
    batch = {"image": torch.zeros(2, 1, 8, 8), "label": torch.zeros(2, 8, 7, dtype=torch.int64),
             "reader_masks": torch.zeros(2, 4, 8, 8, dtype=torch.bool)}  # fmt: skip
    with pytest.raises(ValueError, match=r"batch\['label'\] of shape \[2, 8, 7\] is not a map on the grid"):
        dm2d.augment_batch(batch, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shape", [(8, 1, 6, 6), (8, 1, 6, 6, 6)])
def test_classification_augmentation_is_bit_identical_to_the_former_one(shape, tmp_path):
    """LIDC classification (no masks) draws and transforms exactly as before the mask-aware augmentation."""
    from medrobust.datamodules.lidc import LIDCDataModule

    def former(images, generator):  # the pre-mask-aware implementation, verbatim
        b, nd = images.shape[0], images.dim()
        shape = [b] + [1] * (nd - 1)
        out = images
        for axis in range(2, nd):
            flip = (torch.rand(b, generator=generator) < 0.5).to(images.device).reshape(shape)
            out = torch.where(flip, out.flip(axis), out)
        k = torch.randint(0, 4, (b,), generator=generator).to(images.device).reshape(shape)
        rotated = out
        for r in (1, 2, 3):
            rotated = torch.where(k == r, torch.rot90(out, r, dims=(-2, -1)), rotated)
        return rotated

    dm = LIDCDataModule(root=str(tmp_path))
    batch = {"image": torch.rand(*shape), "label": torch.randint(0, 2, (shape[0],)), "nodule_id": ["a"] * shape[0]}
    g_new, g_old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        out = dm.augment_batch(batch, g_new)
        assert torch.equal(out["image"], former(batch["image"], g_old)) and out["label"] is batch["label"]
