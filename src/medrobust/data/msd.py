"""Medical Segmentation Decathlon and nnU-Net v2 datasets: ``dataset.json``, checked cases, MONAI loading.

Two layouts, told apart by their ``dataset.json``:

* Decathlon (MSD): ``training`` [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}], ``labels``
  {"0": "background", ...}, ``modality`` {"0": "MRI", ...}; a multi-modal image is one 4-D file (channels last).
* nnU-Net v2: ``channel_names`` {"0": "CT", ...}, ``labels`` {"background": 0, ...}, ``file_ending``, ``numTraining``;
  ``imagesTr/<case>_0000<file_ending>`` one 3-D file per channel, ``labelsTr/<case><file_ending>``.

Classes (consecutive values 0..K-1) and input channels come from ``dataset.json``. Every case is checked before
it is used (:func:`check_case`) and read with MONAI (:func:`load_case`): channel first, reoriented to RAS,
optionally resampled, intensities scaled to [0, 1]. Errors name the file and what was expected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from medrobust.data.landmark_formats import load_nifti, read_failure

LAYOUT_KEYS = {"msd": ("training", "labels", "modality"), "nnunet": ("channel_names", "labels", "file_ending")}
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's world space (MONAI's current default)
AFFINE_TOLERANCE = 1e-3  # mm: a label's affine may differ from its image's by float rounding only


class DatasetError(ValueError):
    """A dataset folder, ``dataset.json`` or case file that does not have what the layout requires."""


@dataclass(frozen=True)
class Case:
    """One labelled case: ``images`` one path (MSD, 3-D or 4-D) or one 3-D path per channel (nnU-Net)."""

    case_id: str
    images: tuple[str, ...]
    label: str


@dataclass(frozen=True)
class DatasetSpec:
    """What ``dataset.json`` declares: ``class_names[k]`` is the name of label value ``k``."""

    root: str
    layout: str
    name: str
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]
    cases: tuple[Case, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def json_path(self) -> str:
        return os.path.join(self.root, "dataset.json")


# --------------------------------------------------------------------------------- dataset.json
def read_dataset(root: str | os.PathLike) -> DatasetSpec:
    """Parse ``<root>/dataset.json`` (either layout) and list its labelled cases; files are not opened yet."""
    root = str(root)
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.root {root!r}: no dataset.json (expected a Decathlon or nnU-Net v2 dataset folder)")
    try:
        meta = json.loads(Path(path).read_text())
    except OSError as err:
        raise read_failure(path, err, "the dataset's dataset.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: holds a JSON {type(meta).__name__}; expected an object with the keys "
                           f"{list(LAYOUT_KEYS['msd'])} (Decathlon) or {list(LAYOUT_KEYS['nnunet'])} "
                           "(nnU-Net v2)")  # fmt: skip
    layout = "nnunet" if "channel_names" in meta or "file_ending" in meta else "msd"
    missing = [k for k in LAYOUT_KEYS[layout] if k not in meta]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {missing}; a {_LAYOUT_NAMES[layout]} dataset.json needs "
                           f"{list(LAYOUT_KEYS[layout])}")  # fmt: skip
    if not isinstance(meta["labels"], dict):
        raise DatasetError(f"{path}: labels is a JSON {type(meta['labels']).__name__}; expected an object mapping "
                           + ("label values to class names" if layout == "msd" else "class names to label values"))
    if layout == "msd":
        class_names = _classes(path, {name: value for value, name in meta["labels"].items()})
        channels = _indexed(path, "modality", meta["modality"])
        cases = _msd_cases(path, root)
    else:
        class_names = _classes(path, meta["labels"])
        channels = _indexed(path, "channel_names", meta["channel_names"])
        cases = _nnunet_cases(path, root, meta, len(channels))
    if not cases:
        raise DatasetError(f"{path}: no labelled cases; expected at least one training image with its label")
    name = str(meta.get("name") or Path(root).name)
    return DatasetSpec(root, layout, name, channels, class_names, tuple(cases))


_LAYOUT_NAMES = {"msd": "Decathlon", "nnunet": "nnU-Net v2"}


def _classes(path: str, name_to_value: dict) -> tuple[str, ...]:
    """Class names by label value; the values must be the integers 0..K-1 (region labels are not supported)."""
    values = {}
    for name, value in name_to_value.items():
        try:
            values[int(value)] = str(name)
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: labels: {name!r} has value {value!r}; expected one integer label value "
                               "(nnU-Net region-based labels are not supported)") from None  # fmt: skip
    if sorted(values) != list(range(len(values))) or len(values) < 2:
        raise DatasetError(f"{path}: labels must be the consecutive values 0..K-1 with K >= 2 (0 background), "
                           f"got {sorted(values)}")  # fmt: skip
    return tuple(values[k] for k in range(len(values)))


def _indexed(path: str, key: str, table: dict) -> tuple[str, ...]:
    """``{"0": "CT", "1": ...}`` -> names in channel order; the indices must be 0..C-1."""
    try:
        by_index = {int(k): str(v) for k, v in table.items()}
    except (AttributeError, ValueError):
        raise DatasetError(f"{path}: {key} must map channel indices '0', '1', ... to names, got {table!r}") from None
    if sorted(by_index) != list(range(len(by_index))) or not by_index:
        raise DatasetError(f"{path}: {key} must number the channels 0..C-1, got {sorted(by_index)}")
    return tuple(by_index[k] for k in range(len(by_index)))


def _msd_cases(path: str, root: str) -> list[Case]:
    try:
        items = load_decathlon_datalist(path, is_segmentation=True, data_list_key="training", base_dir=root)
    except (ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{path}: 'training' must be a list of {{'image': ..., 'label': ...}}: {err}") from None
    cases, first = [], {}
    for n, item in enumerate(items):
        missing = [key for key in ("image", "label") if key not in item]
        if missing:
            raise DatasetError(f"{path}: training entry {n} {item} has no {missing}; expected "
                               "{'image': ..., 'label': ...}")  # fmt: skip
        case = Case(_case_id(item["label"]), (str(item["image"]),), str(item["label"]))
        if case.case_id in first:
            raise DatasetError(f"{path}: training entries {first[case.case_id]} and {n} are both case "
                               f"{case.case_id!r} ({case.label}); expected each case once")  # fmt: skip
        first[case.case_id] = n
        cases.append(case)
    return cases


def _nnunet_cases(path: str, root: str, meta: dict, n_channels: int) -> list[Case]:
    ending, labels_dir = str(meta["file_ending"]), os.path.join(root, "labelsTr")
    if not os.path.isdir(labels_dir):
        raise FileNotFoundError(f"{labels_dir}: no labelsTr folder (nnU-Net v2 layout)")
    ids = sorted(f[: -len(ending)] for f in os.listdir(labels_dir) if f.endswith(ending))
    if "numTraining" in meta and int(meta["numTraining"]) != len(ids):
        raise DatasetError(f"{path}: numTraining is {meta['numTraining']} but {labels_dir} holds {len(ids)} "
                           f"label file(s) ending in {ending!r}")  # fmt: skip
    images = lambda i: tuple(os.path.join(root, "imagesTr", f"{i}_{c:04d}{ending}") for c in range(n_channels))  # noqa: E731
    return [Case(i, images(i), os.path.join(labels_dir, i + ending)) for i in ids]


def _case_id(path: str) -> str:
    name = Path(path).name
    return name.split(".nii")[0].split(".")[0]


def dataset_json_field(root: str, key: str):
    """``${dataset_json:<root>,<key>}`` in configs: ``num_classes``, ``in_channels`` or ``class_names`` of a dataset."""
    spec = read_dataset(root)
    if key not in ("num_classes", "in_channels", "class_names"):
        raise KeyError(f"${{dataset_json:...,{key}}}: expected num_classes, in_channels or class_names")
    value = getattr(spec, key)
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------------- one case
def check_case(case: Case, spec: DatasetSpec) -> None:
    """Files present and readable with real voxels, images 3-D (or 4-D with one volume per channel), the label 3-D
    on its image's grid."""
    for path in (*case.images, case.label):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (case {case.case_id!r} of {spec.json_path}); expected the "
                                    "file it lists")  # fmt: skip
    label = _header(case.label, spec)
    if len(label.shape) != 3 or min(label.shape) < 1:
        raise DatasetError(f"{case.label}: label must be a 3-D volume with at least one voxel per axis, got shape "
                           f"{label.shape}")  # fmt: skip
    for path in case.images:
        image = _header(path, spec)
        shape = image.shape
        channels = shape[3] if len(shape) == 4 else 1
        expected = spec.in_channels if len(case.images) == 1 else 1
        if len(shape) not in (3, 4) or channels != expected or (len(shape) == 4 and expected == 1):
            want = f"3-D ({spec.in_channels} channel)" if expected == 1 else f"4-D with {expected} channels last"
            raise DatasetError(f"{path}: image must be {want} as {spec.json_path} declares, got shape {shape}")
        if tuple(shape[:3]) != tuple(label.shape):
            raise DatasetError(f"{case.label}: label shape {label.shape} differs from its image {path} {shape[:3]}")
        if not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE):
            raise DatasetError(f"{case.label}: label affine differs from its image {path}'s\n"
                               f"label:\n{label.affine}\nimage:\n{image.affine}")  # fmt: skip


def _header(path: str, spec: DatasetSpec) -> nib.Nifti1Image:
    """The image's header (voxels not read yet); a damaged or foreign file, or voxels that are not real numbers
    (complex, RGB), stop here naming the file."""
    image = load_nifti(path, f"a .nii or .nii.gz volume that {spec.json_path} lists", DatasetError)
    dtype = image.get_data_dtype()
    if dtype.fields is not None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise DatasetError(f"{path}: voxel type {dtype}; expected real values (an integer or float type), not "
                           "complex or RGB")  # fmt: skip
    return image


def _load(case: Case) -> dict:
    """Image and label read by MONAI, channel first, in RAS orientation. A file whose voxels cannot be read (a
    truncated .nii.gz) stops naming it: MONAI's own error names a transform, not the file."""
    data = {"image": case.images[0] if len(case.images) == 1 else list(case.images), "label": case.label}
    for key in ("image", "label"):
        try:
            data = LoadImaged(key, image_only=True)(data)
        except Exception as err:
            while err.__cause__ is not None:  # the reader's error (EOFError, zlib.error, ...) under MONAI's
                err = err.__cause__
            path = data[key] if isinstance(data[key], str) else ", ".join(data[key])
            raise read_failure(path, err, "a complete .nii or .nii.gz file", DatasetError) from None
    keys = ["image", "label"]
    return Compose([EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS", labels=RAS_LABELS)])(data)


def check_intensities(image: np.ndarray, case: Case) -> None:
    """Every channel finite and not constant (an empty image): percentile scaling would spread NaN over the whole
    volume, or divide by zero, without a word."""
    for c, channel in enumerate(image):
        where = case.images[c] if len(case.images) > 1 else case.images[0] + (f" channel {c}" if len(image) > 1 else "")
        if not np.isfinite(channel).all():
            raise DatasetError(f"{where}: the image holds NaN or infinite values; expected finite intensities")
        if channel.min() == channel.max():
            raise DatasetError(f"{where}: the image is constant ({float(channel.min()):g} everywhere), an empty "
                               "image; expected a scan")  # fmt: skip


def load_case(
    case: Case, spec: DatasetSpec, pixdim: tuple[float, float, float] | None, ct_window: tuple[float, float] | None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image float32 (C, X, Y, Z) in [0, 1], label uint8 (X, Y, Z), spacing (3,) mm)`` in RAS orientation.

    ``pixdim``: resample to this spacing (None keeps the native grid). Intensities: ``ct_window`` (low, high) maps
    linearly to [0, 1] with clipping; otherwise each channel's ``percentiles`` map to [0, 1], clipped.
    """
    check_case(case, spec)
    data = _load(case)
    check_intensities(np.asarray(data["image"]), case)
    steps = []
    if pixdim is not None:
        steps.append(Spacingd(["image", "label"], pixdim=pixdim, mode=("bilinear", "nearest")))
    if ct_window is not None:
        steps.append(ScaleIntensityRanged("image", ct_window[0], ct_window[1], 0.0, 1.0, clip=True))
    else:
        steps.append(ScaleIntensityRangePercentilesd("image", *percentiles, 0.0, 1.0, clip=True, channel_wise=True))
    out = Compose(steps)(data)
    label = np.asarray(out["label"][0])
    values = np.unique(label)
    if not np.allclose(values, np.round(values)) or values.min() < 0 or values.max() >= spec.num_classes:
        shown = values.astype(np.int64).tolist() if np.allclose(values, np.round(values)) else values.tolist()
        raise DatasetError(f"{case.label}: label values {shown} are not all declared in {spec.json_path} "
                           f"(0..{spec.num_classes - 1}: {list(spec.class_names)})")  # fmt: skip
    spacing = np.asarray(out["image"].pixdim, dtype=np.float32)[:3]
    return np.asarray(out["image"], dtype=np.float32), label.round().astype(np.uint8), spacing
