"""Attack-engine cost ratios on the default LIDC phantom and a clean-trained default model, in one run.

    python bench/bench_attacks.py [--epochs 3] [--repeats 9] [--threads 1] [--only engine|worst_case|segpgd]

Prints: (1) one PGD step of ours vs a plain reference PGD loop on the same model and batch (target <= 1.0);
(2) robust-accuracy evaluation time with per-sample early stopping vs without (target <= 0.6, on a model
with < 50 % robust accuracy); (3) a 6-point curve from the `curve` suite vs six separate PGD runs
(target <= 0.4 of the time, same accuracies within 1 point); (4) on a brain-age regressor, the worst-case
curve (continuous metrics at worst-loss points, accuracy at first-failure points) vs the early-stopped one
(the issue's target <= 1.5x, not met: see below) and vs PGD's whole budget at every eps from fresh starts, with
the MAE each reports and that of a far stronger reference (PGD-50, 3 restarts); (5) on the default
brain-segmentation model (2-D, 64 x 64, batch 32), a SegPGD step vs a plain PGD step (target <= 1.05).

Why (4) misses 1.5x: the early-stopped curve is nearly free on a regressor most of whose samples are already
outside the threshold (2.4 gradient passes per sample for the whole 4-eps curve on the benchmark model), while
any worst case needs the attack's steps on every sample at every eps (40 for PGD-10). Cheaper schedules were
measured and rejected: 3 or 2 steps per eps after the first, warm-started from the previous worst point scaled
to the new radius, lose 2-10 % of the MAE at the largest eps; the loss still rises at every one of the 10 steps,
so a per-sample plateau stop saves nothing.

Timings alternate between the two sides of each ratio and report the median ratio over the rounds, on one
torch thread by default: on a shared 2-core machine the other jobs' load otherwise swamps the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from medrobust.attacks import PGD, SegPGD
from medrobust.evaluation.curve import attack_curve
from medrobust.evaluation.eps_units import resolve_eps
from medrobust.evaluation.suites import curve_suite
from medrobust.evaluation.worst_case import robustness_curve
from medrobust.config import compose_config
from medrobust.runner import build_data_and_module

EPS_CURVE = [0.0005, 0.001, 0.002, 0.004, 0.008, 0.016]


def reference_pgd(model, x, y, eps, steps, alpha):
    """The textbook loop: no early stopping, no bookkeeping."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def timed_in_turns(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Wall times of each function over ``repeats`` rounds and its last result. The functions run in turns (in
    reverse order every other round), so each round's times share the machine's load of the moment."""
    times, results = {name: [] for name in fns}, {}
    for round_ in range(repeats):
        for name in list(fns) if round_ % 2 == 0 else list(fns)[::-1]:
            start = time.perf_counter()
            results[name] = fns[name]()
            times[name].append(time.perf_counter() - start)
    return times, results


def ratio(times: dict, numerator: str, denominator: str) -> float:
    """The median over rounds of one round's time ratio: robust to load that changes between rounds."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def accuracy(module, x, batch):
    with torch.no_grad():
        return module.is_correct(module(x), batch).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="clean training epochs for the benchmark model")
    parser.add_argument("--brainage-epochs", type=int, default=4,
                        help="training epochs of the brain-age regressor for the worst-case comparison")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timed rounds per comparison; each ratio is the median over the rounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while timing; on a shared machine a second thread mostly waits for a "
                             "core, which swamps the ratios with the other jobs' load")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only these comparisons (repeatable); default: all")
    args = parser.parse_args()
    for name in args.only or SECTIONS:
        torch.manual_seed(0)
        SECTIONS[name](args)


def engine_vs_reference(args) -> None:
    """Our PGD step vs a plain loop, early stopping vs none, the curve suite vs separate runs (LIDC)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("train", ["adv=none", "eval=none"], Path(tmp))
        datamodule, module = build_data_and_module(cfg)
        trainer = instantiate(cfg.trainer, logger=False, max_epochs=args.epochs, limit_val_batches=0,
                              enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(module, datamodule=datamodule)
    module.eval()
    module.input_bounds = datamodule.input_bounds
    batch = next(iter(datamodule.val_dataloader()))
    torch.set_num_threads(args.threads)
    x, y = batch["image"], batch["label"]
    steps, eps, bounds = 10, 0.004, (0.0, 1.0)

    ours = PGD(steps=steps, early_stop=False)
    t, _ = timed_in_turns({"ours": lambda: ours(module, x, batch, module, eps=eps, bounds=bounds),
                           "reference": lambda: reference_pgd(module, x, y, eps, steps, 2.5 * eps / steps)},
                          args.repeats)
    print(f"PGD-{steps} step cost, ours / reference loop (no early stop, batch {len(x)}): "
          f"{ratio(t, 'ours', 'reference'):.2f}  (target <= 1.0)")

    eval_eps = 0.016  # the default model keeps < 50 % robust accuracy here
    t, out = timed_in_turns(
        {"stop": lambda: PGD(steps=steps)(module, x, batch, module, eps=eval_eps, bounds=bounds),
         "full": lambda: PGD(steps=steps, early_stop=False)(module, x, batch, module, eps=eval_eps, bounds=bounds)},
        args.repeats)
    print(f"robust accuracy at eps={eval_eps}: {accuracy(module, out['stop'], batch):.3f} with early stopping, "
          f"{accuracy(module, out['full'], batch):.3f} without (clean {accuracy(module, x, batch):.3f})")
    print(f"early stopping / none, evaluation time: {ratio(t, 'stop', 'full'):.2f}  (target <= 0.6)")

    suite = curve_suite()
    t, out = timed_in_turns(
        {"curve": lambda: attack_curve(suite, module, x, batch, module, eps_values=EPS_CURVE, bounds=bounds),
         "separate": lambda: [PGD(steps=steps)(module, x, batch, module, eps=e, bounds=bounds) for e in EPS_CURVE]},
        args.repeats)
    curve_acc = [accuracy(module, p, batch) for p in out["curve"]]
    sep_acc = [accuracy(module, p, batch) for p in out["separate"]]
    worst = max(c - s for c, s in zip(curve_acc, sep_acc))
    print("eps:               " + " ".join(f"{e:>6g}" for e in EPS_CURVE))
    print("curve suite acc:   " + " ".join(f"{a:6.3f}" for a in curve_acc))
    print("separate PGD acc:  " + " ".join(f"{a:6.3f}" for a in sep_acc))
    print(f"6-point curve suite / six PGD-{steps} runs, time: {ratio(t, 'curve', 'separate'):.2f}  (target <= 0.4); "
          f"curve weaker than PGD by at most {100 * max(worst, 0):.1f} points (target <= 1)")


def trained_brainage(epochs: int):
    """The default brain-age task (3-D CNN on the phantom) trained for ``epochs``; its module and a test batch."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("train", ["task=brainage", "adv=none", "eval=none"], Path(tmp))
        datamodule, module = build_data_and_module(cfg)
        trainer = instantiate(cfg.trainer, logger=False, max_epochs=epochs, limit_val_batches=0, callbacks=[],
                              enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(module, datamodule=datamodule)
    module.eval()
    return module, next(iter(datamodule.test_dataloader()))


def worst_case_vs_early_stopped(args) -> None:
    """The worst-case curve against the early-stopped one (the issue's ratio), against the same attack's whole
    budget spent at every eps from fresh starts (what a worst-case curve costs without the warm start), and its
    MAE against a much stronger reference (PGD-50, 3 restarts, at every eps) and against cheaper schedules."""
    torch.set_num_threads(max(args.threads, torch.get_num_threads()))  # training is not timed
    module, batch = trained_brainage(args.brainage_epochs)
    torch.set_num_threads(args.threads)
    x = batch["image"]
    eps = [resolve_eps(e, "range", x=x) for e in (0.001, 0.002, 0.004, 0.008)]  # the default brain-age eval
    attack = PGD(steps=10)
    kwargs = dict(eps_values=eps, bounds=module.input_bounds)

    def full_budget_each_eps(reference=attack):
        return [reference.full_budget()(module, x, batch, module, eps=e, bounds=module.input_bounds) for e in eps]

    runs = {"worst": lambda: robustness_curve(attack, module, x, batch, module, **kwargs).worst,
            "early": lambda: attack_curve(attack, module, x, batch, module, **kwargs),
            "independent": full_budget_each_eps}
    passes = {name: gradient_passes(module, run) / len(x) for name, run in runs.items()}
    t, out = timed_in_turns(runs, args.repeats)
    out["reference"] = full_budget_each_eps(PGD(steps=50, restarts=3))

    def mae(point):
        with torch.no_grad():
            return module.error(module(point), batch).abs().mean().item()

    correct = accuracy(module, x, batch)
    print(f"brain-age PGD-10 curve (batch {len(x)}, range eps 0.001-0.008), clean MAE {mae(x):.2f} years, "
          f"{correct:.0%} within the 5-year threshold at eps 0")
    for name, label in (("early", "early-stopped points"), ("worst", "worst-loss points"),
                        ("independent", "PGD-10 whole budget, each eps"), ("reference", "PGD-50 x 3 restarts")):
        print(f"MAE at {label + ':':32s}" + " ".join(f"{mae(p):6.2f}" for p in out[name]))
    print("gradient passes per sample, whole curve: " + ", ".join(f"{k} {v:.1f}" for k, v in passes.items()))
    print(f"worst-case curve / early-stopped curve, time: {ratio(t, 'worst', 'early'):.2f}  (target <= 1.5)")
    print(f"worst-case curve / PGD-10 whole budget at each eps, time: {ratio(t, 'worst', 'independent'):.2f}")


def gradient_passes(module, run) -> int:
    """Samples that went through a forward with gradients while ``run()`` ran (the attack steps)."""
    counted = [0]

    def count(_module, args):
        counted[0] += args[0].shape[0] if torch.is_grad_enabled() else 0

    handle = module.register_forward_pre_hook(count)
    try:
        run()
    finally:
        handle.remove()
    return counted[0]


def segpgd_step_vs_pgd_step(args) -> None:
    """The step cost of SegPGD (a loss per step, ranked by the task's) vs plain PGD, full budget on both, on the
    default task=brainseg model (untrained: a step's cost does not depend on the weights) and phantom-sized
    inputs with labels of every class."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("train", ["task=brainseg", "adv=none", "eval=none"], Path(tmp))
        _, module = build_data_and_module(cfg)
    module.eval()
    size, batch_size = 64, 32
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 1, size, size, generator=generator)
    batch = {"image": x, "label": torch.randint(0, module.num_classes, (batch_size, size, size), generator=generator)}
    steps, eps = 10, 0.004
    t, _ = timed_in_turns({name: lambda attack=attack: attack(module, x, batch, module, eps=eps, bounds=(0.0, 1.0))
                           for name, attack in (("segpgd", SegPGD(steps=steps).full_budget()),
                                                ("pgd", PGD(steps=steps).full_budget()))}, args.repeats)
    print(f"brainseg (2-D {size} x {size}, batch {batch_size}): a SegPGD-{steps} step / a PGD-{steps} step: "
          f"{ratio(t, 'segpgd', 'pgd'):.3f}  (target <= 1.05)")


SECTIONS = {"engine": engine_vs_reference, "worst_case": worst_case_vs_early_stopped,
            "segpgd": segpgd_step_vs_pgd_step}


if __name__ == "__main__":
    main()
