"""Decathlon and nnU-Net v2 folders, written with nibabel in tmp dirs and read back through MSDDataModule."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from medrobust.data.msd import DatasetError, read_dataset
from medrobust.data.msd_example import write_example_dataset
from medrobust.datamodules.msd import MSDDataModule


def make_dm(root, tmp_path, **kwargs) -> MSDDataModule:
    kwargs = {"cache_dir": str(tmp_path / "cache"), "patch_size": [8, 8, 8], "batch_size": 2, **kwargs}
    dm = MSDDataModule(str(root), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def every_sample(dm: MSDDataModule) -> list[dict]:
    return [ds[i] for ds in (dm.data_train, dm.data_val, dm.data_test) for i in range(len(ds))]


@pytest.fixture
def msd_root(tmp_path):
    return write_example_dataset(tmp_path / "Task99_Example", "msd", n_cases=5)


# ------------------------------------------------------------------------------ reading both layouts
def test_decathlon_layout_reads_back_in_ras_with_its_spacing(msd_root, tmp_path):
    spec = read_dataset(msd_root)
    assert (spec.layout, spec.num_classes, spec.in_channels) == ("msd", 3, 1)
    assert spec.class_names == ("background", "outer", "inner") and len(spec.cases) == 5
    dm = make_dm(msd_root, tmp_path, augment=False)
    assert (dm.num_classes, dm.in_channels, dm.class_names) == (3, 1, ["background", "outer", "inner"])
    sample = dm.data_val[0]
    assert sample["image"].shape == (1, 12, 12, 12) and sample["label"].shape == (12, 12, 12)
    assert 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert sample["spacing"].tolist() == pytest.approx([0.8, 0.8, 1.5])
    # the files' affine flips x (L->R voxel order): RAS reorientation flips the array back
    written = np.asarray(nib.load(msd_root / "labelsTr" / f"{sample['id']}.nii.gz").dataobj)
    assert np.array_equal(sample["label"].numpy(), written[::-1])
    crop = dm.data_train[0]
    assert crop["image"].shape == (1, 8, 8, 8) and crop["label"].shape == (8, 8, 8)


def test_nnunet_layout_stacks_channel_files_in_order(tmp_path):
    root = write_example_dataset(tmp_path / "Dataset001_Example", "nnunet", n_cases=4, channels=2)
    dm = make_dm(root, tmp_path, ct_window=[0, 1000], augment=False)  # a linear window: values are checkable
    assert (dm.spec.layout, dm.in_channels, dm.num_classes) == ("nnunet", 2, 3)
    sample = dm.data_val[0]
    for c in range(2):
        written = np.asarray(nib.load(root / "imagesTr" / f"{sample['id']}_{c:04d}.nii.gz").dataobj)
        assert np.allclose(sample["image"][c].numpy(), np.clip(written[::-1] / 1000, 0, 1), atol=1e-5)


def test_decathlon_4d_multimodal_image_and_resampling(tmp_path):
    root = write_example_dataset(tmp_path / "Task98", "msd", n_cases=4, channels=2)
    dm = make_dm(root, tmp_path, pixdim=[1.6, 1.6, 1.5])
    sample = dm.data_val[0]
    # MONAI keeps the extent between the corner voxels: (12 - 1) * 0.8 / 1.6 + 1 = 6.5 voxels, rounded up
    assert sample["image"].shape == (2, 7, 7, 12) and sample["label"].shape == (7, 7, 12)
    assert sample["spacing"].tolist() == pytest.approx([1.6, 1.6, 1.5])
    assert set(sample["label"].unique().tolist()) == {0, 1, 2}  # nearest-neighbour labels: no new values


def test_2d_slices_split_by_case_and_batched_per_case(msd_root, tmp_path):
    dm = make_dm(msd_root, tmp_path, spatial_dims=2, patch_size=[8, 8], batch_size=5)
    cases = {name: {s["case_id"] for s in ds} for name, ds in zip(("train", "val", "test"),
             ([d[i] for i in range(len(d))] for d in (dm.data_train, dm.data_val, dm.data_test)))}  # fmt: skip
    assert sum(map(len, cases.values())) == 5 and set.union(*cases.values()) == {f"case_{i:03d}" for i in range(5)}
    assert all(cases[a].isdisjoint(cases[b]) for a, b in (("train", "val"), ("train", "test"), ("val", "test")))
    batches = list(dm.val_dataloader())
    assert sum(len(b["id"]) for b in batches) == 12  # every axial slice of the one validation case
    assert all(len(set(b["case_id"])) == 1 and b["image"].shape[2:] == (12, 12) for b in batches)
    assert dm.data_train[0]["image"].shape == (1, 8, 8)
    again = MSDDataModule(str(msd_root), cache_dir=str(tmp_path / "cache"), spatial_dims=2, patch_size=[8, 8])
    again.setup("fit")  # from the cache, the same split
    assert {again.data_val[i]["id"] for i in range(len(again.data_val))} == {b for x in batches for b in x["id"]}


def test_classes_and_channels_resolve_from_dataset_json(msd_root):
    cfg = OmegaConf.create({"root": str(msd_root), "k": "${dataset_json:${root},num_classes}",
                            "c": "${dataset_json:${root},in_channels}", "names": "${dataset_json:${root},class_names}"})  # fmt: skip
    assert (cfg.k, cfg.c, list(cfg.names)) == (3, 1, ["background", "outer", "inner"])


# ------------------------------------------------------------------------------ errors that stop the run
def edit_json(root, change) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    change(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def rewrite(path, array=None, affine=None) -> None:
    old = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(old.dataobj) if array is None else array,
                             old.affine if affine is None else affine), path)  # fmt: skip


def test_missing_dataset_json_and_missing_keys(tmp_path, msd_root):
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        MSDDataModule(str(tmp_path))
    edit_json(msd_root, lambda m: m.pop("modality"))
    with pytest.raises(DatasetError, match=r"dataset.json: missing key\(s\) \['modality'\]"):
        MSDDataModule(str(msd_root))
    nn = write_example_dataset(tmp_path / "nn", "nnunet", n_cases=3)
    edit_json(nn, lambda m: m.pop("file_ending"))
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['file_ending'\]; a nnU-Net v2"):
        MSDDataModule(str(nn))
    edit_json(nn, lambda m: m.update(file_ending=".nii.gz", labels={"background": 0, "tumour": [1, 2]}))
    with pytest.raises(DatasetError, match="region-based"):
        MSDDataModule(str(nn))


def test_missing_file_stops_the_run_naming_it(msd_root, tmp_path):
    (msd_root / "imagesTr" / "case_002.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"imagesTr/case_002.nii.gz: missing \(case 'case_002'"):
        make_dm(msd_root, tmp_path)


@pytest.mark.parametrize("defect", ["shape", "affine", "value", "not_3d", "channels"])
def test_bad_case_stops_the_run_naming_the_file(msd_root, tmp_path, defect):
    label, image = msd_root / "labelsTr" / "case_001.nii.gz", msd_root / "imagesTr" / "case_001.nii.gz"
    written = np.asarray(nib.load(label).dataobj)
    if defect == "shape":
        rewrite(label, written[:, :, :10])
        expected = r"labelsTr/case_001.nii.gz: label shape \(12, 12, 10\) differs from its image"
    elif defect == "affine":
        rewrite(label, affine=np.diag([0.8, 0.8, 1.5, 1.0]))
        expected = "labelsTr/case_001.nii.gz: label affine differs from its image"
    elif defect == "value":
        rewrite(label, np.where(written == 2, 5, written).astype(np.uint8))
        expected = r"labelsTr/case_001.nii.gz: label values \[0, 1, 5\] are not all declared in .*dataset.json"
    elif defect == "not_3d":
        rewrite(image, np.zeros((12, 12), np.float32))
        expected = r"imagesTr/case_001.nii.gz: image must be 3-D \(1 channel\) .* got shape \(12, 12\)"
    else:
        rewrite(image, np.zeros((12, 12, 12, 3), np.float32))
        expected = r"imagesTr/case_001.nii.gz: image must be 3-D \(1 channel\) .* got shape \(12, 12, 12, 3\)"
    with pytest.raises(DatasetError, match=expected):
        make_dm(msd_root, tmp_path)


def test_bad_arguments_name_the_key(msd_root):
    with pytest.raises(ValueError, match=r"data.patch_size must be a list of 2 integers >= 4 .* got \[8, 8, 8\]"):
        MSDDataModule(str(msd_root), spatial_dims=2, patch_size=[8, 8, 8])
    with pytest.raises(FileNotFoundError, match="data.root must be a Decathlon"):
        MSDDataModule(str(msd_root / "nowhere"))


def test_by_dims_picks_the_2d_or_3d_value_and_rejects_other_dims():
    from medrobust.resolvers import register_resolvers

    register_resolvers()
    cfg = OmegaConf.create({"dims": 2, "lr": "${by_dims:${dims},0.003,0.01}"})
    assert cfg.lr == 0.003
    cfg.dims = 3
    assert cfg.lr == 0.01
    cfg.dims = 1
    with pytest.raises(Exception, match="by_dims.*spatial_dims 2 or 3 first, got 1"):
        _ = cfg.lr
