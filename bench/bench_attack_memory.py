"""Peak memory of a 3-D attack relative to one clean training step on the same batch, measured in one run.

    python bench/bench_attack_memory.py [--task brainage|brainseg|afids] [--steps 10] [--batch-size N] [--repeats 5]
                                        [--override KEY=VALUE ...]

Each measurement runs in a fresh process (so one high-water mark cannot hide another): the task's default
model and one training batch of the task's own datamodule are built (whatever its targets: brain age's ages,
brainseg's integer label maps), the resident set size is read and the high-water mark reset to it, the
operation runs once, and the peak resident set size above that baseline is the operation's memory. Prints the
attack's peak over the training step's (target <= 1.5): PGD-k on the images (the evaluation's attack,
parameters frozen) against a forward, backward and optimizer step of the parameters. The two alternate over
``--repeats`` rounds and the median of the rounds' ratios is reported: the allocator's high-water mark moves by
10-20 % between fresh processes, the training step's most.

The measured processes run with ``keep_large_blocks=false`` unless ``--override keep_large_blocks=true`` asks
otherwise: with it, glibc keeps the blocks freed while building the data and the model and hands them to the
operation, whose resident memory then grows by less than it allocates, by an amount set by what the setup happened
to free (brain age: training step +17 MiB, attack +30 MiB with it; +48 and +62 MiB without). Without it every large
tensor is mapped when allocated and unmapped when freed, so the peak above the baseline is what the operation holds.

``--override`` (repeatable) passes Hydra overrides to the composed config, e.g. ``--task brainseg --override
data.spatial_dims=3`` (3-D volumes). ``--batch-size`` defaults to 16 (the batch this benchmark has always
used for brain age and LIDC); for brainseg and afids it defaults to the datamodule's own batch size (4 volumes in 3-D).
The data are generated or loaded once in the parent process before the measured ones start, so no measured
process pays for generating the phantom.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
from pathlib import Path

import torch

DEFAULT_BATCH_SIZE = 16  # tasks whose datamodule's batch size is not used (below)
OWN_BATCH_SIZE_TASKS = ("brainseg", "afids")  # tasks measured at their datamodule's batch size by default


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> bool:
    """Reset this process's resident-set high-water mark to its current size (Linux >= 4.0); False if refused.
    Without it, a transient peak while loading the data or building the model could hide the operation's."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _config(task: str, batch_size: int | None, overrides: list[str], out: Path):
    from medrobust.config import compose_config

    batch = [] if batch_size is None else [f"data.batch_size={batch_size}"]
    return compose_config("train", [f"task={task}", *batch, *overrides], out)


def _peak_above_baseline(mode: str, task: str, steps: int, batch_size: int | None, overrides: list[str],
                         queue) -> None:
    from medrobust.attacks import PGD
    from medrobust.runner import build_data_and_module

    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(task, batch_size, overrides, Path(tmp))
        datamodule, module = build_data_and_module(cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
        module.bind_data(datamodule)
        batch = next(iter(datamodule.train_dataloader()))  # the task's own batch: image and its targets
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        baseline = _rss_bytes()
        reset = _reset_peak()
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
        queue.put((peak - baseline, tuple(batch["image"].shape), reset))


def measure(mode: str, task: str, steps: int, batch_size: int | None, overrides: list[str]) -> tuple[int, tuple, bool]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_above_baseline, args=(mode, task, steps, batch_size, overrides, queue))
    process.start()
    result = queue.get(timeout=900)
    process.join()
    return result


def prepare(task: str, batch_size: int | None, overrides: list[str]) -> None:
    """Generate (or check) the task's data cache once, in this process, before the measured processes."""
    from hydra.utils import instantiate

    with tempfile.TemporaryDirectory() as tmp:
        datamodule = instantiate(_config(task, batch_size, overrides, Path(tmp)).data, _convert_="all")
        datamodule.prepare_data()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="brainage")
    parser.add_argument("--steps", type=int, default=10, help="k of the PGD-k attack")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default {DEFAULT_BATCH_SIZE}; for {', '.join(OWN_BATCH_SIZE_TASKS)} the "
                             f"datamodule's own")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of one measurement per mode, fresh processes")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for the composed config (repeatable), e.g. data.spatial_dims=3")
    args = parser.parse_args()
    batch_size = args.batch_size
    if batch_size is None and args.task not in OWN_BATCH_SIZE_TASKS:
        batch_size = DEFAULT_BATCH_SIZE
    overrides = list(args.override)
    if not any(o.split("=", 1)[0] == "keep_large_blocks" for o in overrides):
        overrides.insert(0, "keep_large_blocks=false")  # see the module docstring
    prepare(args.task, batch_size, overrides)
    peaks = {"train": [], "attack": []}
    resets = []
    for round_ in range(args.repeats):
        for mode in ("train", "attack") if round_ % 2 == 0 else ("attack", "train"):
            peak, shape, reset = measure(mode, args.task, args.steps, batch_size, overrides)
            peaks[mode].append(peak)
            resets.append(reset)
    mib = 2 ** 20
    reset = "with the high-water mark reset there" if all(resets) else "WITHOUT a high-water-mark reset (refused)"
    print(f"task={args.task} {' '.join(overrides) or '(no overrides)'}: one training batch {shape}, PGD-{args.steps} "
          f"(Linf, eps 0.004, no early stop); peak RSS above the baseline, {reset}")
    print(f"batch {shape}: clean training step peak +{statistics.median(peaks['train']) / mib:.1f} MiB, "
          f"PGD-{args.steps} attack peak +{statistics.median(peaks['attack']) / mib:.1f} MiB (medians of "
          f"{args.repeats} fresh processes each)")
    ratios = [a / t for a, t in zip(peaks["attack"], peaks["train"])]
    print(f"attack / training step peak memory: {statistics.median(ratios):.2f}  (target <= 1.5; rounds "
          f"{min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
