"""Brain tissue segmentation data (the brain phantom's label maps, 2-D slices and 3-D volumes), its configs, and the
example grids with label maps."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from medrobust.runner import build_net

from conftest import compose_config
from medrobust.data.brain_phantom import NATIVE_WINDOW, TISSUE_LABELS
from medrobust.datamodules.brainseg import BrainSegDataModule
from medrobust.reporting.examples import display_index, save_example_grid

TINY = dict(image_size=24, num_subjects=12, slices_per_subject=4, batch_size=8)
SUBJECTS = {f"sub-{i:05d}" for i in range(12)}


def ready(dm: BrainSegDataModule) -> BrainSegDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def splits(dm: BrainSegDataModule) -> dict:
    return {"train": dm.data_train, "val": dm.data_val, "test": dm.data_test}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """One cache folder for the module: the MNI152 atlas is derived once."""
    return str(tmp_path_factory.mktemp("brainseg"))


@pytest.fixture(scope="module")
def seg2d(root) -> BrainSegDataModule:
    return ready(BrainSegDataModule(root=root, spatial_dims=2, **TINY))


@pytest.fixture(scope="module")
def seg3d(root) -> BrainSegDataModule:
    return ready(BrainSegDataModule(root=root, spatial_dims=3, **TINY))


@pytest.mark.parametrize("dims", [2, 3])
def test_batches_shapes_ranges_and_spacing(seg2d, seg3d, dims):
    dm = seg2d if dims == 2 else seg3d
    assert dm.input_bounds == (0.0, 1.0) and dm.intensity == NATIVE_WINDOW and dm.in_channels == 1
    assert dm.num_classes == 5 and dm.class_names == list(TISSUE_LABELS)
    batch = next(iter(dm.train_dataloader()))
    spatial = (24,) * dims
    assert batch["image"].shape == (8, 1, *spatial) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (8, *spatial) and batch["label"].dtype == torch.int64
    assert batch["spacing"].shape == (8, dims) and torch.allclose(batch["spacing"], torch.tensor(200.0 / 24))
    assert all(isinstance(i, str) and i.startswith(s) for i, s in zip(batch["id"], batch["subject_id"]))
    x = torch.cat([b["image"] for b in dm.val_dataloader()])
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
    labels = torch.cat([b["label"] for b in dm.val_dataloader()])
    assert 0 <= labels.min() and labels.max() <= 4


@pytest.mark.parametrize("dims", [2, 3])
def test_split_by_subject_every_class_in_every_split(seg2d, seg3d, dims):
    dm = seg2d if dims == 2 else seg3d
    subjects = {name: set(ds.subject_ids) for name, ds in splits(dm).items()}
    assert not (subjects["train"] & subjects["val"] or subjects["train"] & subjects["test"]
                or subjects["val"] & subjects["test"])  # fmt: skip
    assert set().union(*subjects.values()) == SUBJECTS
    assert {name: len(s) for name, s in subjects.items()} == dm.split_counts
    per_subject = 4 if dims == 2 else 1
    assert all(len(ds) == per_subject * len(subjects[name]) for name, ds in splits(dm).items())
    for name, ds in splits(dm).items():
        assert min(ds.class_voxels(5)) > 0, f"{name}: a class is missing, voxels per class {ds.class_voxels(5)}"


def test_ids_unique_stable_and_slices_cut_from_the_volumes(seg2d, seg3d):
    ids = [i for ds in splits(seg2d).values() for i in ds.ids]
    assert len(ids) == len(set(ids)) == 4 * 12
    assert all(i.split("/")[0] in SUBJECTS and i.split("/")[1].startswith("z") for i in ids)
    assert sorted(i for ds in splits(seg3d).values() for i in ds.ids) == sorted(SUBJECTS)
    # a 2-D sample is the axial plane (last RAS axis) of the same subject's 3-D volume, image and label
    volumes = {sid: k for ds in splits(seg3d).values() for k, sid in enumerate(ds.ids)}
    for ds in splits(seg2d).values():
        sid, z = ds.ids[0].split("/")
        volume_ds = next(v for v in splits(seg3d).values() if sid in v.ids)
        k, z = volumes[sid], int(z[1:])
        assert np.array_equal(ds.images[0], volume_ds.images[k][:, :, z])
        assert np.array_equal(ds.labels[0], volume_ds.labels[k][:, :, z])


def test_cache_reused_and_subjects_independent_of_cohort_size(seg2d, root):
    path = seg2d.cache_path()
    stamp = os.stat(path).st_mtime_ns
    again = ready(BrainSegDataModule(root=root, spatial_dims=2, **TINY))
    assert again.cache_path() == path and os.stat(path).st_mtime_ns == stamp
    assert again.data_val.ids == seg2d.data_val.ids
    assert np.array_equal(again.data_val.images, seg2d.data_val.images)
    # a subject is drawn from (seed, subject id) alone: the same in a smaller cohort (another cache)
    small = ready(BrainSegDataModule(root=root, spatial_dims=2, **{**TINY, "num_subjects": 6}))
    assert small.cache_path() != path
    sample = small.data_train[0]
    big = next(ds for ds in splits(seg2d).values() if sample["id"] in ds.ids)
    assert torch.equal(big[big.ids.index(sample["id"])]["image"], sample["image"])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(spatial_dims=4), "data.spatial_dims must be 2 or 3, got 4"),
    (dict(image_size=4), "data.image_size must be an integer >= 8, got 4"),
    (dict(slices_per_subject=0), "data.slices_per_subject must be an integer >= 1, got 0"),
    (dict(num_subjects=2.5), "data.num_subjects must be an integer >= 3, got 2.5"),
    (dict(batch_size=0), "data.batch_size must be an integer >= 1, got 0"),
    (dict(age_range=[60, 20]), r"data.age_range must be \(low, high\) years .*got \[60.0, 20.0\]"),
    (dict(split=[0.5, 0.5]), r"data.split must be a list of 3 numbers, got \[0.5, 0.5\]"),
    (dict(split=[0.0, 0.5, 0.5]), r"data.split must be 3 fractions .*got \[0.0, 0.5, 0.5\]"),
])  # fmt: skip
def test_bad_arguments_rejected_naming_key_and_value(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        BrainSegDataModule(root=str(tmp_path), **kwargs)


def test_too_many_slices_or_too_few_subjects_fail_with_the_key(root):
    with pytest.raises(ValueError, match=r"data.slices_per_subject=20: only \d+ axial slices cross the brain"):
        BrainSegDataModule(root=root, image_size=16, slices_per_subject=20, num_subjects=3).prepare_data()
    with pytest.raises(ValueError, match=r"3 subjects are too few for split .*raise data.num_subjects"):
        ready(BrainSegDataModule(root=root, image_size=16, slices_per_subject=2, num_subjects=3))


def test_defaults_follow_spatial_dims(tmp_path):
    two, three = BrainSegDataModule(root=str(tmp_path)), BrainSegDataModule(root=str(tmp_path), spatial_dims=3)
    assert (two.image_size, two.batch_size, three.image_size, three.batch_size) == (64, 32, 40, 4)
    assert three.spacing_mm == pytest.approx(5.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_config_class_names_match_the_data_and_models_give_dense_logits(dims, tmp_path):
    """task=brainseg composes with the data's class names; both U-Net configs give (B, K, *spatial) logits."""
    for model in ("basic_unet", "unet"):
        cfg = compose_config("train", ["task=brainseg", f"model={model}", f"data.spatial_dims={dims}"], tmp_path)
        assert list(cfg.module.class_names) == list(TISSUE_LABELS) and cfg.module.num_classes == len(TISSUE_LABELS)
        assert cfg.optimized_metric == cfg.callbacks.model_checkpoint.monitor == "val/dice"
        dm = instantiate(cfg.data)
        assert isinstance(dm, BrainSegDataModule) and dm.spatial_dims == dims and dm.num_classes == cfg.num_outputs
        # 3-D learns the CSF only at the higher rate, in the epochs that fit its run time (${by_dims:...})
        assert (cfg.module.optimizer.lr, cfg.trainer.max_epochs) == ((0.003, 12) if dims == 2 else (0.01, 10))
        net = build_net(cfg).eval()
        with torch.no_grad():
            assert net(torch.rand(1, 1, *(32,) * dims)).shape == (1, 5, *(32,) * dims)


def test_display_index_picks_the_slice_with_most_foreground():
    assert display_index((8, 8)) == () and display_index((6, 8, 8)) == (3,)
    mask = torch.zeros(6, 8, 8, dtype=torch.int64)
    mask[1, :2] = 1
    mask[4, :3] = 2
    assert display_index((6, 8, 8), mask) == (4,)
    assert display_index((6, 8, 8), torch.zeros(6, 8, 8)) == (3,)  # empty: the middle slice


@pytest.mark.parametrize("dims", [2, 3])
def test_example_grid_with_masks_writes_a_taller_png(seg2d, seg3d, dims, tmp_path):
    batch = next(iter((seg2d if dims == 2 else seg3d).val_dataloader()))
    x, label = batch["image"][:3], batch["label"][:3]
    x_adv = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    masks = {"ground truth": label, "clean prediction": label.roll(1, dims=1), "adversarial prediction": label * 0}
    plain = save_example_grid(x, x_adv, tmp_path / "plain.png", "plain")
    dense = save_example_grid(x, x_adv, tmp_path / "sub" / "masks.png", "with masks", masks=masks)
    assert dense.is_file() and plt.imread(dense).shape[0] > 1.5 * plt.imread(plain).shape[0]  # 6 rows, not 3
    with pytest.raises(ValueError, match=r"masks\['ground truth'\] must have shape \(B, \*spatial\)"):
        save_example_grid(x, x_adv, tmp_path / "bad.png", "bad", masks={"ground truth": label[:, None]})


def augmented(dm: BrainSegDataModule, batch: dict, seed: int = 0) -> dict:
    """``batch`` through the training-time hook, with a fresh generator seeded by ``seed``."""
    dm._aug_generator = torch.Generator().manual_seed(seed)
    dm.trainer = type("T", (), {"training": True, "global_rank": 0})()  # a stand-in: the hook reads these only
    try:
        return dm.on_after_batch_transfer(batch, 0)
    finally:
        dm.trainer, dm._aug_generator = None, None


@pytest.mark.parametrize("dims", [2, 3])
def test_augmentation_flips_the_label_with_the_image(seg2d, seg3d, dims):
    dm = seg2d if dims == 2 else seg3d
    assert dm.augment and dm.mask_keys == ("label",)
    batch = next(iter(dm.train_dataloader()))
    # a phantom whose label is a function of the image: the image carries the label in its own voxels
    phantom = {**batch, "image": batch["image"] + 10 * batch["label"][:, None]}
    out = augmented(dm, phantom)
    assert torch.equal(torch.div(out["image"][:, 0], 10, rounding_mode="floor").long(), out["label"])
    assert out["label"].dtype == torch.int64 and out["image"].dtype == torch.float32
    # the same draw on the real batch: left-right flips of the samples the phantom flipped, nothing else
    real = augmented(dm, batch)
    flipped = (real["label"] != batch["label"]).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < len(flipped)
    expected = torch.where(flipped.reshape(-1, *[1] * dims), batch["label"].flip(1), batch["label"])
    assert torch.equal(real["label"], expected) and torch.equal(real["label"], out["label"])
    assert torch.equal(real["image"], torch.where(flipped.reshape(-1, 1, *[1] * dims), batch["image"].flip(2),
                                                  batch["image"]))  # fmt: skip


def test_augmentation_off_and_on_evaluation_batches_leaves_batches_alone(root, seg2d):
    batch = next(iter(seg2d.train_dataloader()))
    assert augmented(BrainSegDataModule(root=root, augment=False, **TINY), batch) is batch
    assert seg2d.on_after_batch_transfer(batch, 0) is batch  # no trainer: not training
    with pytest.raises(ValueError, match="data.augment must be true or false, got 'yes'"):
        BrainSegDataModule(root=root, augment="yes")


def test_classification_augmentation_is_bit_identical_to_the_image_only_flip(tmp_path):
    """brain age (no masks) draws and flips exactly as its former image-only flip did."""
    from medrobust.datamodules.brainage import BrainAgeDataModule

    def former(images, generator):  # the pre-mask-aware implementation, verbatim
        flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
        return torch.where(flip.reshape(-1, *[1] * (images.dim() - 1)), images.flip(2), images)

    dm = BrainAgeDataModule(root=str(tmp_path))
    batch = {"image": torch.rand(16, 1, 6, 5, 4), "label": torch.rand(16)}
    g_new, g_old = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(3):  # the generators stay in step across batches
        out = dm.augment_batch(batch, g_new)
        assert torch.equal(out["image"], former(batch["image"], g_old)) and out["label"] is batch["label"]
