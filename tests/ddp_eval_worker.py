"""One rank of the DDP evaluation jobs of tests/test_ddp_equivalence.py, run under ``torch.distributed.run``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_eval_worker.py jobs.json

``jobs.json`` lists ``{"config": resolved config YAML, "state": module state_dict file, "out": folder}``; each job's
module gets the saved weights and is tested on every rank (Lightning's DDP strategy in the processes torchrun
started; one process group for all jobs). The robustness callback writes ``robustness.csv`` into ``out`` and rank 0
writes the test metrics ``trainer.test`` returns as ``metrics.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medrobust.runner import build_callbacks, build_data_and_module


def run(job: dict) -> None:
    cfg = OmegaConf.load(job["config"])
    datamodule, module = build_data_and_module(cfg)
    module.load_state_dict(torch.load(job["state"], weights_only=True))
    callbacks = [cb for cb in build_callbacks(cfg) if type(cb).__name__ == "RobustnessEvaluation"]
    callbacks[0].output_dir = job["out"]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, strategy="ddp", devices=2,
                          default_root_dir=job["out"])  # fmt: skip
    (metrics,) = trainer.test(module, datamodule=datamodule)
    if trainer.is_global_zero:
        Path(job["out"], "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    torch.set_num_threads(1)
    for job in json.loads(Path(sys.argv[1]).read_text()):
        run(job)
