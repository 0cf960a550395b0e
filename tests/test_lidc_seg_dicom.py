"""task=lidc_seg with data.source=dicom: nodule masks on patches of a real-format DICOM series.

The tree is test_lidc_dicom's (LIDC-IDRI-0047's geometry, four readers, soft tissue in proportion to the readers
outlining each pixel). The masks are checked against the readers' contours rasterized here on the native grid
and sampled at the patch voxels, and against the bright region of the DICOM pixels themselves.
"""

from __future__ import annotations

import re
import shutil
import sqlite3

import numpy as np
import pytest
from PIL import Image, ImageDraw

from medrobust.data.lidc_annotations import load_nodules
from medrobust.data.lidc_dicom import DicomSeriesError
from medrobust.data.patches import patch_offsets
from medrobust.datamodules.lidc_seg import LIDCSegDataModule
from test_lidc_dicom import NODULE_HU, PARENCHYMA_HU, SCAN_ID, lidc_dicom_tree  # noqa: F401 (a fixture)


def make_dm(root, db, tmp_path, **kwargs) -> LIDCSegDataModule:
    kwargs = {"patch_size": 32, "batch_size": 4, "augment": False, "split": (1.0, 0.0, 0.0), **kwargs}  # one nodule
    return LIDCSegDataModule(source="dicom", root=str(root), cache_dir=str(tmp_path / "cache"), annotation_db=db,
                             **kwargs)  # fmt: skip


def only_item(dm: LIDCSegDataModule) -> dict:
    items = [ds[i] for ds in (dm.data_train, dm.data_val, dm.data_test) for i in range(len(ds))]
    assert len(items) == 1, "the tree holds one annotated nodule"
    return items[0]


def contour_counts(db: str, cache_dir, spatial_dims: int, n: int, spacing: float = 1.0) -> np.ndarray:
    """How many readers' outlines cover each patch voxel: every reader's polygons filled on the native 512 x 512
    slices, less the outline, and sampled at the patch voxel centres, nearest neighbour."""
    nod = next(nd for nd in load_nodules(cache_dir, db) if nd.scan_id == SCAN_ID)
    con = sqlite3.connect(db)
    contours = con.execute(
        "SELECT c.annotation_id, c.image_z_position, c.inclusion, c.coords FROM contours c "
        "JOIN annotations a ON a.id = c.annotation_id WHERE a.scan_id = ?", (SCAN_ID,)).fetchall()  # fmt: skip
    cz, cy, cx = nod.centroid_zyx
    zs = cz + (patch_offsets(n, spacing) if spatial_dims == 3 else np.zeros(1))
    rows = np.rint((cy + patch_offsets(n, spacing)) / nod.pixel_spacing).astype(int)
    cols = np.rint((cx + patch_offsets(n, spacing)) / nod.pixel_spacing).astype(int)
    counts = np.zeros((len(zs), n, n), dtype=int)
    for reader in sorted({a for a, *_ in contours}):
        for d, z in enumerate(zs):
            native = np.zeros((512, 512), dtype=bool)
            for ann, cz_, inclusion, coords in contours:  # the outline of the slice nearest to z (2.5 mm apart)
                if ann == reader and inclusion and abs(cz_ - z) <= 1.25:
                    xy = np.asarray(coords.replace("\n", ",").split(","), dtype=int).reshape(-1, 2)
                    canvas = Image.new("1", (512, 512), 0)
                    ImageDraw.Draw(canvas).polygon(xy.ravel().tolist(), fill=1, outline=1)
                    inside = np.array(canvas)
                    inside[xy[:, 1], xy[:, 0]] = False  # LIDC's outline lies just outside the lesion (as pylidc)
                    native |= inside
            counts[d] += native[np.ix_(rows, cols)]
    return counts[0] if spatial_dims == 2 else counts


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("dims", [2, 3])
def test_masks_land_on_the_contours_and_the_bright_voxels(lidc_dicom_tree, lidc_mini_db, tmp_path, dims):
    root, scan = lidc_dicom_tree
    n = 32 if dims == 2 else 24
    dm = make_dm(root, lidc_mini_db, tmp_path, spatial_dims=dims, patch_size=n)
    dm.prepare_data()
    dm.setup("fit")
    item = only_item(dm)
    assert item["image"].shape == (1, *(n,) * dims) and item["label"].shape == (n,) * dims
    assert item["reader_masks"].shape == (4, *(n,) * dims) and int(item["n_readers"]) == 4
    assert item["patient_id"] == scan["patient_id"]
    label, readers = item["label"].numpy().astype(bool), item["reader_masks"].numpy()

    # the consensus rule: a voxel is nodule when at least half of the readers include it (2 of 4 counts)
    votes = readers.sum(0)
    np.testing.assert_array_equal(label, votes >= 2)
    assert (votes == 2).any() and label[votes == 2].all()

    # each reader's mask and the consensus sit where the contours are (0.91 IoU and 0.1 voxel measured)
    want = contour_counts(lidc_mini_db, tmp_path / "cache", dims, n)
    assert iou(label, want >= 2) > 0.85, iou(label, want >= 2)
    assert np.abs(votes - want).mean() < 0.1
    centres = [np.argwhere(m).mean(0) for m in (label, want >= 2)]
    assert np.abs(centres[0] - centres[1]).max() < 0.5, centres

    # and on the DICOM pixels: soft tissue where at least half of the readers drew the nodule (the tree's pixels
    # include the outlines, the masks do not: 0.74 / 0.64 IoU measured)
    hu = dm.intensity.to_native(item["image"][0].numpy())
    bright = hu > PARENCHYMA_HU + 0.375 * (NODULE_HU - PARENCHYMA_HU)  # between 1 of 4 and 2 of 4 readers
    assert iou(label, bright) > 0.55, iou(label, bright)
    assert bright[label].mean() > 0.9  # the mask lies inside the bright region


def test_the_task_config_reads_the_tree(lidc_dicom_tree, lidc_mini_db, tmp_path):
    """``python train.py task=lidc_seg data.source=dicom data.root=<download>`` builds this datamodule."""
    from medrobust.runner import build_data_and_module
    from conftest import compose_config

    cfg = compose_config("train", ["task=lidc_seg", "data.source=dicom", f"data.root={lidc_dicom_tree[0]}",
                                   f"data.annotation_db={lidc_mini_db}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "data.split=[1.0,0.0,0.0]"],
                         tmp_path)  # fmt: skip
    dm, module = build_data_and_module(cfg)
    assert isinstance(dm, LIDCSegDataModule) and dm.source == "dicom"
    dm.prepare_data()
    dm.setup("fit")
    item = only_item(dm)
    assert item["label"].shape == (48, 48) and item["label"].sum() > 10  # the config's patch, the nodule in it
    assert module.class_names == dm.class_names == ["background", "nodule"]


def test_a_missing_tree_names_the_path(lidc_mini_db, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"data\.root.*{re.escape(str(tmp_path / 'no-tree'))}"):
        make_dm(tmp_path / "no-tree", lidc_mini_db, tmp_path)


def test_a_tree_without_the_annotated_scan_names_the_path(lidc_dicom_tree, lidc_mini_db, tmp_path):
    """Only radiographs and reports: no CT series of an annotated scan."""
    root = tmp_path / "tree"
    shutil.copytree(lidc_dicom_tree[0], root)
    for path in root.rglob("*.dcm"):
        path.unlink()
    (root / "notes.txt").write_text("not DICOM")
    with pytest.raises(FileNotFoundError, match=rf"found 0 DICOM CT series under '{re.escape(str(root))}'.*none"):
        make_dm(root, lidc_mini_db, tmp_path).prepare_data()


def test_a_series_without_the_outlined_slices_names_its_folder(lidc_dicom_tree, lidc_mini_db, tmp_path):
    """The nodule's series is there but its outlined slices are not (a partial download)."""
    root = tmp_path / "tree"
    shutil.copytree(lidc_dicom_tree[0], root)
    (series,) = {path.parent for path in root.rglob("*.dcm")}
    files = sorted(series.glob("*.dcm"))
    for path in files[: len(files) // 2]:  # the upper half of the slices (named in reverse z order)
        path.unlink()
    uid = re.escape(lidc_dicom_tree[1]["series_uid"])
    with pytest.raises(DicomSeriesError, match=rf"{uid}.*missing slices.*{re.escape(str(series))}"):
        make_dm(root, lidc_mini_db, tmp_path).prepare_data()
