"""The BCCD datamodule on real-format VOC folders (written by medrobust.data.voc_examples): LUNA's detection batch
format, boxes scaled with the resized image, the published split, boxes moved with the image by the augmentation, the
phantom default and its caches, bad files named through the reader's errors, and the argument checks."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medrobust.config import CONF_DIR
from medrobust.data.voc import BCCD_CLASSES
from medrobust.data.voc_examples import CELLS, example_objects, example_splits, write_annotation, write_voc
from medrobust.datamodules.bccd import BccdDataModule
from medrobust.datamodules.detection import CollatedDetection, collate_detection

SOURCE = (96, 128)  # write_voc's (rows, columns)
SIZE = (48, 128)  # rows halved, columns kept: a swapped axis or a forgotten scale shows
N_IMAGES = 16
SPLIT_NAMES = ("train", "val", "test")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return write_voc(tmp_path_factory.mktemp("voc") / "BCCD", n_images=N_IMAGES)


@pytest.fixture(scope="module")
def dm(voc_root, tmp_path_factory) -> BccdDataModule:
    dm = BccdDataModule(root=str(voc_root), cache_dir=str(tmp_path_factory.mktemp("cache")), image_size=SIZE,
                        batch_size=4)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm


def splits(dm: BccdDataModule) -> dict[str, list[dict]]:
    sets = zip(SPLIT_NAMES, (dm.data_train, dm.data_val, dm.data_test))
    return {name: [ds[i] for i in range(len(ds))] for name, ds in sets}


def coverage(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """How much of each pixel ``[r, r + 1)`` of an axis of ``n`` the half-open ``[lo, hi)`` covers."""
    r = torch.arange(n, dtype=torch.float32)
    return (torch.minimum(r + 1, hi) - torch.maximum(r, lo)).clamp(min=0)


def box_maps(batch: dict) -> torch.Tensor:
    """``(B, H, W)``: the summed area of each pixel that valid boxes cover (exact for fractional boxes, which a flip
    or a turn only permutes)."""
    images = batch["image"]
    height, width = images.shape[-2:]
    out = torch.zeros(images.shape[0], height, width)
    for b in range(images.shape[0]):
        for r0, c0, r1, c1 in batch["boxes"][b][batch["box_valid"][b]]:
            out[b] += torch.outer(coverage(r0, r1, height), coverage(c0, c1, width))
    return out


# ------------------------------------------------------------------------------ batches
def check_batch(batch: dict, size) -> None:
    b, n = batch["boxes"].shape[:2]
    assert set(batch) == {"image", "boxes", "labels", "box_valid", "box_target", "id", "patient_id", "spacing"}
    assert batch["image"].shape == (b, 3, *size) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["boxes"].shape == (b, n, 4) and batch["boxes"].dtype == torch.float32
    assert n == max(1, int(batch["box_valid"].sum(1).max()))  # padded to the batch's largest count
    for key, dtype in (("labels", torch.int64), ("box_valid", torch.bool), ("box_target", torch.bool)):
        assert batch[key].shape == (b, n) and batch[key].dtype == dtype, key
    valid = batch["box_valid"]
    assert ((batch["labels"][valid] >= 0) & (batch["labels"][valid] < 3)).all()
    assert (batch["labels"][~valid] == -1).all() and (batch["boxes"][~valid] == 0).all()
    assert torch.equal(batch["box_target"], valid)  # every BCCD box is a target
    assert torch.equal(batch["spacing"], torch.ones(b, 2))
    assert batch["id"] == batch["patient_id"] and len(batch["id"]) == b


def test_batches_have_the_detection_format(dm):
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        check_batch(next(iter(loader)), SIZE)
    assert (dm.in_channels, dm.num_classes, dm.class_names) == (3, 3, ["RBC", "WBC", "Platelets"])
    assert dm.input_bounds == (0.0, 1.0) and dm.intensity.eps_to_model(255.0) == pytest.approx(1.0)
    assert dm.intensity.eps_to_native(4 / 255) == pytest.approx(4.0)  # eps in 8-bit levels or model units


def test_boxes_are_scaled_with_the_resized_image(dm):
    stem = example_splits(N_IMAGES)["train"][0]
    item = next(item for item in splits(dm)["train"] if item["id"] == stem)
    truth = example_objects(N_IMAGES)[stem]
    name, xmin, ymin, xmax, ymax = truth[0]  # VOC: 1-based inclusive; rows scale by 48 / 96, columns by 128 / 128
    assert item["boxes"][0].tolist() == [(ymin - 1) / 2, xmin - 1, ymax / 2, xmax]
    assert item["labels"].tolist() == [BCCD_CLASSES.index(c[0]) for c in truth]
    for (r0, c0, r1, c1), k in zip(item["boxes"].tolist(), item["labels"].tolist()):  # each box frames its cell
        centre = item["image"][:, int((r0 + r1) / 2), int((c0 + c1) / 2)]
        assert torch.allclose(centre, torch.tensor(CELLS[BCCD_CLASSES[k]][0]) / 255, atol=0.12), (stem, k)


def test_padding_and_the_ddp_eval_loader_collate_alike(dm):
    items = splits(dm)["train"]
    few, many = min(items, key=lambda i: len(i["boxes"])), max(items, key=lambda i: len(i["boxes"]))
    assert len(few["boxes"]) < len(many["boxes"])
    batch = collate_detection([few, many])
    assert batch["box_valid"].sum(1).tolist() == [len(few["boxes"]), len(many["boxes"])]
    assert torch.equal(batch["boxes"][1], many["boxes"]) and torch.equal(batch["labels"][1], many["labels"])
    # the DDP evaluation loader reads whole batches through CollatedDetection: the same padding
    direct = collate_detection([dm.data_val[i] for i in (0, 1, 2)])
    sharded = CollatedDetection(dm.data_val)[[0, 1, 2]]
    assert all(torch.equal(direct[k], sharded[k]) if torch.is_tensor(direct[k]) else direct[k] == sharded[k]
               for k in direct)  # fmt: skip


# ------------------------------------------------------------------------------ split
def test_the_published_split_is_kept_by_image(dm):
    ids = {name: [item["id"] for item in split] for name, split in splits(dm).items()}
    assert ids == example_splits(N_IMAGES)  # ImageSets/Main's lists, each image once
    assert sum(map(len, ids.values())) == len({i for v in ids.values() for i in v}) == N_IMAGES
    truth = example_objects(N_IMAGES)
    for name, stems in ids.items():
        counts = dm.split_counts[name]
        labels = [c[0] for stem in stems for c in truth[stem]]
        assert counts == {"images": len(stems), "boxes": len(labels), **{k: labels.count(k) for k in BCCD_CLASSES}}


def test_without_imagesets_a_seeded_split_by_image_is_used_only_when_asked(tmp_path):
    root = write_voc(tmp_path / "BCCD", n_images=12)
    shutil.rmtree(root / "ImageSets")
    with pytest.raises(FileNotFoundError, match="ImageSets/Main"):
        BccdDataModule(root=str(root), cache_dir=str(tmp_path / "c")).setup("fit")
    dm = BccdDataModule(root=str(root), cache_dir=str(tmp_path / "c"), image_size=SIZE, split=[0.5, 0.25, 0.25])
    dm.setup("fit")
    ids = [{item["id"] for item in split} for split in splits(dm).values()]
    assert [len(s) for s in ids] == [6, 3, 3] and len(set.union(*ids)) == 12


# ------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize("size", [SIZE, (64, 64)])
def test_augmentation_moves_the_boxes_with_the_image(voc_root, tmp_path, size):
    dm = BccdDataModule(root=str(voc_root), cache_dir=str(tmp_path), image_size=size, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    turned = False
    for seed in range(6):
        out = dm.augment_batch(batch, torch.Generator().manual_seed(seed))
        spatial = dm.draw_spatial(batch["image"], torch.Generator().manual_seed(seed))  # the same draw
        assert torch.equal(out["image"], spatial(batch["image"]))
        assert torch.allclose(box_maps(out), spatial(box_maps(batch)))  # each box covers where its pixels went
        assert torch.equal(out["boxes"][~batch["box_valid"]], batch["boxes"][~batch["box_valid"]])  # padding stays
        turned |= spatial.k is not None and bool((spatial.k % 2 == 1).any())
    assert turned == (size[0] == size[1])  # quarter turns only keep a square image's shape
    assert any(not torch.equal(dm.augment_batch(batch, torch.Generator().manual_seed(s))["boxes"], batch["boxes"])
               for s in range(4))  # fmt: skip


# ------------------------------------------------------------------------------ phantom and caches
def test_phantom_default_is_a_voc_folder_built_once_and_reused(tmp_path):
    dm = BccdDataModule(cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    folder = dm.phantom_root()
    assert len(list((folder / "Annotations").glob("*.xml"))) == len(list((folder / "JPEGImages").glob("*.jpg"))) == 160
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, dm.cache_path().name,
                                                                 dm.cache_path().with_suffix(".json").name])  # no .tmp
    assert {k: c["images"] for k, c in dm.split_counts.items()} == {"train": 80, "val": 40, "test": 40}
    assert all(c[k] > 0 for c in dm.split_counts.values() for k in BCCD_CLASSES)
    check_batch(next(iter(dm.train_dataloader())), (192, 256))
    jpeg = next((folder / "JPEGImages").iterdir())
    stamps = jpeg.stat().st_mtime_ns, dm.cache_path().stat().st_mtime_ns
    again = BccdDataModule(cache_dir=str(tmp_path))
    again.prepare_data()
    again.setup("fit")
    assert again.cache_path() == dm.cache_path() and again.phantom_root() == folder
    assert (jpeg.stat().st_mtime_ns, dm.cache_path().stat().st_mtime_ns) == stamps  # read, not rewritten
    assert torch.equal(again.data_test[0]["image"], dm.data_test[0]["image"])


def test_cache_is_keyed_by_settings_and_files(dm, voc_root, tmp_path):
    path = dm.cache_path()
    same = BccdDataModule(root=str(voc_root), cache_dir=dm.cache_dir, image_size=SIZE, augment=False, seed=3)
    assert same.cache_path() == path  # augmentation and seed change no cached pixel of a real root
    assert BccdDataModule(root=str(voc_root), cache_dir=dm.cache_dir, image_size=(96, 128)).cache_path() != path
    copy = shutil.copytree(voc_root, tmp_path / "BCCD")  # another folder (and mtimes): another cache
    assert BccdDataModule(root=str(copy), cache_dir=dm.cache_dir, image_size=SIZE).cache_path() != path


# ------------------------------------------------------------------------------ bad inputs
def edited_root(tmp_path, objects, filename=None):
    """A 4-image VOC folder whose first training image's XML holds ``objects`` (and names ``filename``)."""
    root = write_voc(tmp_path / "BCCD", n_images=4)
    stem = example_splits(4)["train"][0]
    xml = write_annotation(root / "Annotations" / f"{stem}.xml", filename or f"{stem}.jpg", SOURCE, objects)
    return root, xml


@pytest.mark.parametrize("objects, filename, error, words", [
    ([("RBC", 10, 10, 200, 40)], None, ValueError, "lies outside the 128 x 96 image"),
    ([("Neutrophil", 10, 10, 20, 20)], None, ValueError, "class 'Neutrophil'"),
    ([("RBC", 10, 10, 20, 20)], "BloodImage_99999.jpg", FileNotFoundError, "names image 'BloodImage_99999.jpg'"),
])  # fmt: skip
def test_bad_files_stop_setup_naming_the_file(tmp_path, objects, filename, error, words):
    root, xml = edited_root(tmp_path, objects, filename)
    dm = BccdDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), image_size=SIZE)
    with pytest.raises(error) as info:
        dm.setup("fit")
    assert str(xml) in str(info.value) and words in str(info.value)


def test_zero_size_boxes_are_skipped_and_logged_by_file(tmp_path, caplog):
    root, xml = edited_root(tmp_path, [("RBC", 10, 10, 30, 30), ("Platelets", 50, 20, 50, 28)])
    dm = BccdDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), image_size=SIZE)
    with caplog.at_level(logging.WARNING, logger="medrobust"):
        dm.setup("fit")
    assert f"{xml}: object 2 (Platelets) has zero size" in caplog.text
    item = next(item for item in splits(dm)["train"] if item["id"] == xml.stem)
    assert item["labels"].tolist() == [0] and item["boxes"].tolist() == [[4.5, 9.0, 15.0, 30.0]]


# ------------------------------------------------------------------------------ arguments and config
@pytest.mark.parametrize("key, value", [
    ("image_size", [100, 128]), ("image_size", [192]), ("image_size", 192), ("image_size", [0, 16]),
    ("image_size", [True, 16]), ("image_size", [4096, 256]), ("phantom_images", 2), ("split", [0.5, 0.3, 0.3]),
    ("seed", -1), ("batch_size", 0), ("num_workers", -1), ("augment", "yes"), ("root", 5), ("cache_dir", 5),
])  # fmt: skip
def test_bad_arguments_name_their_key(key, value):
    with pytest.raises(ValueError, match=rf"data\.{key}"):
        BccdDataModule(**{key: value})


def test_a_missing_root_is_named_before_anything_is_read(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"data\.root: {tmp_path / 'nope'}: data root missing"):
        BccdDataModule(root=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data\.root: .*Annotations: folder missing"):
        BccdDataModule(root=str(tmp_path / "empty"))


def test_config_builds_the_datamodule_with_its_defaults(tmp_path):
    cfg = OmegaConf.load(CONF_DIR / "data" / "bccd.yaml")
    assert cfg._target_ == "medrobust.datamodules.bccd.BccdDataModule"
    cfg.cache_dir = str(tmp_path)  # the config's interpolates paths.data_dir
    dm = instantiate(cfg, _convert_="all")  # as the runner does; nothing is read or drawn yet
    defaults = {**BccdDataModule(cache_dir=str(tmp_path)).hparams, "image_size": [192, 256]}  # the code's is a tuple
    assert dict(dm.hparams) == defaults  # every key an argument, each default the code's
    assert dm.image_size == (192, 256) and dm.root is None and not any(tmp_path.iterdir())


def test_ddp_eval_loader_takes_whole_padded_batches_of_the_one_process_order(dm):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    assert (trainer.world_size, trainer.global_rank) == (2, 0)  # no process is started before fit
    dm.trainer, dm.batch_size = trainer, 1  # 4 validation images: 4 batches
    try:
        sharded = list(dm.val_dataloader())
        dm.trainer = None
        whole = list(dm.val_dataloader())  # one process: batches 0, 1, ...; rank 0 of 2 takes 0, 2, ...
    finally:
        dm.trainer, dm.batch_size = None, 4
    assert len(sharded) == len(whole[0::2]) == 2
    for got, want in zip(sharded, whole[0::2]):
        check_batch(got, SIZE)
        assert got["id"] == want["id"] and torch.equal(got["boxes"], want["boxes"])
