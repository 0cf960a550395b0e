"""SLURM through Hydra's submitit launcher: the cluster config sizes the SLURM job and the Lightning trainer alike,
and SLURM's requeue signal makes Lightning write its hpc checkpoint (a real train.py process with SLURM's variables;
no SLURM here, so its `scontrol requeue` fails and must only be reported)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, REPO

CLUSTER = ["+cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.partition=gpu",
           "cluster.cpus_per_task=6", "cluster.mem_gb=200", "cluster.time_min=90", "cluster.signal_delay_s=300"]


def _compose_with_hydra(overrides: list[str]):
    """train.yaml composed as `python train.py -m <overrides>` would, its hydra node kept (the launcher's config)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the sweep folder
    return cfg


def _sbatch_script(launcher_params: dict, folder: Path) -> str:
    """The sbatch file submitit writes for these launcher settings, converted as the plugin's launch() converts them."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base else f"slurm_{k}": v for k, v in launcher_params.items()
              if k not in {"submitit_folder", "max_num_timeout"}}
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=0)
    executor.update_parameters(**params)
    return executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")


def test_cluster_config_sizes_slurm_job_and_trainer_alike(tmp_path, monkeypatch):
    cfg = _compose_with_hydra(CLUSTER)
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    assert cfg.hydra.runtime.choices.trainer == "ddp"
    launcher = instantiate(cfg.hydra.launcher)  # the plugin's SlurmLauncher, its settings resolved
    expected = {"nodes": 2, "gpus_per_node": 4, "tasks_per_node": 4, "cpus_per_task": 6, "mem_gb": 200,
                "timeout_min": 90, "partition": "gpu", "max_num_timeout": 0, "signal_delay_s": 300}
    assert {k: launcher.params[k] for k in expected} == expected
    assert type(launcher).__name__ == "SlurmLauncher"
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert (trainer["num_nodes"], trainer["devices"], trainer["strategy"]) == (2, 4, "ddp")
    (environment,) = [instantiate(node) for node in cfg.trainer.plugins]  # one SLURM environment, auto-requeueing
    assert type(environment).__name__ == "SLURMEnvironment" and environment.auto_requeue

    # what SLURM is asked for; submitit checks for srun before it writes one (an empty stand-in on PATH: no job runs)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    script = _sbatch_script(launcher.params, tmp_path / "submitit")
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6", "--mem=200GB",
                 "--time=90", "--partition=gpu", "--requeue", "--signal=USR1@300"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)

    # Lightning listens for the signal SLURM is asked to send
    assert environment.requeue_signal.name == "SIG" + script.split("--signal=")[1].split("@")[0]


def _wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"train.py exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def _epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


@pytest.mark.slow
def test_sigusr1_writes_hpc_checkpoint_and_reports_the_failed_requeue(tiny, tmp_path):
    """As on a SLURM node (one task): SIGUSR1 mid-training -> hpc_ckpt_1.ckpt; `scontrol requeue` fails here, which is
    logged and training goes on; SIGTERM (what SLURM sends a requeued job) then ends the run."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(slurm, PYTHONUNBUFFERED="1")
    args = ["task=lidc", *tiny, "+cluster=slurm", "trainer=cpu", "cluster.nodes=1", "cluster.gpus_per_node=1",
            "eval=none", "test=false", "trainer.max_epochs=1000", "trainer.limit_val_batches=1",
            f"hydra.run.dir={run_dir}"]
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        last = run_dir / "checkpoints" / "last.ckpt"
        _wait_for(last.exists, "first epoch's checkpoint", proc, log)  # training is under way
        proc.send_signal(signal.SIGUSR1)
        _wait_for(lambda: "Requeuing SLURM job 4242 failed" in log.read_text(), "report of the failed requeue",
                  proc, log)
        hpc = run_dir / "hpc_ckpt_1.ckpt"
        saved = torch.load(hpc, map_location="cpu", weights_only=False)  # written before the requeue was tried
        assert {"state_dict", "epoch", "global_step", "loops", "callbacks"} <= set(saved)
        assert saved["global_step"] > 0
        # no hang: the run trains on after the failed requeue (a newer epoch's last.ckpt)
        _wait_for(lambda: _epoch(last) > saved["epoch"], "epoch after the signal", proc, log)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Handling auto-requeue signal" in text, text[-4000:]
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
