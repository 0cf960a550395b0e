"""Training-cost ratios on a task's default phantom and model, measured in one run.

    python bench/bench_training.py [--task lidc|brainage|brainseg] [--epochs 2] [--steps 5]
                                   [--override KEY=VALUE ...]

Prints: PGD-k adversarial training epoch time / clean epoch time (target <= 1.15 (k + 1)),
FGSM-RS training / clean (target <= 2.3), and the default robustness evaluation (eval=quick) as a
fraction of a clean training epoch. Times are medians over epochs after a warm-up epoch.

``--override`` (repeatable) passes Hydra overrides to every configuration composed here, e.g.
``--task brainseg --override data.spatial_dims=3`` (3-D volumes) or ``--override data.num_subjects=40``
(a smaller phantom); the first printed line names the task, the overrides and the batches measured.
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
    """Wall time per training epoch, and this process's CPU time (all threads) as a cross-check: on a machine
    shared with other jobs the wall time of one mode's epochs can stretch while another's do not."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def epoch_seconds(task: str, adv_overrides: list[str] | None, epochs: int, out: Path,
                  overrides: list[str]) -> tuple[tuple[float, float], object, object]:
    run_cfg = compose_config("train", [f"task={task}", *(adv_overrides or ["adv=none"]), "eval=none", *overrides],
                             out)
    datamodule, module = build_data_and_module(run_cfg)
    callbacks = [EpochTimer()]
    if adv_overrides:
        callbacks.append(instantiate(run_cfg.adv))
    trainer = instantiate(run_cfg.trainer, callbacks=callbacks, logger=False, max_epochs=epochs + 1,
                          limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    timer = callbacks[0]
    return (statistics.median(timer.times[1:]), statistics.median(timer.cpu_times[1:])), module, datamodule


def training_arguments(description: str, steps_help: str) -> argparse.Namespace:
    """``--task``, ``--epochs``, ``--steps``, ``--override``: what the training benchmarks share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", default="lidc", help="the task config (conf/task/<task>.yaml)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per mode (after one warm-up)")
    parser.add_argument("--steps", type=int, default=5, help=steps_help)
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for every composed config (repeatable), e.g. data.spatial_dims=3")
    return parser.parse_args()


def main() -> None:
    args = training_arguments(__doc__.splitlines()[0], "k of PGD-k training")
    overrides = list(args.override)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (clean, clean_cpu), module, datamodule = epoch_seconds(args.task, None, args.epochs, out, overrides)
        pgd_overrides = ["adv=pgd", f"adv.attack.steps={args.steps}", "adv.warmup_epochs=0"]
        (pgd, pgd_cpu), _, _ = epoch_seconds(args.task, pgd_overrides, args.epochs, out, overrides)
        fgsm_overrides = ["adv=fgsm", "adv.warmup_epochs=0"]
        (fgsm, fgsm_cpu), _, _ = epoch_seconds(args.task, fgsm_overrides, args.epochs, out, overrides)

        eval_cfg = compose_config("train", [f"task={args.task}", *overrides], out)
        evaluation = instantiate(eval_cfg.eval)
        start = time.perf_counter()
        evaluation.evaluate(module, datamodule.val_dataloader(), split="val", epoch=0, max_batches=evaluation.max_batches)
        eval_seconds = time.perf_counter() - start

    k = args.steps
    loader = datamodule.train_dataloader()
    shape = tuple(next(iter(loader))["image"].shape)
    print(f"task={args.task} {' '.join(overrides) or '(no overrides)'}: train set {len(loader.dataset)} images, "
          f"{len(loader)} batches of {shape} per epoch; median of {args.epochs} epochs after a warm-up, validation off")
    print(f"clean epoch: {clean:.2f} s  (train set {len(loader.dataset)} images)")
    print(f"PGD-{k} training / clean: {pgd / clean:.2f}  (target <= {1.15 * (k + 1):.2f} = 1.15 x (k+1))")
    print(f"FGSM-RS training / clean: {fgsm / clean:.2f}  (target <= 2.3)")
    print(f"robustness evaluation ({', '.join(evaluation.attacks)}; {evaluation.max_batches} batches) / clean epoch: "
          f"{eval_seconds / clean:.2f}")
    print(f"the same ratios in process CPU time (less sensitive to other jobs on the machine): PGD-{k} "
          f"{pgd_cpu / clean_cpu:.2f}, FGSM-RS {fgsm_cpu / clean_cpu:.2f} (clean epoch {clean_cpu:.2f} CPU s)")


if __name__ == "__main__":
    main()
