"""Evaluation on two DDP processes gives what one process gives: every task, odd split sizes, random-start attacks.

Each process takes whole batches of the one-process order (datamodules/sharding.py) and seeds batch ``k``'s attacks
as batch ``k``; no sample is scored twice. Every task's 2-process evaluation runs in one ``torch.distributed.run``
subprocess (tests/ddp_eval_worker.py: one process start for all tasks); the command a user types, ``eval.py ...
trainer=ddp_cpu``, runs once as a real subprocess against ``trainer=cpu``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import DEBUG, compose_config, run_script
from medrobust.datamodules.sharding import batch_number, consecutive_batches, shard_batches, sharded_loader
from medrobust.reporting import read_csv
from medrobust.runner import build_callbacks, build_data_and_module, build_trainer
from test_contract import _options, _short_suites


# -- the sharding itself ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "batch_size", "world_size"), [(257, 16, 2), (10, 3, 3), (7, 7, 1), (9, 2, 4)])
def test_processes_take_whole_batches_of_the_one_process_order_once(n, batch_size, world_size):
    batches = consecutive_batches(n, batch_size)
    assert [i for batch in batches for i in batch] == list(range(n))
    seen = {}
    for rank in range(world_size):
        for index, batch in enumerate(shard_batches(batches, rank, world_size, "test split")):
            seen[batch_number(index, rank, world_size)] = batch
    assert [seen[k] for k in sorted(seen)] == batches  # batch k is batch k, every sample once


def test_fewer_batches_than_processes_are_cut_smaller_and_fewer_samples_fail():
    batches = consecutive_batches(5, 8)  # one batch, three processes
    shards = [shard_batches(batches, rank, 3, "val split") for rank in range(3)]
    assert [len(s) for s in shards] == [1, 1, 1]
    assert sorted(i for s in shards for batch in s for i in batch) == list(range(5))
    with pytest.raises(ValueError, match=r"val split: 2 samples cannot be shared by 3 processes"):
        shard_batches(consecutive_batches(2, 8), 0, 3, "val split")


def test_sharded_loader_yields_the_collated_batches_of_its_rank():
    images = torch.arange(7.0)[:, None]
    dataset = [{"image": images[i], "id": f"s{i}"} for i in range(7)]
    loader = sharded_loader(dataset, consecutive_batches(7, 3), rank=1, world_size=2, what="test split")
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)  # Lightning keeps it in place
    (batch,) = list(loader)  # batches [0,1,2] [3,4,5] [6]: rank 1 of 2 takes the second
    assert batch["image"].flatten().tolist() == [3.0, 4.0, 5.0] and batch["id"] == ["s3", "s4", "s5"]
    assert len(loader) == 1


# -- every task: trainer.test on 2 DDP processes == on 1 ---------------------------------------------------------
TASKS = _options("task")
# tiny data with too few test samples to share out: afids' tiny phantom leaves 1 test subject, and the tiny Slicer
# folder of task=landmarks has 1 test scan by its split column (the 3-D phantom stands in for it here)
OWN_DATA = {"afids": ["data.split=[0.5,0.2,0.3]"],
            "landmarks": ["data.spatial_dims=3", "data.num_subjects=10", "data.spacing_mm=10.0", "data.split=[0.5,0.2,0.3]"]}


def _test_rows(path: Path) -> dict[tuple, tuple]:
    return {(r["attack"], r["eps"], r["metric"], r.get("sample", "")): (r["value"], r["flags"])
            for r in read_csv(path) if r["split"] == "test"}


def _close(a, b) -> bool:
    if a == "" or b == "":
        return a == b
    a, b = float(a), float(b)
    return (math.isinf(a) and a == b) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)


def _job(tiny_for, task: str, root: Path) -> dict:
    """Task ``task``'s tiny config with every test batch evaluated, in batches of a third of its odd-sized test
    split (two ranks then hold two batches and one), its suite cut short, and the weights of a fresh model."""
    data = tiny_for(task) if task != "landmarks" else [f"task={task}", DEBUG]
    overrides = [*data, *OWN_DATA.get(task, []), "eval.test_max_batches=null", "trainer.limit_test_batches=null"]
    cfg = compose_config("train", overrides, root / "config")
    datamodule, module = build_data_and_module(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    n_test = len(datamodule.data_test)
    assert n_test >= 2, f"{task}: the tiny test split has {n_test} sample; nothing to share out"
    cfg.data.batch_size = datamodule.batch_size = -(-n_test // 3)
    assert len(datamodule.eval_batches(datamodule.data_test)) >= 2
    _short_suites(cfg)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.save(module.state_dict(), root / "state.pt")
    return {"task": task, "config": str(root / "config.yaml"), "state": str(root / "state.pt"), "out": str(root / "ddp")}


@pytest.fixture(scope="module")
def ddp_runs(tiny_for, tmp_path_factory) -> dict[str, dict]:
    """Every task's job, evaluated on 2 processes by one ``torch.distributed.run`` (tests/ddp_eval_worker.py)."""
    jobs = {task: _job(tiny_for, task, tmp_path_factory.mktemp(f"ddp_{task}")) for task in TASKS}
    listing = tmp_path_factory.mktemp("ddp_jobs") / "jobs.json"
    listing.write_text(json.dumps(list(jobs.values())))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(Path(__file__).with_name("ddp_eval_worker.py")), str(listing)],
                         env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return jobs


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.slow
def test_two_processes_report_what_one_process_reports(ddp_runs, task, tmp_path):
    job = ddp_runs[task]
    cfg = OmegaConf.load(job["config"])
    datamodule, module = build_data_and_module(cfg)
    module.load_state_dict(torch.load(job["state"], weights_only=True))
    callbacks = [cb for cb in build_callbacks(cfg) if type(cb).__name__ == "RobustnessEvaluation"]
    callbacks[0].output_dir = str(tmp_path)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, default_root_dir=str(tmp_path))
    (one,) = trainer.test(module, datamodule=datamodule)
    two = json.loads(Path(job["out"], "metrics.json").read_text())
    assert one.keys() == two.keys() and "test/loss" in one
    for key, value in one.items():
        assert math.isclose(two[key], value, rel_tol=1e-4, abs_tol=1e-5), (task, key, value, two[key])
    rows = {"one": _test_rows(tmp_path / "robustness.csv"), "two": _test_rows(Path(job["out"], "robustness.csv"))}
    assert rows["one"] and rows["one"].keys() == rows["two"].keys()
    for key, (value, flags) in rows["one"].items():
        assert _close(rows["two"][key][0], value) and rows["two"][key][1] == flags, (task, key, value, rows["two"][key])
    froc = {"one": _froc_points(tmp_path), "two": _froc_points(Path(job["out"]))}  # detection: the curves' points
    assert froc["one"] == froc["two"] and (bool(froc["one"]) == (task in ("luna", "bccd"))), task


def _froc_points(run_dir: Path) -> list[tuple]:
    path = run_dir / "curves" / "test_froc.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [(r["attack"], r["eps"], round(float(r["x"]), 5), round(float(r["y"]), 5)) for r in rows]


# -- the command a user types ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_py_with_ddp_cpu_equals_cpu_on_an_odd_test_split(tiny, tmp_path):
    """The issue's own case: LIDC with an odd number of test nodules, `eval.py` on 1 and on 2 processes."""
    split = "data.split=[0.6,0.15,0.25]"  # 11 test nodules of the tiny set: Lightning's sampler would pad one
    train = tmp_path / "train"
    cfg = compose_config("train", ["task=lidc", *tiny, split, "eval=none"], train)  # the checkpoint, trained here
    datamodule, module = build_data_and_module(cfg)
    build_trainer(cfg, build_callbacks(cfg), []).fit(module, datamodule=datamodule)
    assert len(datamodule.data_test) % 2 == 1 and len(datamodule.data_test) > 4  # padding, and batches of 4 to share
    ckpt = train / "checkpoints" / "last.ckpt"
    common = ["task=lidc", *tiny, split, f"ckpt_path={ckpt}", "eval=quick", "eval.test_max_batches=null",
              "trainer.limit_test_batches=null", "data.batch_size=4"]
    rows = {}
    for trainer in ("cpu", "ddp_cpu"):
        out = tmp_path / trainer
        run = run_script("eval.py", [*common, f"trainer={trainer}", f"hydra.run.dir={out}"], cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        rows[trainer] = _test_rows(out / "robustness.csv")
    assert rows["cpu"] and rows["cpu"].keys() == rows["ddp_cpu"].keys()
    for key, (value, flags) in rows["cpu"].items():
        assert _close(rows["ddp_cpu"][key][0], value) and rows["ddp_cpu"][key][1] == flags, key
