"""Training cost of every defence, each epoch against a clean epoch and against PGD-AT's, measured in one run.

    python bench/bench_defenses.py [--task lidc] [--epochs 2] [--steps 5] [--override KEY=VALUE ...]

Every defence trains with the same inner step count k (``adv.attack.steps=k``; margin-based training's own default
is 20), no warm-up, validation off. Prints each defence's epoch / clean epoch and / PGD-AT's epoch (target for
margin-based training: <= 1.5 x PGD-AT, its bisection included), in wall time and in process CPU time. MART is
classification only and is skipped on other tasks. Times are medians over epochs after a warm-up epoch
(bench/bench_training.py measures them the same way).
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import torch
from hydra.utils import get_class

from bench_training import epoch_seconds, training_arguments
from medrobust.config import compose_config

DEFENCES = ("pgd", "trades", "mart", "margin", "iterative")


def applies(task: str, adv: str, out: Path, overrides: list[str]) -> bool:
    """Whether the task module has every member the defence requires (MART: a classifier), a method or a
    constructor argument it keeps (as AdversarialTraining checks at setup)."""
    cfg = compose_config("train", [f"task={task}", f"adv={adv}", *overrides], out)
    requires = getattr(get_class(cfg.adv.defense._target_), "requires", ())
    module = get_class(cfg.module._target_)
    return all(hasattr(module, member) or member in inspect.signature(module).parameters for member in requires)


def main() -> None:
    args = training_arguments(__doc__.splitlines()[0], "inner attack steps of every defence")
    overrides = list(args.override)
    torch.manual_seed(0)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        times["clean"], _, datamodule = epoch_seconds(args.task, None, args.epochs, out, overrides)
        for adv in DEFENCES:
            if not applies(args.task, adv, out, overrides):
                print(f"adv={adv}: does not apply to task={args.task} (skipped)")
                continue
            adv_overrides = [f"adv={adv}", f"adv.attack.steps={args.steps}", "adv.warmup_epochs=0"]
            times[adv], _, _ = epoch_seconds(args.task, adv_overrides, args.epochs, out, overrides)
    loader = datamodule.train_dataloader()
    print(f"task={args.task} {' '.join(overrides) or '(no overrides)'}: {len(loader)} batches of "
          f"{tuple(next(iter(loader))['image'].shape)} per epoch; inner attack {args.steps} steps; median of "
          f"{args.epochs} epochs after a warm-up")
    (clean, clean_cpu), (pgd, pgd_cpu) = times["clean"], times["pgd"]
    print(f"clean epoch: {clean:.2f} s wall, {clean_cpu:.2f} s CPU")
    for adv, (wall, cpu) in times.items():
        if adv == "clean":
            continue
        target = "  (target <= 1.5)" if adv == "margin" else ""
        print(f"adv={adv}: / clean {wall / clean:.2f} (CPU {cpu / clean_cpu:.2f}); / PGD-AT {wall / pgd:.2f} "
              f"(CPU {cpu / pgd_cpu:.2f}){target}")


if __name__ == "__main__":
    main()
