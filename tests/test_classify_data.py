"""Classification on the user's own files (task=classify / isic / ddsm): each format read back with the right values,
patient-level stratified splits, the class counts logged, balanced sampling, the ISIC and CBIS-DDSM layouts, caching.
Datasets are written in the real formats by medrobust.data.classify_examples (or here, with pillow / pydicom / nibabel).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from PIL import Image

from medrobust.data import classify_images as images_io
from medrobust.data import classify_readers as readers
from medrobust.data.classify_examples import ISIC_2018, write_csv_dataset, write_ddsm, write_dicom
from medrobust.data.classify_examples import write_folder_dataset, write_isic
from medrobust.data.classify_public import find_ddsm_image
from medrobust.datamodules.classify import ClassifyDataModule
from medrobust.datamodules.classify_split import BalancedEpochSampler, split_groups

RESOLUTION = 1 / 65535  # the cache stores [0, 1] as uint16 codes


def ready(dm: ClassifyDataModule) -> ClassifyDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def csv_dm(table: Path, tmp_path: Path, **kwargs) -> ClassifyDataModule:
    return ClassifyDataModule(csv=str(table), cache_dir=str(tmp_path / "cache"), **{"image_size": 16, **kwargs})


def items(dm: ClassifyDataModule) -> dict[str, list[dict]]:
    return {name: [ds[i] for i in range(len(ds))] for name, ds in
            zip(("train", "val", "test"), (dm.data_train, dm.data_val, dm.data_test))}  # fmt: skip


def read_table(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def unit(path: Path, size, scale=None, window=None, dims=2, resize="resize"):
    return images_io.preprocess(path, dims, size, resize, scale, window)


# ------------------------------------------------------------------------------ formats read back
def test_png_8_and_16_bit_scale_by_their_dtype(tmp_path):
    ramp = np.arange(48).reshape(6, 8)
    Image.fromarray((ramp * 5).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((ramp * 1000).astype(np.uint16)).save(tmp_path / "b.png")  # values far above 255
    eight, native8, _ = unit(tmp_path / "a.png", (6, 8))
    sixteen, native16, _ = unit(tmp_path / "b.png", (6, 8))
    np.testing.assert_allclose(eight[0], ramp * 5 / 255, atol=1e-6)
    np.testing.assert_allclose(sixteen[0], ramp * 1000 / 65535, atol=1e-6)
    assert native8 == (0.0, 255.0) and native16 == (0.0, 65535.0)


def test_rgb_channels_kept_in_order_alpha_dropped_grey_palette_is_grey(tmp_path):
    colour = np.zeros((8, 8, 3), np.uint8) + np.array([200, 100, 30], np.uint8)
    Image.fromarray(colour).save(tmp_path / "c.jpg", quality=95)
    Image.fromarray(np.dstack([colour, np.full((8, 8), 7, np.uint8)])).save(tmp_path / "c.png")  # RGBA
    Image.fromarray(np.full((8, 8), 90, np.uint8)).convert("P").save(tmp_path / "p.png")
    jpeg, _, _ = unit(tmp_path / "c.jpg", (8, 8))
    rgba, _, note = unit(tmp_path / "c.png", (8, 8))
    palette, _, _ = unit(tmp_path / "p.png", (8, 8))
    np.testing.assert_allclose(jpeg.mean(axis=(1, 2)), np.array([200, 100, 30]) / 255, atol=2 / 255)
    np.testing.assert_allclose(rgba, colour.transpose(2, 0, 1) / 255, atol=1e-6)
    assert note == "RGBA alpha channel dropped" and palette.shape == (1, 8, 8) and abs(palette.mean() - 90 / 255) < 1e-6
    assert [readers.peek_channels(tmp_path / n) for n in ("c.jpg", "c.png", "p.png")] == [3, 3, 1]


STORED = np.array([[0, 100, 200, 300], [400, 500, 600, 700], [800, 900, 1000, 1100], [1200, 1300, 1400, 2047]])


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_rescale_then_configured_window_monochrome1_inverted(tmp_path, photometric):
    path = write_dicom(tmp_path / "x.dcm", STORED, slope=2.0, intercept=-1024.0, photometric=photometric)
    image, native, _ = unit(path, (4, 4), window=(-1000.0, 400.0))
    expected = np.clip((STORED * 2.0 - 1024.0 + 1000.0) / 1400.0, 0, 1)
    np.testing.assert_allclose(image[0], 1 - expected if photometric == "MONOCHROME1" else expected, atol=1e-6)
    assert native == (-1000.0, 400.0)


def test_dicom_own_window_when_data_window_is_null(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", STORED, slope=1.0, intercept=-1024.0, window=(40, 400))
    image, native, _ = unit(path, (4, 4))  # the default rule of grey DICOM: window
    low, high = 40 - 0.5 - 399 / 2, 40 - 0.5 + 399 / 2  # PS3.3 C.11.2.1.2.1 (LINEAR)
    np.testing.assert_allclose(image[0], np.clip((STORED - 1024.0 - low) / (high - low), 0, 1), atol=1e-6)
    assert native == (low, high)


def test_dicom_voi_lut_sequence(tmp_path):
    lut = (np.arange(16) ** 2 * 100).astype(np.uint16)  # a non-linear display curve
    stored = np.arange(16).reshape(4, 4)
    image, native, _ = unit(write_dicom(tmp_path / "x.dcm", stored, voi_lut=lut), (4, 4))
    np.testing.assert_allclose(image[0], lut[stored] / lut[-1], atol=1e-6)
    assert np.isnan(native).all()  # no linear window in native units


def test_nifti_2d_and_3d_scaled_per_image_in_ras_order(tmp_path):
    volume = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32) * 300 - 50
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, 1.0, 1.0, 1.0])), tmp_path / "v.nii.gz")  # x runs right to left
    nib.save(nib.Nifti1Image(volume[:, :, 0], np.eye(4)), tmp_path / "s.nii.gz")
    cube, native, _ = unit(tmp_path / "v.nii.gz", (5, 6, 7), dims=3)
    plane, _, _ = unit(tmp_path / "s.nii.gz", (5, 6))
    flipped = volume[::-1]
    np.testing.assert_allclose(cube[0], (flipped - flipped.min()) / (flipped.max() - flipped.min()), atol=1e-6)
    s = volume[:, :, 0]
    np.testing.assert_allclose(plane[0], (s - s.min()) / (s.max() - s.min()), atol=1e-6)
    assert np.isnan(native).all()


def test_resize_antialiases_and_crop_pads(tmp_path):
    checker = (np.indices((30, 30)).sum(0) % 2).astype(np.float32)[None]
    shrunk = images_io.fit_size(checker, (10, 10), "resize")  # plain bilinear would pick every third pixel: 0s and 1s
    assert np.abs(shrunk - 0.5).max() < 0.05
    ramp = np.arange(100, dtype=np.float32).reshape(1, 10, 10) / 100
    np.testing.assert_array_equal(images_io.fit_size(ramp, (6, 6), "crop")[0], ramp[0, 2:8, 2:8])
    padded = images_io.fit_size(ramp, (14, 14), "crop")[0]
    np.testing.assert_array_equal(padded[2:12, 2:12], ramp[0])
    assert padded.sum() == ramp.sum()
    cube = np.random.default_rng(0).random((1, 16, 16, 16)).astype(np.float32)
    assert abs(images_io.fit_size(cube, (8, 8, 8), "resize").mean() - cube.mean()) < 1e-5  # area averaging
    assert images_io.fit_size(cube, (8, 20, 16), "resize").shape == (1, 8, 20, 16)


# ------------------------------------------------------------------------------ the datamodule
def test_classes_and_channels_known_at_construction_without_decoding(tmp_path, monkeypatch):
    table = write_csv_dataset(tmp_path / "d", "jpeg", n_patients=3, images_per_patient=2, size=8)
    monkeypatch.setattr(images_io, "preprocess", lambda *a, **k: pytest.fail("an image was decoded"))
    dm = csv_dm(table, tmp_path)
    assert dm.class_names == ["negative", "positive"] and dm.in_channels == 3 and dm.num_classes == 2
    assert csv_dm(table, tmp_path, classes=["positive", "negative"]).class_names == ["positive", "negative"]
    rows = read_table(table)
    for i, row in enumerate(rows):
        row["label"] = str([2, 10, 1][i % 3])
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert csv_dm(table, tmp_path).class_names == ["1", "2", "10"]  # numbers in numeric order


def test_batches_carry_the_files_values_labels_and_stable_ids(tmp_path):
    table = write_csv_dataset(tmp_path / "d", "png16", n_patients=5, images_per_patient=2, size=16)
    dm = ready(csv_dm(table, tmp_path, split=[0.6, 0.2, 0.2]))
    labels = {row["path"]: row["label"] for row in read_table(table)}
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"image", "label", "id", "patient_id"} and batch["image"].dtype == torch.float32
    for image, label, sample_id, patient in zip(batch["image"], batch["label"], batch["id"], batch["patient_id"]):
        expected, _, _ = unit(table.parent / sample_id, (16, 16))
        np.testing.assert_allclose(image.numpy(), expected, atol=RESOLUTION)
        assert dm.class_names[int(label)] == labels[sample_id] and sample_id.startswith(f"images/{patient}_")
    assert dm.intensity.low == 0 and dm.intensity.high == 65535 and dm.input_bounds == (0.0, 1.0)


def test_3d_volumes(tmp_path):
    table = write_csv_dataset(tmp_path / "d", "nifti3d", n_patients=5, images_per_patient=1, size=12)
    dm = ready(csv_dm(table, tmp_path, spatial_dims=3, image_size=8, split=[0.6, 0.2, 0.2]))
    image = next(iter(dm.train_dataloader()))["image"]
    assert image.shape[1:] == (1, 8, 8, 8) and 0 <= image.min() and image.max() <= 1 and dm.intensity is None


def test_patient_level_split_never_mixes_patients(tmp_path):
    table = write_csv_dataset(tmp_path / "d", "png", n_patients=20, images_per_patient=3, size=8)
    for seed in range(3):
        splits = items(ready(csv_dm(table, tmp_path, image_size=8, seed=seed)))
        patients = {name: {item["patient_id"] for item in its} for name, its in splits.items()}
        assert all(patients.values()) and not (patients["train"] & patients["val"])
        assert not (patients["train"] & patients["test"]) and not (patients["val"] & patients["test"])
        assert 36 <= len(splits["train"]) <= 48  # 70 % of 60 images, in whole patients


def test_split_is_stratified_by_label():
    labels = np.array([0] * 70 + [1] * 30)
    assign = split_groups([f"s{i}" for i in range(100)], labels, (0.7, 0.15, 0.15), seed=1)
    for k, fraction in enumerate((0.7, 0.15, 0.15)):
        for c, n in ((0, 70), (1, 30)):
            assert abs(((assign == k) & (labels == c)).sum() - fraction * n) <= 1.5
    groups = [f"p{i // 2}" for i in range(100)]  # patients of two images: the rare class still reaches every split
    rare = np.array([1 if i < 12 else 0 for i in range(100)])
    assign = split_groups(groups, rare, (0.7, 0.15, 0.15), seed=0)
    assert all(((assign == k) & (rare == 1)).sum() >= 2 for k in range(3))


def test_split_column_is_used_as_is(tmp_path):
    table = write_csv_dataset(tmp_path / "d", "png", n_patients=10, images_per_patient=2, size=8, split_column=True)
    wanted = {row["path"]: row["split"] for row in read_table(table)}
    for name, its in items(ready(csv_dm(table, tmp_path, image_size=8, seed=3))).items():
        assert its and all(wanted[item["id"]] == name for item in its)


def test_class_counts_logged_and_summarised(tmp_path, caplog):
    root = write_folder_dataset(tmp_path / "d", "png", ("cat", "dog"), per_class=10, size=8)
    with caplog.at_level(logging.INFO, logger="medrobust"):
        dm = ready(ClassifyDataModule(source="folder", root=str(root), cache_dir=str(tmp_path / "c"), image_size=8))
    counts = dm.class_counts
    line = next(r.getMessage() for r in caplog.records if "classify folder" in r.getMessage())
    assert f"train {len(dm.data_train)} (cat {counts['train'][0]}, dog {counts['train'][1]})" in line
    assert f"test {len(dm.data_test)} (cat {counts['test'][0]}, dog {counts['test'][1]})" in line
    assert sum(map(sum, counts.values())) == 20 and counts["train"] == [7, 7]
    test = counts["test"]
    assert dm.summary_notes("test") == [f"Images per class (test split): cat {test[0]}, dog {test[1]}"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def imbalanced(tmp_path) -> Path:
    """A folder dataset of 30 'common' and 5 'rare' images (6 : 1)."""
    root = write_folder_dataset(tmp_path / "d", "png", ("common", "rare"), per_class=30, size=8)
    for path in sorted((root / "rare").iterdir())[5:]:
        path.unlink()
    return root


def test_imbalance_warns(imbalanced, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="medrobust"):
        ready(ClassifyDataModule(source="folder", root=str(imbalanced), cache_dir=str(tmp_path / "c"), image_size=8,
                                 split=[0.8, 0.1, 0.1]))  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "largest / smallest class = 6.0 (common 24, rare 4)" in warnings[0]
    assert "data.balanced_sampling=true" in warnings[0]


def test_balanced_sampling_draws_classes_equally(imbalanced, tmp_path):
    dm = ready(ClassifyDataModule(source="folder", root=str(imbalanced), cache_dir=str(tmp_path / "c"), image_size=8,
                                  balanced_sampling=True, batch_size=4))  # fmt: skip
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, BalancedEpochSampler)
    drawn = []
    for epoch in range(8):
        loader.sampler.set_epoch(epoch)
        drawn += [int(label) for batch in loader for label in batch["label"]]
    assert 0.4 < np.mean(drawn) < 0.6  # rare is 1 of 7 training images, drawn about half the time


def test_balanced_sampler_is_deterministic_per_epoch_and_shards_under_ddp():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = BalancedEpochSampler(labels, seed=3)
    first = list(sampler)
    assert list(BalancedEpochSampler(labels, seed=3)) == first and list(BalancedEpochSampler(labels, 4)) != first
    sampler.set_epoch(1)
    assert list(sampler) != first
    # Lightning's wrapper under DDP: each process a share of this same list of draws, together all of it
    shards = [DistributedSamplerWrapper(BalancedEpochSampler(labels, seed=3), num_replicas=2, rank=r) for r in (0, 1)]
    for shard in shards:
        shard.set_epoch(1)
    assert sorted(list(shards[0]) + list(shards[1])) == sorted(sampler)
    assert all(len(list(s)) == 50 for s in shards)


# ------------------------------------------------------------------------------ public layouts
def test_isic_2018_labels_and_lesion_groups(tmp_path):
    paths = write_isic(tmp_path / "isic", per_class=4, images_per_lesion=2, size=8)
    dm = ready(ClassifyDataModule(source="isic", csv=str(paths["csv"]), root=str(paths["root"]),
                                  metadata=str(paths["metadata"]), cache_dir=str(tmp_path / "c"), image_size=8))
    assert dm.class_names == list(ISIC_2018) and dm.in_channels == 3
    truth = {row["image"]: next(d for d in ISIC_2018 if float(row[d]) == 1) for row in read_table(paths["csv"])}
    lesion = {row["image_id"]: row["lesion_id"] for row in read_table(paths["metadata"])}
    lesions = {}
    for name, its in items(dm).items():
        for item in its:
            assert dm.class_names[int(item["label"])] == truth[item["id"]]
            assert item["patient_id"] == lesion[item["id"]]
            lesions.setdefault(item["patient_id"], set()).add(name)
    assert len(lesions) == 14 and all(len(splits) == 1 for splits in lesions.values())


def test_isic_2019_leaves_out_the_empty_unk_column(tmp_path, caplog):
    paths = write_isic(tmp_path / "isic", version=2019, per_class=2, images_per_lesion=1, size=8)
    with caplog.at_level(logging.INFO, logger="medrobust"):
        dm = ClassifyDataModule(source="isic", csv=str(paths["csv"]), root=str(paths["root"]),
                                metadata=str(paths["metadata"]), cache_dir=str(tmp_path / "c"), image_size=8)
    assert dm.class_names == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert any("diagnosis column UNK has no image marked 1: not a class" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("rule", ["binary", "three_way"])
def test_ddsm_labels_published_test_split_and_val_by_patient(tmp_path, rule):
    root = write_ddsm(tmp_path / "ddsm", n_patients=20, size=8)
    dm = ready(ClassifyDataModule(source="ddsm", root=str(root), label_rule=rule, scale="minmax", image_size=8,
                                  cache_dir=str(tmp_path / "c")))  # fmt: skip
    to_class = {"MALIGNANT": "malignant", "BENIGN": "benign",
                "BENIGN_WITHOUT_CALLBACK": "benign" if rule == "binary" else "benign_without_callback"}  # fmt: skip
    expected, test_ids = {}, set()
    for name in root.glob("*_case_description_*_set.csv"):
        for row in read_table(name):
            case = row["cropped image file path"].split("/")[0]
            expected[case] = to_class[row["pathology"]]
            test_ids |= {case} if "_test_" in name.name else set()
    assert dm.num_classes == (2 if rule == "binary" else 3)
    splits = items(dm)
    assert {item["id"] for item in splits["test"]} == test_ids
    val_patients = {item["patient_id"] for item in splits["val"]}
    assert val_patients and not val_patients & {item["patient_id"] for item in splits["train"]}
    for its in splits.values():
        assert all(dm.class_names[int(item["label"])] == expected[item["id"]] for item in its)
    chosen = [row.path for row in dm.table.rows]  # the cropped image, never the ROI mask beside it
    assert all("cropped images" in str(p) or p.name == "000000.dcm" for p in chosen) and len(chosen) == 40


def test_ddsm_cropped_image_told_from_its_mask_without_a_series_description(tmp_path):
    root = write_ddsm(tmp_path / "ddsm", n_patients=2, size=8)
    case = root / "Calc-Training_P_00001_LEFT_CC_1"
    for path in case.rglob("*.dcm"):  # both in one series, as some downloads have them
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "ROI mask images"
        ds.save_as(path, enforce_file_format=True)
    text = read_table(root / "calc_case_description_train_set.csv")[1]["cropped image file path"]
    found = find_ddsm_image(root, text, "row 3")
    assert "cropped images" in str(found) and len(np.unique(pydicom.dcmread(found).pixel_array)) > 2


# ------------------------------------------------------------------------------ caching
def test_cache_is_read_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    table = write_csv_dataset(tmp_path / "d", "png", n_patients=5, images_per_patient=2, size=8)
    first = ready(csv_dm(table, tmp_path, image_size=8))
    with monkeypatch.context() as patch:
        patch.setattr(images_io, "preprocess", lambda *a, **k: pytest.fail("decoded although cached"))
        again = ready(csv_dm(table, tmp_path, image_size=8))
    assert again.cache_path() == first.cache_path() and len(again.data_train) == len(first.data_train)
    changed = table.parent / "images" / "P000_0.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # a different mtime even on file systems of coarse time stamps
    fresh = ready(csv_dm(table, tmp_path, image_size=8))
    assert fresh.cache_path() != first.cache_path()
    item = next(it for its in items(fresh).values() for it in its if it["id"] == "images/P000_0.png")
    assert torch.all(item["image"] == 1.0)


# ------------------------------------------------------------------------------ arguments and augmentation
@pytest.mark.parametrize("kwargs, key", [
    (dict(source="table"), "data.source"), (dict(image_size=2), "data.image_size"),
    (dict(resize="stretch"), "data.resize"), (dict(scale="zscore"), "data.scale"), (dict(window=[5, 1]), "data.window"),
    (dict(split=[0.5, 0.5, 0.5]), "data.split"), (dict(augment="yes"), "data.augment"),
    (dict(image_size=[16, 24]), "data.augment_rot90"), (dict(csv=None), "data.csv is required"),
    (dict(root="/tmp"), "data.root is not used"), (dict(label_rule="four_way"), "data.label_rule"),
    (dict(spatial_dims=4), "data.spatial_dims"), (dict(classes="benign"), "data.classes"),
])  # fmt: skip
def test_bad_arguments_name_the_key(tmp_path, kwargs, key):
    table = write_csv_dataset(tmp_path / "d", "png", n_patients=2, images_per_patient=2, size=8)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ClassifyDataModule(**{"csv": str(table), "cache_dir": str(tmp_path), **kwargs})


def test_augmentation_flips_and_turns_deterministically(tmp_path):
    table = write_csv_dataset(tmp_path / "d", "png", n_patients=2, images_per_patient=2, size=8)
    images = torch.rand(6, 1, 8, 8)
    for rot90 in (True, False):
        dm = csv_dm(table, tmp_path, augment_rot90=rot90)
        out = dm.augment_images(images, torch.Generator().manual_seed(0))
        again = dm.augment_images(images, torch.Generator().manual_seed(0))
        assert torch.equal(out, again) and not torch.equal(out, images)
        assert all(torch.equal(o.flatten().sort().values, i.flatten().sort().values) for o, i in zip(out, images))
        assert (dm.draw_spatial(images, torch.Generator()).k is not None) == rot90
