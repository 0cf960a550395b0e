"""Gradient-masking checks: signs that an evaluation's robust numbers come from a broken attack, not a
robust model (Athalye et al. 2018; Carlini et al. 2019, "On evaluating adversarial robustness").

Two kinds: checks on an evaluation's result rows (curves that rise with eps, a weaker attack beating a
stronger one, a black-box attack beating the white-box ones), and probes of the model on one batch (zero or
non-finite input gradients, outputs that change between identical forwards, accuracy surviving an eps
large enough to break any model that looks at its input).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from medrobust.attacks.core.session import attack_session, loss_and_grad, objective_values
from medrobust.attacks.gradient.pgd import PGD


@dataclass(frozen=True)
class MaskingFlag:
    name: str
    message: str


def check_rows(rows: Sequence[dict], attack_order: Sequence[str], black_box: Sequence[str] = (),
               metric: str = "accuracy", tolerance: float = 0.01) -> list[MaskingFlag]:
    """Flags from one evaluation's rows (one split, one epoch): ``attack_order`` is cheapest first."""
    acc: dict[str, dict[float, float]] = defaultdict(dict)
    for row in rows:
        if row["metric"] == metric:
            acc[row["attack"]][row["eps"]] = row["value"]
    flags = []
    for attack, curve in acc.items():
        eps = sorted(curve)
        rises = [(a, b) for a, b in zip(eps, eps[1:]) if curve[b] > curve[a] + tolerance]
        if rises:
            a, b = rises[0]
            flags.append(MaskingFlag("rises_with_eps", f"{attack}: {metric} rises from {curve[a]:.3f} at eps={a:g} "
                                                       f"to {curve[b]:.3f} at eps={b:g}"))
    ordered = [a for a in attack_order if a in acc and a not in black_box]
    for weak, strong in zip(ordered, ordered[1:]):
        for eps in sorted(set(acc[weak]) & set(acc[strong])):
            if eps > 0 and acc[strong][eps] > acc[weak][eps] + tolerance:
                flags.append(MaskingFlag("weaker_attack_wins", f"{weak} ({acc[weak][eps]:.3f}) beats the stronger "
                                                               f"{strong} ({acc[strong][eps]:.3f}) at eps={eps:g}"))
                break
    white = [a for a in acc if a not in black_box]
    for box in (a for a in black_box if a in acc):
        for eps in sorted(acc[box]):
            best_white = min((acc[a][eps] for a in white if eps in acc[a]), default=None)
            if eps > 0 and best_white is not None and acc[box][eps] < best_white - tolerance:
                flags.append(MaskingFlag("black_box_wins", f"black-box {box} ({acc[box][eps]:.3f}) beats every "
                                                           f"white-box attack ({best_white:.3f}) at eps={eps:g}"))
                break
    return flags


def check_metric_rows(rows: Sequence[dict], strongest: str, directions: Mapping[str, bool | None],
                      skip: Sequence[str] = (), rel_tolerance: float = 0.01) -> list[MaskingFlag]:
    """``weaker_attack_wins_<metric>`` flags: at some eps, another attack in the strongest error-seeking attack's
    threat model (same norm; directional, universal, weaker gradient attacks) reaches a worse value of
    ``<metric>`` than ``strongest`` does, so the curve's value for that metric is not the worst case.

    ``directions``: per metric, ``higher_is_better`` (torchmetrics' attribute); metrics with ``None`` (a shift
    has no bad direction) and those in ``skip`` (accuracy, checked by :func:`check_rows`) are not checked.
    Worse means by more than ``rel_tolerance`` of the strongest attack's value (at least 1e-6).
    """
    value: dict[tuple[str, str, float], float] = {}
    norms: dict[str, str] = {}
    for row in rows:
        value[row["attack"], row["metric"], row["eps"]] = row["value"]
        norms[row["attack"]] = row["norm"]
    flags = []
    for metric, higher_is_better in directions.items():
        if higher_is_better is None or metric in skip:
            continue
        for (attack, name, eps), other in sorted(value.items(), key=lambda item: (item[0][2], item[0][0])):
            strong = value.get((strongest, name, eps))
            if name != metric or attack == strongest or eps == 0 or strong is None or norms[attack] != norms[strongest]:
                continue
            margin = max(rel_tolerance * abs(strong), 1e-6)
            if (other < strong - margin) if higher_is_better else (other > strong + margin):
                flags.append(MaskingFlag(f"weaker_attack_wins_{metric}",
                                         f"{attack} reaches {metric} {other:.4g} where the strongest error-seeking "
                                         f"attack {strongest} reaches {strong:.4g} at eps={eps:g}"))
                break
    return flags


def probe_model(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, norm: str,
                bounds: tuple[float, float] | None, large_eps: float | None = None,
                max_large_eps_accuracy: float = 0.1) -> list[MaskingFlag]:
    """Flags from probing the model on one batch ``x`` ``(B, C, *spatial)``.

    ``large_eps`` defaults to half the bounds' range for Linf (enough to turn any image mid-grey) and to the
    full range times sqrt(number of input values) for L2; without bounds, to 10 standard deviations of ``x``.
    """
    flags = []
    with attack_session(model):
        _, grad, _ = loss_and_grad(model, objective, x, batch)
        with torch.no_grad():
            first, second = model(x), model(x)
    per_sample = grad.flatten(1)
    if not bool(torch.isfinite(per_sample).all()):
        flags.append(MaskingFlag("nonfinite_gradients", "input gradients contain NaN or inf"))
    zero = int((per_sample.abs().amax(dim=1) == 0).sum())
    if zero > 0.1 * len(x):
        flags.append(MaskingFlag("zero_gradients", f"input gradient is exactly zero for {zero} of {len(x)} samples"))
    if not _same(first, second):
        flags.append(MaskingFlag("randomized_model", "two forwards of the same input in eval mode differ"))
    eps = large_eps if large_eps is not None else _large_eps(x, norm, bounds)
    x_adv = PGD(norm=norm, steps=20, restarts=1)(model, x, batch, objective, eps=eps, bounds=bounds)
    with torch.no_grad(), attack_session(model):
        _, correct = objective_values(model, objective, x_adv, batch)
    accuracy = correct.float().mean().item()
    if accuracy > max_large_eps_accuracy:
        flags.append(MaskingFlag("survives_large_eps", f"accuracy {accuracy:.3f} survives PGD-20 at eps={eps:.3g} "
                                                       f"(expected <= {max_large_eps_accuracy}): masked gradients, "
                                                       f"or a model that ignores its input"))
    return flags


def _large_eps(x: Tensor, norm: str, bounds: tuple[float, float] | None) -> float:
    span = (bounds[1] - bounds[0]) if bounds is not None else 10 * float(x.std())
    linf = span / 2 if bounds is not None else span
    return linf * {"linf": 1.0, "l2": x[0].numel() ** 0.5, "l1": float(x[0].numel())}[norm]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6))
    if isinstance(a, Mapping):
        return all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return all(_same(u, v) for u, v in zip(a, b))
    return a == b
