"""Attack a trained checkpoint with an evaluation suite; writes robustness.csv, curves and summary.md.

    python eval.py task=lidc ckpt_path=outputs/lidc/<run>/checkpoints/last.ckpt eval=quick
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from medrobust.checkpoints import check_checkpoint
from medrobust.runner import build_callbacks, build_data_and_module, build_loggers, build_trainer, report, save_config


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed, workers=True)
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} is not a file (expected a Lightning .ckpt)")
    if not (cfg.get("eval") or {}).get("_target_"):
        raise ValueError(f"eval.py needs an evaluation suite: eval={cfg.get('eval')} has none (try eval=quick)")
    run_dir = Path(cfg.paths.output_dir)
    datamodule, module = build_data_and_module(cfg)
    check_checkpoint(ckpt, cfg.task_name, module)  # readable with weights_only, this task's, fits the model
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    if trainer.is_global_zero:
        save_config(cfg, run_dir)
    trainer.test(module, datamodule=datamodule, ckpt_path=str(ckpt))
    if trainer.is_global_zero:
        print(report(run_dir))


if __name__ == "__main__":
    main()
