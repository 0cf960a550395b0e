"""Training-cost ratios on a task's default phantom and model, measured in one run.

    python bench/bench_training.py [--task lidc|brainage] [--epochs 2] [--steps 5]

Prints: PGD-k adversarial training epoch time / clean epoch time (target <= 1.15 (k + 1)),
FGSM-RS training / clean (target <= 2.3), and the default robustness evaluation (eval=quick) as a
fraction of a clean training epoch. Times are medians over epochs after a warm-up epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

from medrobust.config import compose_config
from medrobust.runner import build_data_and_module


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._start)


def epoch_seconds(task: str, adv_overrides: list[str] | None, epochs: int, out: Path) -> tuple[float, object, object]:
    run_cfg = compose_config("train", [f"task={task}", *(adv_overrides or ["adv=none"]), "eval=none"], out)
    datamodule, module = build_data_and_module(run_cfg)
    callbacks = [EpochTimer()]
    if adv_overrides:
        callbacks.append(instantiate(run_cfg.adv))
    trainer = instantiate(run_cfg.trainer, callbacks=callbacks, logger=False, max_epochs=epochs + 1,
                          limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    return statistics.median(callbacks[0].times[1:]), module, datamodule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="lidc", help="the task config (conf/task/<task>.yaml)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per mode (after one warm-up)")
    parser.add_argument("--steps", type=int, default=5, help="k of PGD-k training")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        clean, module, datamodule = epoch_seconds(args.task, None, args.epochs, out)
        pgd, _, _ = epoch_seconds(args.task, ["adv=pgd", f"adv.attack.steps={args.steps}", "adv.warmup_epochs=0"],
                                  args.epochs, out)
        fgsm, _, _ = epoch_seconds(args.task, ["adv=fgsm", "adv.warmup_epochs=0"], args.epochs, out)

        eval_cfg = compose_config("train", [f"task={args.task}"], out)
        evaluation = instantiate(eval_cfg.eval)
        start = time.perf_counter()
        evaluation.evaluate(module, datamodule.val_dataloader(), split="val", epoch=0, max_batches=evaluation.max_batches)
        eval_seconds = time.perf_counter() - start

    k = args.steps
    print(f"clean epoch: {clean:.2f} s  (train set {len(datamodule.train_dataloader().dataset)} images)")
    print(f"PGD-{k} training / clean: {pgd / clean:.2f}  (target <= {1.15 * (k + 1):.2f} = 1.15 x (k+1))")
    print(f"FGSM-RS training / clean: {fgsm / clean:.2f}  (target <= 2.3)")
    print(f"robustness evaluation ({', '.join(evaluation.attacks)}; {evaluation.max_batches} batches) / clean epoch: "
          f"{eval_seconds / clean:.2f}")


if __name__ == "__main__":
    main()
