"""Peak memory of a 3-D attack relative to one clean training step on the same batch, measured in one run.

    python bench/bench_attack_memory.py [--task brainage] [--steps 10] [--batch-size 16] [--repeats 5]

Each measurement runs in a fresh process (so one high-water mark cannot hide another): the task's default
model and one training batch are built, the resident set size is read, the operation runs once, and the
peak resident set size above that baseline is the operation's memory. Prints the attack's peak over the
training step's (target <= 1.5): PGD-k on the images (the evaluation's attack, parameters frozen) against a
forward, backward and optimizer step of the parameters. The two alternate over ``--repeats`` rounds and the
median of the rounds' ratios is reported: the allocator's high-water mark moves by 10-20 % between fresh
processes, the training step's most.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
from pathlib import Path

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak_above_baseline(mode: str, task: str, steps: int, batch_size: int, queue) -> None:
    from medrobust.attacks import PGD
    from medrobust.config import compose_config
    from medrobust.runner import build_data_and_module

    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("train", [f"task={task}", f"data.batch_size={batch_size}"], Path(tmp))
        datamodule, module = build_data_and_module(cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
        module.bind_data(datamodule)
        batch = next(iter(datamodule.train_dataloader()))
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        baseline = _rss_bytes()
        if mode == "train":
            module.train()
            loss = module.attack_loss(module(batch["image"]), batch).mean()
            loss.backward()
            optimizer.step()
        else:
            module.eval()
            PGD(steps=steps, early_stop=False)(module, batch["image"], batch, module, eps=0.004,
                                               bounds=module.input_bounds)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        queue.put((peak - baseline, tuple(batch["image"].shape)))


def measure(mode: str, task: str, steps: int, batch_size: int) -> tuple[int, tuple]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_above_baseline, args=(mode, task, steps, batch_size, queue))
    process.start()
    result = queue.get(timeout=900)
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="brainage")
    parser.add_argument("--steps", type=int, default=10, help="k of the PGD-k attack")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of one measurement per mode, fresh processes")
    args = parser.parse_args()
    peaks = {"train": [], "attack": []}
    for round_ in range(args.repeats):
        for mode in ("train", "attack") if round_ % 2 == 0 else ("attack", "train"):
            peak, shape = measure(mode, args.task, args.steps, args.batch_size)
            peaks[mode].append(peak)
    mib = 2 ** 20
    print(f"batch {shape}: clean training step peak +{statistics.median(peaks['train']) / mib:.1f} MiB, "
          f"PGD-{args.steps} attack peak +{statistics.median(peaks['attack']) / mib:.1f} MiB (medians of "
          f"{args.repeats} fresh processes each)")
    ratios = [a / t for a, t in zip(peaks["attack"], peaks["train"])]
    print(f"attack / training step peak memory: {statistics.median(ratios):.2f}  (target <= 1.5; rounds "
          f"{min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
