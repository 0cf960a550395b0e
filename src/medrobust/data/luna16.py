"""The real LUNA16 release as detection samples in the layout of the LUNA phantom's cache.

What LUNA16 ships (https://luna16.grand-challenge.org/Data/) and what is done with each file:

* ``subset0/`` .. ``subset9/``: the 888 scans as MetaImage (``<seriesuid>.mhd`` + ``.raw``, or ``.zraw``; int16
  HU), read by :mod:`medrobust.data.metaimage`. The ten subsets are LUNA16's cross-validation folds, so they are
  the split here (``folds``: which subsets train, validate and test).
* ``annotations.csv`` (required; ``seriesuid,coordX,coordY,coordZ,diameter_mm`` in world mm): the targets.
* ``annotations_excluded.csv`` (optional; same columns; shipped inside the evaluation script): the findings the
  evaluation ignores -- non-nodules, nodules < 3 mm, nodules of fewer than 3 readers -- boxed as *irrelevant*
  (``box_target`` False: a detection there is neither a hit nor a false positive). A negative diameter there marks
  an unsized finding, which the evaluation script gives 10 mm (:data:`UNSIZED_DIAMETER_MM`); so does this module.
  Without the file every detection off a target counts as a false positive (logged).
* ``candidates.csv`` (optional; ``seriesuid,coordX,coordY,coordZ,class``): the false-positive-reduction track's
  candidate list. A detector does not train on it, so it adds no sample; when present it is checked (columns,
  numbers, class 0 or 1) and its counts logged, because a broken CSV beside the scans usually means a broken
  download. It is not part of the cache key.

The CSVs are looked for in the root, then ``CSVFILES/`` and ``evaluationScript/annotations/`` (where the
download's archives put them).

Samples follow :mod:`medrobust.data.luna_samples` as the phantom's do: 2-D, the axial slice through each target's
centre (the native slice holding it) with the whole field of view averaged down to ``size x size``; 3-D, a cube of
``size`` voxels with that slice at output slice ``size // 2`` (isotropic voxels, or ``depth_mm`` deep), the slices
beyond the scan repeating its end slices -- over the whole field of view, or (``field_mm``) a window of that many mm
around each target, jittered, as the phantom's; negatives, slices more than a margin from every finding (3-D
windows: centred on a seeded point of the slice's lung, :func:`enclosed_dark_points`). Each finding is
the sphere of its diameter around its centre: boxed in 2-D as the circle the slice's centre plane cuts from it, in
3-D as its cube, in whole output pixels (every pixel the circle or cube touches, as the phantom boxes every pixel
a finding touches).

World -> voxel goes through each volume's origin, spacing and direction (:func:`world_to_cell`); LUNA16's
directions are the identity in practice, but a flipped or rotated orthonormal one is handled. A patient is a
series (``patient_id = seriesuid``): LUNA16 keeps one scan per patient in practice, and its folds are by scan.
Volumes are read one at a time (a scan is ~150 MB; raw data is memory-mapped, so a 2-D run reads only the slices
it samples).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medrobust.data.chest_phantom import _overlap_weights
from medrobust.data.luna_samples import Sample, SampleSpec, draw_negatives, finding_free_slices, pack_samples
from medrobust.data.luna_samples import pick_point, pick_scans, window_extent_mm, window_spec
from medrobust.data.metaimage import MetaImageHeader, read_metaimage_header, read_metaimage_voxels
from medrobust.data.patches import file_fingerprint

log = logging.getLogger("medrobust")

LUNA16_VERSION = 2  # bump when the samples or the cache layout change, so old caches miss
SUBSETS = tuple(range(10))
SPLITS = ("train", "val", "test")
DEFAULT_FOLDS = {"train": [0, 1, 2, 3, 4, 5, 6, 7], "val": [8], "test": [9]}
FINDING_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
CSV_FOLDERS = (".", "CSVFILES", os.path.join("evaluationScript", "annotations"))
UNSIZED_DIAMETER_MM = 10.0  # noduleCADEvaluationLUNA16.py: "if diameter < 0.0: diameter = 10.0"
CHUNK_SLICES = 32  # slices converted to float at a time when resampling (bounds the memory of a 3-D cube)


# --------------------------------------------------------------------------------- folds
def check_folds(folds) -> dict[str, tuple[int, ...]]:
    """``data.folds``: subsets (integers 0-9) per split, each subset in at most one split, train not empty."""
    if not isinstance(folds, Mapping) or not set(folds) <= set(SPLITS):
        raise ValueError(f"data.folds must map train / val / test to lists of LUNA16 subsets (0-9), e.g. "
                         f"{DEFAULT_FOLDS}, got {folds!r}")  # fmt: skip
    out, seen = {}, {}
    for name in SPLITS:
        values = folds.get(name) or []
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"data.folds.{name} must be a list of subsets (0-9), got {values!r}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v not in SUBSETS:
                raise ValueError(f"data.folds.{name}: a LUNA16 subset is an integer from 0 to 9, got {v!r}")
            if int(v) in seen:
                raise ValueError(f"data.folds: subset {v} is in {seen[int(v)]} and {name}; each subset may be in "
                                 f"one split only")  # fmt: skip
            seen[int(v)] = name
        out[name] = tuple(sorted(int(v) for v in values))
    if not out["train"]:
        raise ValueError(f"data.folds.train must name at least one subset, got {folds!r}")
    return out


def read_subsets(folds: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The subsets the folds use: the only ones read."""
    return tuple(sorted(s for subsets in folds.values() for s in subsets))


def assign_folds(sample_subsets: np.ndarray, folds: dict[str, tuple[int, ...]], root: str) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per sample from its subset; a split given subsets but no sample stops
    here, before any training."""
    assign = np.full(len(sample_subsets), -1)
    for k, name in enumerate(SPLITS):
        assign[np.isin(sample_subsets, folds[name])] = k
    empty = [n for n in SPLITS if folds[n] and not (assign == SPLITS.index(n)).any()]
    if (assign < 0).any() or empty:
        raise ValueError(f"data.folds {folds}: the {' and '.join(empty) or 'unassigned'} split(s) hold no sample "
                         f"from the LUNA16 scans under data.root {root!r} (samples per subset "
                         f"{dict(sorted(Counter(sample_subsets.tolist()).items()))})")  # fmt: skip
    return assign


# --------------------------------------------------------------------------------- the CSVs
@dataclass(frozen=True)
class Annotation:
    """One CSV row: a finding's centre (world x, y, z mm), diameter, whether it is a target, and where it is written
    (``"<csv>, line <n>"``, for messages)."""

    series_uid: str
    xyz_mm: tuple[float, float, float]
    diameter_mm: float
    is_target: bool
    where: str


def find_csv(root: Path, name: str, required: bool) -> Path | None:
    """``name`` in the first of :data:`CSV_FOLDERS` under ``root`` that has it."""
    for folder in CSV_FOLDERS:
        if (root / folder / name).is_file():
            return (root / folder / name).resolve()
    if required:
        raise FileNotFoundError(f"data.root {str(root)!r}: no {name} (looked in "
                                f"{', '.join(str(root / f) for f in CSV_FOLDERS)}); expected the LUNA16 folder")
    return None


def _csv_rows(path: Path, columns: Sequence[str]):
    """``(line number, {column: text})`` per non-empty row; a missing column or a short row names file and line."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [c.strip() for c in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}, line 1: missing column {missing[0]!r} (expected columns {list(columns)}, "
                             f"got {header})")  # fmt: skip
        at = {c: header.index(c) for c in columns}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise ValueError(f"{path}, line {reader.line_num}: {len(row)} values where the header has "
                                 f"{len(header)} columns")  # fmt: skip
            yield reader.line_num, {c: row[i].strip() for c, i in at.items()}


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{path}, line {line}, column {column}: expected a number, got {text!r}")
    return value


def read_annotations(path: Path, is_target: bool) -> list[Annotation]:
    """The findings of ``annotations.csv`` (``is_target``) or ``annotations_excluded.csv``."""
    out = []
    for line, row in _csv_rows(path, FINDING_COLUMNS):
        if not row["seriesuid"]:
            raise ValueError(f"{path}, line {line}, column seriesuid: empty")
        xyz = tuple(_number(path, line, c, row[c]) for c in ("coordX", "coordY", "coordZ"))
        diameter = _number(path, line, "diameter_mm", row["diameter_mm"])
        if diameter < 0 and not is_target:
            diameter = UNSIZED_DIAMETER_MM  # an unsized irrelevant finding, as LUNA16's evaluation sizes it
        elif diameter <= 0:
            raise ValueError(f"{path}, line {line}, column diameter_mm: expected a positive diameter (mm), got "
                             f"{row['diameter_mm']!r}")  # fmt: skip
        out.append(Annotation(row["seriesuid"], xyz, diameter, is_target, f"{path}, line {line}"))
    return out


def check_candidates(path: Path) -> dict[int, int]:
    """Check ``candidates.csv`` row by row (it adds no sample, see the module docstring); its count per class."""
    counts: Counter = Counter()
    for line, row in _csv_rows(path, CANDIDATE_COLUMNS):
        for c in ("coordX", "coordY", "coordZ"):
            _number(path, line, c, row[c])
        if row["class"] not in ("0", "1"):
            raise ValueError(f"{path}, line {line}, column class: expected 0 or 1, got {row['class']!r}")
        counts[int(row["class"])] += 1
    return dict(counts)


# --------------------------------------------------------------------------------- the scans
def subset_folder(root: Path, subset: int) -> Path:
    return root / f"subset{subset}"


def index_subsets(root: Path, subsets: Sequence[int]) -> dict[str, tuple[int, Path]]:
    """``seriesuid -> (subset, header path)`` of every ``.mhd`` / ``.mha`` in the subsets' folders; a missing or
    empty folder, or a series in two places, is an error (a partial download or extraction)."""
    index: dict[str, tuple[int, Path]] = {}
    for subset in subsets:
        folder = subset_folder(root, subset)
        if not folder.is_dir():
            raise FileNotFoundError(f"data.folds names subset {subset}, but {folder} is not a folder; expected the "
                                    f"LUNA16 layout data.root/subset0..subset9 (list only the subsets you have in "
                                    f"data.folds)")  # fmt: skip
        headers = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".mhd", ".mha"))
        if not headers:
            raise FileNotFoundError(f"{folder}: no .mhd volume (is subset{subset}.zip extracted there?)")
        for path in headers:
            if path.stem in index:
                raise ValueError(f"seriesuid {path.stem} has two volumes: {index[path.stem][1]} and {path}")
            index[path.stem] = (subset, path)
    return index


def world_to_cell(header: MetaImageHeader, xyz_mm: Sequence[float]) -> np.ndarray:
    """Continuous ``(slice, row, col)`` cell coordinates of a world point: voxel ``k`` covers ``[k, k + 1)`` (the
    boxes' half-open pixel convention), so a voxel centre (ITK's index ``k``) is at ``k + 0.5``."""
    index_xyz = np.linalg.solve(header.direction, np.asarray(xyz_mm, dtype=np.float64) - header.origin)
    return index_xyz[::-1] / header.spacing + 0.5


@dataclass(frozen=True)
class Finding:
    """A finding on its volume's grid: ``centre`` in cell coordinates ``(slice, row, col)``, radius in mm."""

    id: str
    is_target: bool
    centre: np.ndarray
    radius_mm: float

    def slices(self, slice_mm: float) -> tuple[int, int]:
        """First and last native slice (inclusive) the finding's sphere reaches."""
        reach = self.radius_mm / slice_mm
        return math.floor(self.centre[0] - reach), math.ceil(self.centre[0] + reach) - 1


@dataclass(frozen=True)
class Series:
    """A scan to sample: its uid (also its patient), subset, header and findings (targets first, in CSV order)."""

    uid: str
    subset: int
    scan_id: int
    header: MetaImageHeader
    findings: tuple[Finding, ...]

    @property
    def patient_id(self) -> str:
        return self.uid

    def target_slices(self) -> list[SampleSpec]:
        """One sample per distinct slice holding a target's centre (the first target names it)."""
        specs: dict[int, SampleSpec] = {}
        for f in self.findings:
            k = min(max(math.floor(f.centre[0]), 0), self.header.shape[0] - 1)
            if f.is_target and k not in specs:
                specs[k] = SampleSpec(self, k, f"{f.id}/z{k}", positive=True)
        return list(specs.values())

    def target_windows(self, extent_mm: Sequence[float], seed: int) -> list[SampleSpec]:
        """One 3-D window per target around its jittered centre (:func:`~medrobust.data.luna_samples.jittered_centre`)."""
        return [window_spec(self, f.id, f.centre, self.header.spacing, self.header.shape[0], extent_mm, seed)
                for f in self.findings if f.is_target]  # fmt: skip

    def free_slices(self, margin_mm: float) -> np.ndarray:
        slice_mm = float(self.header.spacing[0])
        extents = [f.slices(slice_mm) for f in self.findings]
        return finding_free_slices(self.header.shape[0], extents, math.floor(margin_mm / slice_mm))


def _series_findings(uid: str, header: MetaImageHeader, annotations: Sequence[Annotation]) -> tuple[Finding, ...]:
    """The series' findings on its grid, ids ``<uid>:n<k>`` (targets) and ``<uid>:x<k>`` (irrelevant). A target's
    centre outside the volume means the CSV and the scan disagree (or the geometry was misread): an error. An
    irrelevant finding there cannot show in any sample, so it is left out, with a warning naming its row."""
    out, count = [], Counter()
    for a in sorted(annotations, key=lambda a: not a.is_target):  # stable: CSV order within each kind
        centre = world_to_cell(header, a.xyz_mm)
        if ((centre < 0) | (centre >= header.shape)).any():
            where = (f"{a.where}: the centre {list(a.xyz_mm)} mm of a finding of seriesuid {uid} lies outside its "
                     f"volume {header.path} (voxel (slice, row, col) {np.round(centre - 0.5, 1).tolist()} of shape "
                     f"{list(header.shape)})")  # fmt: skip
            if a.is_target:
                raise ValueError(where)
            log.warning("%s: an irrelevant finding, left out", where)
            continue
        kind = "n" if a.is_target else "x"
        out.append(Finding(f"{uid}:{kind}{count[kind]:02d}", a.is_target, centre, a.diameter_mm / 2))
        count[kind] += 1
    return tuple(out)


@dataclass(frozen=True)
class Luna16Scans:
    """The series to sample and what was left out: annotations of series outside the subsets read, and the
    candidates' counts per class (None: no candidates.csv)."""

    series: tuple[Series, ...]
    ignored_annotations: int
    ignored_series: int
    candidates: dict[int, int] | None


def _read_csvs(root: Path) -> tuple[list[Annotation], dict[int, int] | None]:
    annotations = read_annotations(find_csv(root, "annotations.csv", required=True), is_target=True)
    excluded = find_csv(root, "annotations_excluded.csv", required=False)
    if excluded is None:
        log.warning("LUNA16: no annotations_excluded.csv under %s: no irrelevant findings, so every detection off a "
                    "target counts as a false positive", root)  # fmt: skip
    else:
        annotations += read_annotations(excluded, is_target=False)
    candidates = find_csv(root, "candidates.csv", required=False)
    return annotations, (check_candidates(candidates) if candidates is not None else None)


def _check_missing(missing: dict[str, list[Annotation]], subsets: Sequence[int]) -> None:
    """Annotations without a volume: an error when all ten subsets are read, else left out (and counted)."""
    if not missing:
        return
    uid, rows = next(iter(missing.items()))
    if tuple(subsets) == SUBSETS:
        raise FileNotFoundError(f"{rows[0].where}: seriesuid {uid} has no volume in any subset (no {uid}.mhd under "
                                f"subset0..subset9)")  # fmt: skip
    log.warning("LUNA16: %d annotations of %d series lie outside the subsets read (%s, from data.folds): left out",
                sum(map(len, missing.values())), len(missing), list(subsets))  # fmt: skip


def read_luna16(root: str | os.PathLike, subsets: Sequence[int], max_scans: int | None = None) -> Luna16Scans:
    """The series of ``subsets`` (at most ``max_scans`` of each, those with a target first) with their findings,
    from the CSVs and the volumes' headers alone (no voxel is read)."""
    root = Path(root)
    annotations, candidates = _read_csvs(root)
    index = index_subsets(root, subsets)
    by_uid: dict[str, list[Annotation]] = defaultdict(list)
    for a in annotations:
        by_uid[a.series_uid].append(a)
    missing = {uid: rows for uid, rows in by_uid.items() if uid not in index}
    _check_missing(missing, subsets)
    has_target = lambda uid: any(a.is_target for a in by_uid.get(uid, ()))  # noqa: E731
    chosen = sorted(uid for s in subsets for uid in pick_scans(
        sorted(u for u, (sub, _) in index.items() if sub == s), max_scans, key=str, has_target=has_target))
    series = []
    for scan_id, uid in enumerate(chosen):
        header = read_metaimage_header(index[uid][1])
        if len(header.shape) != 3:
            raise ValueError(f"{header.path}: NDims: expected a 3-D CT volume, got {len(header.shape)} dimensions")
        series.append(Series(uid, index[uid][0], scan_id, header, _series_findings(uid, header, by_uid.get(uid, []))))
    return Luna16Scans(tuple(series), sum(map(len, missing.values())), len(missing), candidates)


def luna16_fingerprint(root: str | os.PathLike, subsets: Sequence[int]) -> dict:
    """What the cache of a LUNA16 folder depends on: its resolved path, the CSVs and every file of the subsets read
    (name, size, mtime: cheap, no voxel read), so a changed download misses the cache."""
    root = Path(root).resolve()
    listing = hashlib.sha256()
    for subset in subsets:
        folder = subset_folder(root, subset)
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            st = path.stat()
            listing.update(f"{subset}/{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    csvs = {name: (file_fingerprint(p) if (p := find_csv(root, name, required=False)) else None)
            for name in ("annotations.csv", "annotations_excluded.csv")}  # fmt: skip
    return {"root": str(root), "subsets": list(subsets), "csv": csvs, "volumes": listing.hexdigest()}


# --------------------------------------------------------------------------------- one sample
@dataclass(frozen=True)
class Grid:
    """An output grid in the native cell coordinates ``(slice, row, col)`` of its volume: output cell ``i`` of axis
    ``a`` covers native ``[start[a] + i step[a], start[a] + (i + 1) step[a])``."""

    start: np.ndarray
    step: np.ndarray
    shape: tuple[int, int, int]
    spacing_mm: np.ndarray  # output mm per cell (slice, row, col)


def sample_grid(header: MetaImageHeader, slice_index: int, spatial_dims: int, size: int, depth_mm: float | None,
                field_mm: float | None = None, centre_rc: Sequence[float] | None = None) -> Grid:
    """The whole field of view at ``size x size`` -- or (``field_mm``) ``field_mm`` x ``field_mm`` centred on native
    ``centre_rc`` (row, col cells); in 2-D on native slice ``slice_index``, in 3-D ``size`` slices with output slice
    ``size // 2`` centred on it (``depth_mm / size`` apart, default the in-plane spacing)."""
    n_rows, n_cols = header.shape[1:]
    if field_mm is None:
        step_rc, start_rc = np.array([n_rows / size, n_cols / size]), np.zeros(2)
    else:
        step_rc = field_mm / size / np.asarray(header.spacing[1:], dtype=np.float64)
        centre = np.array([n_rows / 2, n_cols / 2]) if centre_rc is None else np.asarray(centre_rc, dtype=np.float64)
        start_rc = centre - size * step_rc / 2
    spacing_rc = step_rc * header.spacing[1:]
    if spatial_dims == 2:
        start_z, step_z, depth = float(slice_index), 1.0, 1
    else:
        dz_mm = depth_mm / size if depth_mm is not None else float(spacing_rc.mean())
        step_z, depth = dz_mm / header.spacing[0], size
        start_z = slice_index + 0.5 - (size // 2 + 0.5) * step_z
    step = np.array([step_z, *step_rc])
    return Grid(np.array([start_z, *start_rc]), step, (depth, size, size), step * header.spacing)


def _axis_weights(start: float, step: float, n_out: int, n_native: int) -> np.ndarray:
    """``(n_out, n_native)`` fraction of each output cell covered by each native cell; the end cells stretch
    beyond the volume, so cells past it repeat the edge (the body continues past a scan's first and last slice)."""
    out_edges = start + np.arange(n_out + 1) * step
    native_edges = np.arange(n_native + 1, dtype=np.float64)
    native_edges[0], native_edges[-1] = min(0.0, out_edges[0]), max(float(n_native), out_edges[-1])
    return _overlap_weights(out_edges, native_edges)


def resample(volume: np.ndarray, grid: Grid) -> np.ndarray:
    """``volume`` (int16 HU, may be memory-mapped) averaged onto ``grid``: float32 of ``grid.shape``. In-plane first,
    :data:`CHUNK_SLICES` native slices at a time, and only the slices the grid uses."""
    wz, wr, wc = (_axis_weights(s, t, n, m).astype(np.float32)
                  for s, t, n, m in zip(grid.start, grid.step, grid.shape, volume.shape))  # fmt: skip
    used = np.flatnonzero(wz.any(axis=0))
    planes = np.empty((used.size, *grid.shape[1:]), dtype=np.float32)
    for i in range(0, used.size, CHUNK_SLICES):
        block = np.asarray(volume[used[i : i + CHUNK_SLICES]], dtype=np.float32)
        planes[i : i + CHUNK_SLICES] = wr @ block @ wc.T
    return np.tensordot(wz[:, used], planes, axes=1)


def finding_box(finding: Finding, grid: Grid, spatial_dims: int) -> list[int] | None:
    """The finding's StandardMode box on ``grid`` in whole pixels (every pixel its circle (2-D: where the slice's
    centre plane cuts the sphere) or cube (3-D) touches), clipped to the image; None when it misses the image."""
    q = (finding.centre - grid.start) / grid.step  # output cell coordinates
    reach = np.full(3, finding.radius_mm)
    if spatial_dims == 2:
        off_plane_mm = (q[0] - 0.5) * grid.spacing_mm[0]
        if abs(off_plane_mm) >= finding.radius_mm:
            return None
        reach[:] = math.sqrt(finding.radius_mm**2 - off_plane_mm**2)
    half = reach / grid.spacing_mm
    axes = slice(3 - spatial_dims, 3)
    lo = np.clip(np.floor(q - half), 0, grid.shape)[axes]
    hi = np.clip(np.ceil(q + half), 0, grid.shape)[axes]
    return None if (hi <= lo).any() else [*lo.astype(int).tolist(), *hi.astype(int).tolist()]


def enclosed_dark_points(plane: np.ndarray, stride: int = 8, threshold_hu: float = -400.0) -> np.ndarray:
    """Native (row, col) cell centres, on every ``stride``-th pixel of a native slice, that are dark (below
    ``threshold_hu``) with tissue on both sides along their row and their column: lung, not the air around the
    body (which reaches the image's edge along some axis). A window centre for 3-D negatives."""
    coarse = np.asarray(plane[::stride, ::stride], dtype=np.float32)
    tissue = coarse >= threshold_hu
    enclosed = np.ones_like(tissue)
    for axis in (0, 1):
        before = np.maximum.accumulate(tissue, axis=axis)
        after = np.flip(np.maximum.accumulate(np.flip(tissue, axis=axis), axis=axis), axis=axis)
        enclosed &= before & after
    return (np.argwhere(~tissue & enclosed) * stride + 0.5).astype(np.float64)


def make_sample(volume: np.ndarray, spec: SampleSpec, spatial_dims: int, size: int, depth_mm: float | None,
                field_mm: float | None = None, seed: int = 0) -> Sample:
    """The sample ``spec`` of ``spec.scan`` (a :class:`Series`) read from its ``volume``, every finding it shows
    boxed; a positive that does not box its own target is a bug, not data, so it stops the build. A 3-D window
    (``field_mm``) without a centre (a negative) is centred on a seeded lung point of its slice."""
    series: Series = spec.scan
    centre_rc = spec.centre_rc
    if field_mm is not None and centre_rc is None:
        centre_rc = pick_point(enclosed_dark_points(volume[spec.slice_index]), spec.id, seed)
    grid = sample_grid(series.header, spec.slice_index, spatial_dims, size, depth_mm, field_mm, centre_rc)
    image = resample(volume, grid)
    boxes, shown = [], []
    for f in series.findings:
        box = finding_box(f, grid, spatial_dims)
        if box is not None:
            boxes.append(box)
            shown.append(f)
    if spec.positive and spec.id.split("/")[0] not in {f.id for f in shown}:
        raise RuntimeError(f"{spec.id}: the sample centred on this target does not box it")
    return Sample(
        image=image[0] if spatial_dims == 2 else image, spacing=tuple(grid.spacing_mm[3 - spatial_dims :].tolist()),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(len(boxes), 2 * spatial_dims),
        is_target=np.array([f.is_target for f in shown], dtype=bool), finding_ids=[f.id for f in shown],
        id=spec.id, patient_id=series.patient_id, scan_id=series.scan_id, slice_index=spec.slice_index,
        positive=spec.positive,
    )  # fmt: skip


# --------------------------------------------------------------------------------- the whole build
def sample_specs(series: Sequence[Series], negatives_per_positive: float, margin_mm: float, seed: int,
                 window_mm: Sequence[float] | None = None) -> list[SampleSpec]:
    """Every target's slice (3-D windows of extent ``window_mm``: a window around every target) and the negatives
    (:func:`~medrobust.data.luna_samples.draw_negatives`), ordered by series, slice and id (so each volume is read
    once)."""
    if window_mm is None:
        positives = [spec for s in series for spec in s.target_slices()]
    else:
        positives = [spec for s in series for spec in s.target_windows(window_mm, seed)]
    count = round(negatives_per_positive * len(positives))
    by_uid = {s.uid: s for s in series}
    picked = draw_negatives({s.uid: s.free_slices(margin_mm) for s in series}, count, seed)
    negatives = [SampleSpec(by_uid[uid], k, f"{uid}/z{k}", positive=False) for uid, k in picked]
    if len(negatives) < count:
        log.warning("LUNA16: %d negatives asked for, only %d slices lie more than %g mm from every finding", count,
                    len(negatives), margin_mm)  # fmt: skip
    return sorted(positives + negatives, key=lambda s: (s.scan.uid, s.slice_index, s.id))


def build_luna16(root: str | os.PathLike, subsets: Sequence[int], spatial_dims: int, image_size: int,
                 depth_mm: float | None, negatives_per_positive: float, negative_margin_mm: float, seed: int,
                 max_scans: int | None = None, field_mm: float | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The cached arrays (:func:`~medrobust.data.luna_samples.pack_samples`, plus ``subsets``: each sample's LUNA16
    subset, which the folds split by) and what the cache's JSON records about the build."""
    scans = read_luna16(root, subsets, max_scans)
    window = None if field_mm is None or spatial_dims == 2 else window_extent_mm(field_mm, depth_mm)
    specs = sample_specs(scans.series, negatives_per_positive, negative_margin_mm, seed, window)
    field_mm = None if window is None else field_mm
    if not specs:
        raise ValueError(f"data.root {str(root)!r}: no sample in subsets {list(subsets)} (no target, no negative)")
    by_series: dict[str, list[SampleSpec]] = defaultdict(list)
    for spec in specs:
        by_series[spec.scan.uid].append(spec)
    samples = []
    for uid, group in tqdm(by_series.items(), desc=f"LUNA16 {spatial_dims}-D", unit="scan"):
        volume = read_metaimage_voxels(group[0].scan.header, mmap=True)  # one volume at a time
        samples += [make_sample(volume, spec, spatial_dims, image_size, depth_mm, field_mm, seed) for spec in group]
        del volume
    arrays = pack_samples(samples, spatial_dims)
    arrays["subsets"] = np.array([spec.scan.subset for spec in specs], dtype=np.int64)
    meta = dict(n_samples=len(samples), n_positive=int(arrays["positive"].sum()), n_series=len(scans.series),
                ignored_annotations=scans.ignored_annotations, ignored_series=scans.ignored_series,
                candidates=scans.candidates)  # fmt: skip
    return arrays, meta
