"""Write small, valid landmark datasets in the real formats (tests, smoke runs, a format example): the ISBI 2015
cephalometric layout (bmp radiographs + two doctors' txt files) and NIfTI volumes with 3D Slicer ``.fcsv`` markups
listed in a subjects table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------ ISBI 2015
ISBI_SHAPE = (60, 48)  # rows, columns
ISBI_STEMS = {"TrainingData": ["001", "002"], "Test1Data": ["003", "004"], "Test2Data": ["005", "006"]}
JUNIOR_OFFSET = np.array([2.0, 2.0])  # the junior doctor's points: the senior's moved by 2 px right and down


def write_isbi(root: str | os.PathLike) -> dict[str, np.ndarray]:
    """Six radiographs under ``root`` (``RawImage/<folder>/NNN.bmp``, ``AnnotationsByMD/<doctor>/NNN.txt``); returns
    each stem's senior (x, y) points. A bright 3 x 3 square marks the doctors' mean of landmark 0; every annotation
    file ends with lines the reader must ignore."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(0)
    senior = {}
    for folder, stems in ISBI_STEMS.items():
        (root / "RawImage" / folder).mkdir(parents=True)
        for stem in stems:
            xy = np.stack([rng.integers(6, ISBI_SHAPE[1] - 8, 19), rng.integers(6, ISBI_SHAPE[0] - 8, 19)], 1)
            senior[stem] = xy.astype(float)
            for doctor, pts in (("400_senior", xy), ("400_junior", xy + JUNIOR_OFFSET.astype(int))):
                (root / "AnnotationsByMD" / doctor).mkdir(parents=True, exist_ok=True)
                lines = [f"{x},{y}" for x, y in pts] + ["1", "2", "3"]
                (root / "AnnotationsByMD" / doctor / f"{stem}.txt").write_text("\n".join(lines) + "\n")
            image = np.full(ISBI_SHAPE, 40, np.uint8)
            x, y = xy[0] + 1  # the mean of the doctors
            image[y - 1 : y + 2, x - 1 : x + 2] = 250
            Image.fromarray(image).save(root / "RawImage" / folder / f"{stem}.bmp")
    return senior


# ------------------------------------------------------------------------------ NIfTI + 3D Slicer markups
SHAPE = (20, 24, 16)  # stored voxel order (i, j, k)
# voxel -> RAS mm: i -> y (1.5 mm), j -> z (2.5 mm), k -> -x (2 mm): canonical RAS order is (k flipped, i, j)
AFFINE = np.array([[0.0, 0.0, -2.0, 30.0], [1.5, 0.0, 0.0, -20.0], [0.0, 2.5, 0.0, -10.0], [0.0, 0.0, 0.0, 1.0]])
NAMES = ["AC", "PC", "GENU"]
HEADER = "# Markups fiducial file version = 4.10\n# CoordinateSystem = {}\n# columns = " \
         "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"  # fmt: skip


def subject_voxels(s: int) -> np.ndarray:
    """Stored (i, j, k) voxels of subject ``s``'s landmarks (sub-voxel, different per subject)."""
    return np.array([[5.0, 6.0, 4.0], [12.3, 15.7, 9.2], [8.0, 18.0, 11.5]]) + [s, 0.5 * s, 0]


def write_fcsv(path: str | os.PathLike, names, ras: np.ndarray, system: str) -> None:
    """A Slicer markups file of points ``ras`` ``(K, 3)`` (RAS mm) named ``names``, stored in ``system`` (``RAS``,
    ``0``, ``LPS`` or ``1``)."""
    xyz = ras * [-1, -1, 1] if system in ("LPS", "1") else ras
    rows = [f"vtkMRMLMarkupsFiducialNode_{n},{x:.6f},{y:.6f},{z:.6f},0,0,0,1,1,1,0,{name},,"
            for n, (name, (x, y, z)) in enumerate(zip(names, xyz))]  # fmt: skip
    Path(path).write_text(HEADER.format(system) + "\n".join(rows) + "\n")


def write_fcsv_scans(folder: str | os.PathLike) -> Path:
    """Four subjects in ``folder``: ``sub<s>.nii.gz`` with a bright blob at each landmark and ``sub<s>.fcsv``, markups
    in RAS (``0``, ``RAS``) and LPS (``LPS``, ``1``), one listed in reversed order; ``subjects.csv`` with a split
    column (train, train, val, test). Returns the table's path."""
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij"), -1)
    rows = ["image,markups,split"]
    for s, (system, split) in enumerate([("0", "train"), ("LPS", "train"), ("1", "val"), ("RAS", "test")]):
        voxels = subject_voxels(s)
        data = 50 + rng.normal(0, 2, SHAPE)
        for v in voxels:
            data += 400 * np.exp(-((grid - v) ** 2).sum(-1) / (2 * 1.2**2))
        nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), folder / f"sub{s}.nii.gz")
        ras = voxels @ AFFINE[:3, :3].T + AFFINE[:3, 3]
        order = slice(None, None, -1) if s == 1 else slice(None)
        write_fcsv(folder / f"sub{s}.fcsv", NAMES[order], ras[order], system)
        rows.append(f"sub{s}.nii.gz,sub{s}.fcsv,{split}")
    (folder / "subjects.csv").write_text("\n".join(rows) + "\n")
    return folder / "subjects.csv"
