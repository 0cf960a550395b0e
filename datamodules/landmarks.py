"""Landmark detection: one LightningDataModule, three sources.

* ``source="phantom"`` (default): anatomical fiducials (AFIDs) on deformed MNI152 brains
  (:mod:`medrobust.data.afids_phantom`): 2-D mid-sagittal slices with the 10 midline fiducials, or 3-D volumes
  with all 32; generated once per setting and cached under ``root``;
* ``source="isbi2015"``: the ISBI 2015 cephalometric challenge under ``root`` (``RawImage/<folder>/NNN.bmp``,
  ``AnnotationsByMD/400_senior|400_junior/NNN.txt``); the ground truth is the mean of the two doctors and their own
  disagreement (``observer_mre_mm``, per split) is the human baseline; splits by folder (``folders``);
* ``source="fcsv"``: NIfTI volumes with one 3D Slicer markups file each, listed in a table (``csv``: columns
  ``image``, ``markups``, optional ``split`` and ``subject``; :mod:`medrobust.data.landmark_formats`).

Splits are by subject (phantom, fcsv: a seeded permutation cut by ``split`` unless the table names splits).
Batches are dicts::

    {"image": float32 (B, 1, *spatial) in [0, 1] (phantom: axes (Y, Z) 2-D / (X, Y, Z) 3-D in RAS order;
              isbi2015: (row, column); fcsv: (X, Y, Z) RAS),
     "landmarks": float32 (B, K, D) voxel coordinates in the order of the image axes, pixel centres at integers,
     "spacing": float32 (B, D) voxel size in mm (an error in voxels times it is in mm of the original image),
     "id": list[str] stable per sample, "subject_id": list[str]}

No training augmentation: the phantom's subjects already differ by a random deformation, a flip would also swap
left / right fiducial names, and anything but flips would interpolate the image away from its exact landmarks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from medrobust.data import afids_phantom as afids
from medrobust.data import landmark_formats as formats
from medrobust.data.brain_phantom import NATIVE_WINDOW
from medrobust.data.intensity import IntensityWindow
from medrobust.data.patches import file_fingerprint, settings_key, stable_seed
from medrobust.datamodules.base import SPLITS, SplitDataModule, check_choice, check_floats, check_int, check_split
from medrobust.datamodules.base import check_split_counts, default_cache_dir, image_item

log = logging.getLogger("medrobust")

SOURCES = ("phantom", "isbi2015", "fcsv")
SOURCE_DIMS = {"isbi2015": 2, "fcsv": 3}
VERSION = 1  # bump when any source's preprocessing changes, so old caches miss
DEFAULT_BATCH_SIZE = {2: 16, 3: 4}
ISBI_SPLITS = {"train": "TrainingData", "val": "Test1Data", "test": "Test2Data"}  # the challenge's own
ISBI_WINDOW = IntensityWindow(0.0, 255.0, unit="grey level")
SCALED = IntensityWindow(0.0, 1.0, unit="percentile-scaled")  # fcsv volumes are cached already in [0, 1]


class LandmarkDataset(Dataset):
    """Samples of one split: ``images`` ``(N, *spatial)`` stored values mapped to [0, 1] by ``decode``;
    ``landmarks`` ``(N, K, D)`` voxels; ``spacing`` ``(N, D)`` mm; ``ids`` / ``subject_ids``."""

    def __init__(self, images: np.ndarray, landmarks: np.ndarray, spacing: np.ndarray, ids: Sequence[str],
                 subject_ids: Sequence[str], decode: IntensityWindow):  # fmt: skip
        self.images, self.decode = images, decode
        self.landmarks = torch.as_tensor(np.asarray(landmarks), dtype=torch.float32)
        self.spacing = torch.as_tensor(np.asarray(spacing), dtype=torch.float32)
        self.ids, self.subject_ids = [str(i) for i in ids], [str(s) for s in subject_ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"image": image_item(self.images[i], self.decode), "landmarks": self.landmarks[i],
                "spacing": self.spacing[i], "id": self.ids[i], "subject_id": self.subject_ids[i]}  # fmt: skip


def split_by_subject(subject_ids: Sequence[str], fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per sample: subjects permuted by ``seed`` and cut by ``fractions``
    (rounded down, at least one where asked for; train takes the rest); a subject's samples share a split."""
    subjects, inverse = np.unique(np.asarray(subject_ids, dtype=str), return_inverse=True)
    order = np.random.default_rng(stable_seed("landmark-split", seed)).permutation(len(subjects))
    counts = np.floor(np.asarray(fractions) * len(subjects)).astype(int)
    counts[0] = len(subjects) - counts[1:].sum()
    for k in (1, 2):  # a split asked for gets at least one subject, taken from train
        if fractions[k] > 0 and counts[k] == 0:
            counts[k], counts[0] = 1, counts[0] - 1
    per_subject = np.empty(len(subjects), dtype=int)
    for k, chunk in enumerate(np.split(order, np.cumsum(counts)[:-1])):
        per_subject[chunk] = k
    return per_subject[inverse]


class LandmarkDataModule(SplitDataModule):
    """Landmark detection data (module docstring).

    Args:
        source: ``"phantom"`` (AFIDs, default), ``"isbi2015"`` or ``"fcsv"``.
        root: phantom: cache folder (default ``data_cache/afids``); isbi2015: the challenge folder; fcsv: where the
            table's relative paths are looked up first (then next to the table).
        cache_dir: where real sources are cached; default ``$XDG_CACHE_HOME/medrobust/landmarks``.
        csv: fcsv: the subjects table.
        spatial_dims: phantom: 2 (mid-sagittal slices, 10 midline fiducials) or 3 (volumes, 32); null: 2 for the
            phantom and isbi2015, 3 for fcsv (the only values those take).
        image_size: voxels per side (an int) or per axis (a list); null: phantom 64 (2-D) / 40 (3-D), isbi2015
            [128, 104] (rows, columns), fcsv 64.
        spacing_mm: phantom: voxel size; null: 2.5 (2-D), 3.6 (3-D).
        num_subjects: phantom: subjects to draw (one sample each).
        elastic_mm: phantom: strength of the elastic part of each subject's deformation (<= 3: no folding).
        folders: isbi2015: the ``RawImage`` folder(s) of each split.
        landmark_names: fcsv: the labels every markups file must hold, in this order; null: the first file's.
        intensity_percentiles: fcsv: each volume's percentiles mapped to 0 and 1.
        split: phantom / fcsv: train / val / test fractions of subjects (fcsv: unless the table has ``split``).
        seed: phantom drawing and splits. batch_size: null: 16 (2-D), 4 (3-D). num_workers: of the dataloaders.

    ``landmark_names`` / ``num_landmarks`` / ``spatial_dims`` / ``image_shape`` are known after construction;
    ``observer_mre_mm`` (isbi2015: the doctors' disagreement per split, mm) after :meth:`setup`.
    """

    augment = False  # no augmentation: see the module docstring

    def __init__(self, source: str = "phantom", root: str | None = None, cache_dir: str | None = None,
                 csv: str | None = None, spatial_dims: int | None = None, image_size: int | Sequence[int] | None = None,
                 spacing_mm: float | None = None, num_subjects: int = 120, elastic_mm: float = 2.0,
                 folders: dict | None = None, landmark_names: Sequence[str] | None = None,
                 intensity_percentiles: Sequence[float] = (0.5, 99.5), split: Sequence[float] = (0.7, 0.15, 0.15),
                 seed: int = 0, batch_size: int | None = None, num_workers: int = 0):  # fmt: skip
        super().__init__()
        check_choice("source", source, SOURCES)
        dims = SOURCE_DIMS.get(source, 2) if spatial_dims is None else spatial_dims
        if dims not in ((2, 3) if source == "phantom" else (SOURCE_DIMS.get(source),)) or isinstance(dims, bool):
            raise ValueError(f"data.spatial_dims={spatial_dims!r} does not fit data.source={source!r} "
                             f"(phantom: 2 or 3; isbi2015: 2; fcsv: 3)")  # fmt: skip
        default_size = {"phantom": afids.DEFAULT_IMAGE_SIZE[dims], "isbi2015": (128, 104), "fcsv": 64}[source]
        size = default_size if image_size is None else image_size
        size = (size,) * dims if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
        values = check_floats("image_size", size, dims)
        if any(v != int(v) or v < 8 for v in values):
            raise ValueError(f"data.image_size must be integers >= 8 (one or {dims}), got {image_size!r}")
        self.image_shape = tuple(int(v) for v in values)
        if source == "phantom" and len(set(self.image_shape)) != 1:
            raise ValueError(f"data.image_size: the phantom's images are square / cubic, got {list(self.image_shape)}")
        spacing = afids.DEFAULT_SPACING_MM[dims] if spacing_mm is None else spacing_mm
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not 0.5 <= spacing <= 10:
            raise ValueError(f"data.spacing_mm must be null or a number in [0.5, 10] mm, got {spacing_mm!r}")
        if isinstance(elastic_mm, bool) or not isinstance(elastic_mm, (int, float)) or not 0 <= elastic_mm <= 3:
            raise ValueError(f"data.elastic_mm must be a number in [0, 3] mm (beyond, the field may fold), "
                             f"got {elastic_mm!r}")  # fmt: skip
        batch_size = DEFAULT_BATCH_SIZE[dims] if batch_size is None else batch_size
        for key, value, minimum in (("num_subjects", num_subjects, 3), ("batch_size", batch_size, 1),
                                    ("num_workers", num_workers, 0), ("seed", seed, 0)):  # fmt: skip
            check_int(key, value, minimum)
        self.percentiles = check_floats("intensity_percentiles", intensity_percentiles, 2)
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"data.intensity_percentiles must be (low, high) with 0 <= low < high <= 100, "
                             f"got {list(intensity_percentiles)}")  # fmt: skip
        self.split = check_split(split)
        self.save_hyperparameters(logger=False)

        self.source, self.spatial_dims, self.spacing_mm, self.elastic_mm = source, int(dims), float(spacing), elastic_mm
        self.num_subjects, self.seed = int(num_subjects), int(seed)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.root = str(root) if root is not None else os.path.join("data_cache", "afids")
        self.cache_dir = str(cache_dir) if cache_dir is not None else default_cache_dir(source, self.root, "landmarks")
        self.input_bounds, self.in_channels = (0.0, 1.0), 1
        self.folders = {k: [v] if isinstance(v, str) else list(v) for k, v in (folders or ISBI_SPLITS).items()}
        if source == "isbi2015" and (root is None or not os.path.isdir(root)):
            raise FileNotFoundError(f"data.root: {root!r} does not exist or is not a folder (the ISBI 2015 data)")
        self.table = None
        if source == "phantom":
            self.intensity = NATIVE_WINDOW
            self.landmark_names = list(afids.load_fiducials(midline_only=dims == 2).names)
        elif source == "isbi2015":
            listed = [f for v in self.folders.values() for f in v]
            if set(self.folders) != set(SPLITS) or len(set(listed)) != len(listed):
                raise ValueError(f"data.folders must map train, val and test each to its own RawImage folder(s), "
                                 f"got {folders!r}")  # fmt: skip
            self.intensity, self.landmark_names = ISBI_WINDOW, list(formats.ISBI_NAMES)
        else:
            if csv is None:
                raise ValueError("data.csv: source=fcsv needs the subjects table (columns image, markups[, split])")
            self.table = formats.read_markups_table(csv, root)
            self.landmark_names = list(landmark_names or formats.read_fcsv(self.table[0]["markups"])[0])
            self.intensity = None  # each volume scaled by its own percentiles: no common native scale
        self.num_landmarks = len(self.landmark_names)
        self.observer_mre_mm: dict[str, float] = {}
        self.split_counts: dict[str, int] = {}

    def summary_notes(self, split: str) -> list[str]:
        if split not in self.observer_mre_mm:
            return []
        return [f"Doctors' disagreement on the {split} split (MRE between the two ISBI 2015 annotators, the human "
                f"baseline): {self.observer_mre_mm[split]:.2f} mm"]

    # ------------------------------------------------------------------------------------ caching
    def _settings(self) -> dict:
        """Everything the cached samples depend on."""
        common = dict(kind=f"landmarks_{self.source}", version=VERSION, image_shape=self.image_shape)
        if self.source == "phantom":
            return dict(common, seed=self.seed, spatial_dims=self.spatial_dims, spacing_mm=self.spacing_mm,
                        num_subjects=self.num_subjects, elastic_mm=self.elastic_mm)  # fmt: skip
        if self.source == "isbi2015":
            folders = sorted({f for v in self.folders.values() for f in v})
            files = sorted(p for f in folders for p in (Path(self.root) / "RawImage" / f).glob("*"))
            files += sorted((Path(self.root) / "AnnotationsByMD").glob("*/*.txt"))
            return dict(common, folders=folders, files=[file_fingerprint(p) for p in files])
        files = [file_fingerprint(r[k]) for r in self.table for k in ("image", "markups") if os.path.isfile(r[k])]
        return dict(common, names=self.landmark_names, percentiles=self.percentiles, files=files,
                    rows=[(r["image"], r["markups"]) for r in self.table])  # fmt: skip

    def cache_path(self) -> Path:
        return Path(self.cache_dir) / f"landmarks_{self.source}_{settings_key(self._settings())}.npz"

    def _build(self) -> dict[str, np.ndarray]:
        """Draw or read every sample (progress bar) and write the cache: ``images`` ``(N, *spatial)``,
        ``landmarks`` ``(N, K, D)``, ``spacing`` ``(N, D)``, ``ids``, ``subject_ids`` (and source extras)."""
        if self.source == "phantom":
            ids = [f"sub-{i:05d}" for i in range(self.num_subjects)]
            drawn = afids.generate_afids(ids, self.seed, self.spatial_dims, self.image_shape[0], self.spacing_mm,
                                   self.elastic_mm)  # fmt: skip
            arrays = {"images": drawn["images"], "landmarks": drawn["landmarks"], "ids": np.asarray(ids),
                      "subject_ids": np.asarray(ids),
                      "spacing": np.full((len(ids), self.spatial_dims), self.spacing_mm)}  # fmt: skip
        elif self.source == "isbi2015":
            folders = sorted({f for v in self.folders.values() for f in v})
            arrays = formats.read_isbi(self.root, folders, self.image_shape)
            arrays["subject_ids"] = arrays["ids"]  # one radiograph per patient
        else:
            arrays = self._read_fcsv()
        return self._write_cache(arrays, n_samples=len(arrays["ids"]))

    def _read_fcsv(self) -> dict[str, np.ndarray]:
        read = formats.nifti_landmarks
        samples = [read(r["image"], r["markups"], self.landmark_names, self.image_shape, self.percentiles)
                   for r in tqdm(self.table, desc="fcsv landmarks", unit="volume")]  # fmt: skip
        ids = [Path(r["image"]).name.removesuffix(".gz").removesuffix(".nii") for r in self.table]
        if len(set(ids)) != len(ids):  # images of the same name in different folders
            ids = [f"{i}-{n:04d}" for n, i in enumerate(ids)]
        return {"images": np.stack([s[0] for s in samples]), "landmarks": np.stack([s[1] for s in samples]),
                "spacing": np.stack([s[2] for s in samples]), "ids": np.asarray(ids),
                "subject_ids": np.asarray([r["subject"] or i for r, i in zip(self.table, ids)])}  # fmt: skip

    # ------------------------------------------------------------------------------------ setup
    def _assign(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        if self.source == "isbi2015":  # by folder
            of_folder = {f: k for k, name in enumerate(SPLITS) for f in self.folders[name]}
            assign = np.array([of_folder[f] for f in arrays["folders"].astype(str)])
            self.observer_mre_mm = {name: float(arrays["observer_mre_mm"][assign == k].mean())
                                    for k, name in enumerate(SPLITS) if (assign == k).any()}  # fmt: skip
        elif self.source == "fcsv" and any(r["split"] for r in self.table):  # every row filled: read_markups_table
            assign = np.array([SPLITS.index(r["split"]) for r in self.table])
        else:
            assign = split_by_subject(arrays["subject_ids"], self.split, self.seed)
        counts = {name: len(np.unique(arrays["subject_ids"][assign == k])) for k, name in enumerate(SPLITS)}
        self.split_counts = counts
        if self.source != "isbi2015" and not (self.source == "fcsv" and self.table[0]["split"]):  # fractions
            check_split_counts(counts, self.split, "subjects", "raise data.num_subjects or list more subjects")
        return assign

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        decode = {"phantom": self.intensity, "isbi2015": ISBI_WINDOW, "fcsv": SCALED}[self.source]
        return LandmarkDataset(arrays["images"][idx], arrays["landmarks"][idx], arrays["spacing"][idx],
                               arrays["ids"][idx], arrays["subject_ids"][idx], decode)  # fmt: skip

    def _log_setup(self) -> None:
        sets = {name: len(s) for name, s in zip(SPLITS, (self.data_train, self.data_val, self.data_test))}
        log.info("landmarks %s %d-D %s, %d landmarks: subjects %s, samples %s%s", self.source, self.spatial_dims,
                 list(self.image_shape), self.num_landmarks, self.split_counts, sets,
                 f"; doctors' MRE (mm) {self.observer_mre_mm}" if self.observer_mre_mm else "")  # fmt: skip
