"""Train a task with optional adversarial training; robustness curves every epoch; test the best checkpoint.

    python train.py task=lidc adv=pgd
    python train.py -m task=lidc adv=pgd,fgsm,none adv.eps=0.002,0.004
    python train.py -m task=lidc sweep=optuna             # returns cfg.optimized_metric to the sweeper
    python train.py -m task=lidc +cluster=slurm           # one SLURM job per run (conf/cluster/slurm.yaml)
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from medrobust.checkpoints import check_checkpoint

from medrobust.runner import (
    build_callbacks,
    build_data_and_module,
    build_loggers,
    build_trainer,
    finish_wandb_run,
    optimized_value,
    report,
    save_config,
)

log = logging.getLogger("medrobust")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | list[float] | None:
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    if trainer.is_global_zero:
        save_config(cfg, run_dir)

    if cfg.train:
        if cfg.get("ckpt_path"):  # a wrong-task or truncated file stops here, named, not inside Lightning
            check_checkpoint(cfg.ckpt_path, cfg.task_name, module)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except SIGTERMException:  # files are written; a scheduler must not read the stop as success
            raise SystemExit(143) from None
    fit_metrics = dict(trainer.callback_metrics) if cfg.train else {}  # the last validation's, before test's

    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)

    if trainer.is_global_zero:
        print(report(run_dir))
    finish_wandb_run()
    if not fit_metrics:  # nothing trained (train=false, or a resume of a finished run): no value for a sweeper
        return None
    # the sweepers' objective: one metric, or a list of them for a multi-objective (Pareto) search
    value = optimized_value(cfg.optimized_metric, fit_metrics)
    log.info("optimized_metric %s = %s", cfg.optimized_metric, value)
    return value


if __name__ == "__main__":
    main()
