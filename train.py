"""Train a task with optional adversarial training; robustness curves every epoch; test the best checkpoint.

    python train.py task=lidc adv=pgd
    python train.py -m task=lidc adv=pgd,fgsm,none adv.eps=0.002,0.004
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from medrobust.runner import build_callbacks, build_data_and_module, build_loggers, build_trainer, report, save_config

log = logging.getLogger("medrobust")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    if trainer.is_global_zero:
        save_config(cfg, run_dir)

    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metric = trainer.callback_metrics.get(cfg.optimized_metric)

    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)

    if trainer.is_global_zero:
        print(report(run_dir))
    return None if metric is None else float(metric)


if __name__ == "__main__":
    main()
