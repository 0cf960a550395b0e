"""Write small classification datasets in real file formats (tests, smoke runs, a demo of each layout).

Images carry a learnable class signal: class 0 is smooth noisy background, class ``k > 0`` adds a bright Gaussian
blob, larger for larger ``k`` (in RGB also tinted by class). Formats are written by the field's libraries: PNG and
JPEG with pillow, DICOM with pydicom (file meta, explicit-VR little-endian transfer syntax, RescaleSlope / Intercept,
MONOCHROME1 / 2), NIfTI with nibabel. Layouts: a label CSV (:func:`write_csv_dataset`), a folder per class
(:func:`write_folder_dataset`), ISIC 2018 / 2019 (:func:`write_isic`) and CBIS-DDSM (:func:`write_ddsm`).

    python -c "from medrobust.data.classify_examples import write_examples; print(write_examples('demo'))"
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FORMATS = ("png", "png16", "jpeg", "dicom", "dicom_mono1", "nifti2d", "nifti3d")
SUFFIX = {"png": ".png", "png16": ".png", "jpeg": ".jpg", "dicom": ".dcm", "dicom_mono1": ".dcm",
          "nifti2d": ".nii.gz", "nifti3d": ".nii.gz"}  # fmt: skip
CT_INTERCEPT = -1024.0  # stored = HU + 1024, the usual CT encoding
ISIC_2018 = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_2019 = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def signal_image(rng: np.random.Generator, label: int, shape: Sequence[int], channels: int = 1) -> np.ndarray:
    """float ``(channels, *shape)`` in [0, 1]: background and noise, plus for ``label > 0`` a blob of radius growing
    with the label at a random place near the centre (tinted towards channel ``label % channels`` in colour)."""
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"), axis=0)
    image = 0.25 + 0.05 * rng.standard_normal((channels, *shape))
    if label > 0:
        centre = np.array(shape) / 2 + rng.uniform(-0.15, 0.15, len(shape)) * np.array(shape)
        radius = min(shape) * (0.08 + 0.04 * label)
        blob = np.exp(-(((grid - centre.reshape(-1, *[1] * len(shape))) ** 2).sum(0)) / (2 * radius**2))
        tint = np.full(channels, 0.5)
        tint[label % channels] = 0.6 if channels > 1 else 0.5
        image = image + tint.reshape(-1, *[1] * len(shape)) * blob
    return np.clip(image, 0.0, 1.0)


# ------------------------------------------------------------------------------------------ single files
def write_png(path: str | os.PathLike, image: np.ndarray, bits: int = 8) -> Path:
    """``image`` ``(C, H, W)`` in [0, 1] (C 1 or 3) as an 8- or 16-bit PNG (16-bit: grey only)."""
    from PIL import Image

    top = 255 if bits == 8 else 65535
    data = np.rint(np.asarray(image) * top).astype(np.uint8 if bits == 8 else np.uint16)
    Image.fromarray(data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)).save(path)
    return Path(path)


def write_jpeg(path: str | os.PathLike, image: np.ndarray, quality: int = 95) -> Path:
    from PIL import Image

    data = np.rint(np.asarray(image) * 255).astype(np.uint8)
    Image.fromarray(data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)).save(path, quality=quality)
    return Path(path)


def write_dicom(path: str | os.PathLike, stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0,
                photometric: str = "MONOCHROME2", window: Sequence[float] | None = None, patient_id: str = "P0",
                series_description: str = "", voi_lut: np.ndarray | None = None,
                bits_stored: int = 16) -> Path:  # fmt: skip
    """A single-frame grey DICOM of unsigned 16-bit ``stored`` values ``(H, W)``. ``window``: ``(centre, width)``
    written as WindowCenter / WindowWidth; ``voi_lut``: a VOI LUT Sequence (entries for stored values 0, 1, ...)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.SeriesDescription = patient_id, "OT", series_description
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = (int(n) for n in stored.shape)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.LUTData = np.asarray(voi_lut, dtype="<u2").tobytes()  # OW: 16-bit little-endian entries
        ds.VOILUTSequence = pydicom.Sequence([item])
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def write_nifti(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(volume), np.eye(4) if affine is None else affine), path)
    return Path(path)


def write_image(path: str | os.PathLike, fmt: str, image: np.ndarray, patient_id: str = "P0") -> Path:
    """``image`` ``(C, *spatial)`` in [0, 1] written as ``fmt`` (:data:`FORMATS`): png / jpeg 8-bit (RGB when C = 3),
    png16 16-bit grey, dicom a CT-like file (HU in [-1000, 400] at slope 1, intercept -1024, a lung window),
    dicom_mono1 a MONOCHROME1 radiograph (12 bits, slope 2, bright = low stored values), nifti2d / nifti3d float."""
    if fmt in ("png", "png16"):
        return write_png(path, image, 16 if fmt == "png16" else 8)
    if fmt == "jpeg":
        return write_jpeg(path, image)
    if fmt == "dicom":
        hu = -1000.0 + 1400.0 * image[0]
        return write_dicom(path, np.rint(hu - CT_INTERCEPT), 1.0, CT_INTERCEPT, window=(-300, 1400),
                           patient_id=patient_id)  # fmt: skip
    if fmt == "dicom_mono1":
        stored = np.rint((1.0 - image[0]) * 2000.0)  # slope 2: rescaled values 0 .. 4000, low = bright
        return write_dicom(path, stored, 2.0, 0.0, "MONOCHROME1", window=(2000, 4001), patient_id=patient_id,
                           bits_stored=12)  # fmt: skip
    if fmt in ("nifti2d", "nifti3d"):
        return write_nifti(path, (image[0] * 1000.0).astype(np.float32))
    raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")


# ------------------------------------------------------------------------------------------ layouts
def write_csv_dataset(root: str | os.PathLike, fmt: str = "png", classes: Sequence[str] = ("negative", "positive"),
                      n_patients: int = 12, images_per_patient: int = 3, size: int = 32, split_column: bool = False,
                      patient_column: bool = True, seed: int = 0) -> Path:  # fmt: skip
    """``root/labels.csv`` (``path,label[,patient_id][,split]``) and ``root/images/<patient>_<k><suffix>``; returns the
    CSV. Labels are drawn per image; a ``split`` column puts whole patients in train / val / test (3:1:1 in turn)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape, channels = ((size,) * 3 if fmt == "nifti3d" else (size, size)), (3 if fmt == "jpeg" else 1)
    header = ["path", "label"] + ["patient_id"] * patient_column + ["split"] * split_column
    lines = []
    for p in range(n_patients):
        patient = f"P{p:03d}"
        split = ("train", "train", "train", "val", "test")[p % 5]
        for k in range(images_per_patient):
            label = int(rng.integers(len(classes)))
            name = f"images/{patient}_{k}{SUFFIX[fmt]}"
            write_image(root / name, fmt, signal_image(rng, label, shape, channels), patient)
            lines.append([name, classes[label]] + [patient] * patient_column + [split] * split_column)
    return _write_csv(root / "labels.csv", header, lines)


def write_folder_dataset(root: str | os.PathLike, fmt: str = "png", classes: Sequence[str] = ("negative", "positive"),
                         per_class: int = 12, size: int = 32, seed: int = 0) -> Path:  # fmt: skip
    """``root/<class>/<n><suffix>``, ``per_class`` images per class; returns ``root``."""
    root, rng = Path(root), np.random.default_rng(seed)
    shape, channels = ((size,) * 3 if fmt == "nifti3d" else (size, size)), (3 if fmt == "jpeg" else 1)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            write_image(root / name / f"{n:03d}{SUFFIX[fmt]}", fmt, signal_image(rng, label, shape, channels))
    return root


def write_isic(root: str | os.PathLike, version: int = 2018, per_class: int = 4, images_per_lesion: int = 2,
               size: int = 32, seed: int = 0) -> dict[str, Path]:  # fmt: skip
    """The ISIC 2018 task 3 (or 2019) layout: a JPEG folder, the one-hot ground truth and the lesion metadata
    (HAM10000_metadata.csv / ISIC_2019_Training_Metadata.csv). 2019's UNK column stays all 0, as in the real
    training set. Returns ``{"csv", "root", "metadata"}``."""
    root, rng = Path(root), np.random.default_rng(seed)
    diagnoses = ISIC_2018 if version == 2018 else ISIC_2019
    prefix = "ISIC2018_Task3_Training" if version == 2018 else "ISIC_2019_Training"
    images = root / f"{prefix}_Input"
    images.mkdir(parents=True, exist_ok=True)
    truth, meta, n = [], [], 0
    for label, diagnosis in enumerate(d for d in diagnoses if d != "UNK"):
        for i in range(per_class):
            image, lesion = f"ISIC_{n:07d}", f"HAM_{(n // images_per_lesion):07d}"
            write_jpeg(images / f"{image}.jpg", signal_image(rng, label, (size, size), 3))
            truth.append([image] + [f"{float(d == diagnosis):.1f}" for d in diagnoses])
            meta.append([lesion, image, diagnosis.lower(), "histo", "50.0", "male", "back"] if version == 2018 else
                        [image, "50", "back", lesion, "male"])  # fmt: skip
            n += 1
    _write_csv(root / f"{prefix}_GroundTruth.csv", ["image", *diagnoses], truth)
    meta_name, meta_header = (("HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                                                         "localization"]) if version == 2018 else
                              ("ISIC_2019_Training_Metadata.csv", ["image", "age_approx", "anatom_site_general",
                                                                   "lesion_id", "sex"]))  # fmt: skip
    _write_csv(root / meta_name, meta_header, meta)
    return {"csv": root / f"{prefix}_GroundTruth.csv", "root": images, "metadata": root / meta_name}


DDSM_COLUMNS = {  # the published files' columns (mass: breast_density, calc: breast density; calc type / distribution)
    "mass": ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
             "image file path", "cropped image file path", "ROI mask file path"],
    "calc": ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
             "image file path", "cropped image file path", "ROI mask file path"],
}  # fmt: skip
PATHOLOGIES = ("BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT")


def write_ddsm(root: str | os.PathLike, n_patients: int = 12, size: int = 32, seed: int = 0) -> Path:
    """A CBIS-DDSM tree and its four case-description CSVs in ``root``: per patient one mass and one calcification
    abnormality (MALIGNANT ones with a blob), patients 0 - 7 of 10 in the train files, the others in the test files.
    As in a real download, the CSVs' paths (``<case>/<UID>/<UID>/000000.dcm``, with a trailing newline) do not match
    the tree (``<case>/<date>-DDSM-<n>/1.000000-cropped images-<n>/1-1.dcm``, next to an ROI mask series), except for
    the first patient's mass, stored at the CSV's path. Returns ``root``."""
    root, rng = Path(root), np.random.default_rng(seed)
    rows: dict[tuple[str, str], list[list[str]]] = {}
    for p in range(n_patients):
        patient, split = f"P_{p:05d}", "train" if p % 10 < 8 else "test"
        for kind in ("mass", "calc"):
            pathology = PATHOLOGIES[(p + (kind == "calc")) % 3]
            case = f"{kind.capitalize()}-{'Training' if split == 'train' else 'Test'}_{patient}_LEFT_CC_1"
            listed = f"{case}/1.3.6.1.4.1.9590.100.1.2.{p}1/1.3.6.1.4.1.9590.100.1.2.{p}2/000000.dcm"
            image = signal_image(rng, int(pathology == "MALIGNANT"), (size, size))
            stored = np.rint(image[0] * 40000.0)
            if p == 0 and kind == "mass":
                cropped = root / listed
            else:
                cropped = root / case / f"07-21-2016-DDSM-{p}" / f"1.000000-cropped images-{p}" / "1-1.dcm"
                mask = root / case / f"07-21-2016-DDSM-{p}" / f"1.000000-ROI mask images-{p}" / "1-1.dcm"
                mask.parent.mkdir(parents=True, exist_ok=True)
                write_dicom(mask, (image[0] > 0.5) * 255.0, patient_id=patient, series_description="ROI mask images")
            cropped.parent.mkdir(parents=True, exist_ok=True)
            write_dicom(cropped, stored, patient_id=patient, series_description="cropped images")
            full = f"{case[:-2]}/1.3.6.1.4.1.9590.100.1.2.{p}3/1.3.6.1.4.1.9590.100.1.2.{p}4/000000.dcm"
            features = ["3", "LEFT", "CC", "1", kind, "OVAL", "CIRCUMSCRIBED", "4", pathology, "3"]
            rows.setdefault((kind, split), []).append([patient, *features, full, listed + "\n", listed + "\n"])
    for (kind, split), lines in rows.items():
        _write_csv(root / f"{kind}_case_description_{split}_set.csv", DDSM_COLUMNS[kind], lines)
    return root


def write_examples(root: str | os.PathLike) -> dict[str, Path]:
    """One demo of every layout under ``root``, by what ``data.csv`` / ``data.root`` / ``data.metadata`` point at:
    ``csv`` (a label table of PNGs), ``folder`` (DICOM, a folder per class), ``isic_csv`` / ``isic_root`` /
    ``isic_metadata`` and ``ddsm`` (the CBIS-DDSM root)."""
    root = Path(root)
    isic = write_isic(root / "isic", per_class=20)
    return {"csv": write_csv_dataset(root / "csv_png", "png", n_patients=100, images_per_patient=2),
            "folder": write_folder_dataset(root / "folder_dicom", "dicom", per_class=100),
            "isic_csv": isic["csv"], "isic_root": isic["root"], "isic_metadata": isic["metadata"],
            "ddsm": write_ddsm(root / "ddsm", n_patients=60)}  # fmt: skip


def _write_csv(path: Path, header: Sequence[str], lines: Sequence[Sequence[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(lines)
    return path
