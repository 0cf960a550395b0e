"""Evaluation on two DDP processes gives what one process gives: every task, odd split sizes, random-start attacks.

Each process takes whole batches of the one-process order (datamodules/sharding.py) and seeds batch ``k``'s attacks
as batch ``k``; no sample is scored twice. In-process runs use ``ddp_spawn`` (2 CPU processes); the command a user
types, ``eval.py ... trainer=ddp_cpu``, runs once as a real subprocess against ``trainer=cpu``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config, run_script
from medrobust.datamodules.sharding import batch_number, consecutive_batches, shard_batches, sharded_loader
from medrobust.reporting import read_csv
from medrobust.runner import build_callbacks, build_data_and_module
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


# -- every task: trainer.test on 2 ddp_spawn processes == on 1 --------------------------------------------------
TASKS = _options("task")


def _test_rows(path: Path) -> dict[tuple, tuple]:
    return {(r["attack"], r["eps"], r["metric"], r.get("sample", "")): (r["value"], r["flags"])
            for r in read_csv(path) if r["split"] == "test"}


def _close(a, b) -> bool:
    if a == "" or b == "":
        return a == b
    a, b = float(a), float(b)
    return (math.isinf(a) and a == b) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_two_processes_report_what_one_process_reports(tiny_for, task, tmp_path):
    cfg = compose_config("train", [*tiny_for(task), "eval.test_max_batches=null", "trainer.limit_test_batches=null"],
                         tmp_path)  # fmt: skip
    _short_suites(cfg)
    datamodule, module = build_data_and_module(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    n_test, batches = len(datamodule.data_test), len(datamodule.eval_batches(datamodule.data_test))
    assert batches >= 2, f"{task}: the tiny test split fits one batch; nothing to shard"
    state = {k: v.clone() for k, v in module.state_dict().items()}
    results, rows = {}, {}
    for name, strategy, devices in (("one", "auto", 1), ("ddp", "ddp_spawn", 2)):
        module.load_state_dict(state)
        callbacks = [cb for cb in build_callbacks(cfg) if type(cb).__name__ == "RobustnessEvaluation"]
        callbacks[0].output_dir = str(tmp_path / name)
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, strategy=strategy, devices=devices,
                              default_root_dir=str(tmp_path / name))  # fmt: skip
        (results[name],) = trainer.test(module, datamodule=datamodule)
        rows[name] = _test_rows(tmp_path / name / "robustness.csv")
    assert results["one"].keys() == results["ddp"].keys()
    for key, value in results["one"].items():
        assert math.isclose(results["ddp"][key], value, rel_tol=1e-4, abs_tol=1e-5), (task, key, value)
    assert rows["one"].keys() == rows["ddp"].keys() and rows["one"]
    for key, (value, flags) in rows["one"].items():
        assert _close(rows["ddp"][key][0], value) and rows["ddp"][key][1] == flags, (task, n_test, key)


# -- the command a user types ----------------------------------------------------------------------------------
def test_eval_py_with_ddp_cpu_equals_cpu_on_an_odd_test_split(tiny, tmp_path):
    """The issue's own case: LIDC with an odd number of test nodules, `eval.py` on 1 and on 2 processes."""
    train = tmp_path / "train"
    run = run_script("train.py", ["task=lidc", *tiny, f"hydra.run.dir={train}"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = train / "checkpoints" / "last.ckpt"
    common = ["task=lidc", *tiny, f"ckpt_path={ckpt}", "eval=quick", "eval.test_max_batches=null",
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
