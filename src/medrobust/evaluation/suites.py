"""Evaluation suites: cascades of attacks on survivors, and a minimum-norm curve verified by PGD.

``Cascade`` runs its stages cheapest first; each stage attacks only the samples every earlier stage left
standing (as AutoAttack does), so the strongest, most expensive stage runs on the fewest samples.

``MinimumNormCurve`` reads a whole robustness curve off one minimum-norm run (each sample's radius: it is
robust at eps exactly when its radius exceeds eps), then lets a fixed-eps attack (PGD) check the samples the
radii call robust, since a minimum-norm attack's radius is only an upper bound: from the largest eps below each
radius down, warm-started from the minimum-norm point (:func:`~medrobust.evaluation.curve.verified_curve`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, CurveAttack
from medrobust.attacks.core.batch import index_batch
from medrobust.attacks.core.session import objective_values
from medrobust.attacks.core.threat import ThreatModel
from medrobust.evaluation.curve import verified_curve
from medrobust.evaluation.worst_case import judge, keep_worse


def _stage_list(stages: Mapping[str, Attack] | Sequence[Attack]) -> list[Attack]:
    stages = list(stages.values()) if isinstance(stages, Mapping) else list(stages)
    if not stages:
        raise ValueError("a suite needs at least one stage")
    return stages


def _common_norm(attacks: Sequence[Attack], what: str) -> str:
    norms = {attack.norm for attack in attacks}
    if len(norms) != 1:
        raise ValueError(f"{what} stages must share one norm, got {sorted(norms)}")
    return norms.pop()


class Cascade(Attack):
    """Stages in order, each on the survivors of the previous ones; the first fooling point per sample wins.

    Args:
        stages: attacks (a list, or a name -> attack map from a config), cheapest first, one norm.
        name: the label in tables and curves.
    """

    def __init__(self, stages: Mapping[str, Attack] | Sequence[Attack], name: str = "cascade") -> None:
        self.stages = _stage_list(stages)
        self.stage_names = list(stages) if isinstance(stages, Mapping) else [stage.name for stage in self.stages]
        self.norm = _common_norm(self.stages, f"cascade {name!r}")
        self.name = name
        self.stage_counts: list[int] = []  # samples each stage attacked in the last call
        self.reset_stats()

    @property
    def requires(self) -> tuple[str, ...]:
        """The task members any stage needs (a segmentation-only stage keeps the cascade off classifiers)."""
        return tuple(dict.fromkeys(member for stage in self.stages for member in stage.requires))

    def reset_stats(self) -> None:
        """Zero the running per-stage tallies: samples attacked and samples fooled, over all calls since."""
        self.attacked = {stage: 0 for stage in self.stage_names}
        self.fooled = {stage: 0 for stage in self.stage_names}

    def sum_stats(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        counts = torch.tensor([[self.attacked[name], self.fooled[name]] for name in self.stage_names])
        summed = reduce_sum(counts).tolist()
        self.attacked = {name: int(row[0]) for name, row in zip(self.stage_names, summed)}
        self.fooled = {name: int(row[1]) for name, row in zip(self.stage_names, summed)}

    def black_box_wins(self) -> list[str]:
        """Messages for black-box stages that broke samples every white-box stage before them left standing."""
        total = self.attacked[self.stage_names[0]]
        return [f"black-box stage {name} of {self.name} broke {self.fooled[name]} of {total} samples the white-box "
                f"stages left standing"
                for name, stage in zip(self.stage_names, self.stages)
                if stage.black_box and self.fooled[name] > max(1, 0.01 * total)]

    def full_budget(self) -> "WorstOf | None":
        """Every white-box stage's full-budget form on every sample, the highest-loss point kept: where the
        cascade's continuous metrics are read. Black-box stages are there to catch gradient masking in accuracy
        and stay out; ``None`` when no stage has a full-budget form."""
        stages = [full for stage in self.stages if not stage.black_box for full in [stage.full_budget()] if full]
        return WorstOf(stages, name=self.name) if stages else None

    def attack(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel) -> Tensor:
        eps = threat.eps_for(x)
        current = x.detach().clone()
        standing = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        self.stage_counts = []
        for name, stage in zip(self.stage_names, self.stages):
            idx = standing.nonzero().flatten()
            self.stage_counts.append(len(idx))
            if len(idx) == 0:
                break
            sub_batch = index_batch(batch, idx, batch_size=x.shape[0])
            current[idx] = stage(model, x[idx], sub_batch, objective, eps=eps[idx], bounds=threat.bounds)
            with torch.no_grad():
                _, correct = objective_values(model, objective, current[idx], sub_batch)
            standing[idx] = correct
            self.attacked[name] += len(idx)
            self.fooled[name] += int((~correct).sum())
        return current


class WorstOf(Attack):
    """Each stage on every sample, each warm-started from the worst point so far (where it can be); per sample
    the point of highest task loss (``objective.attack_loss``) is returned. A cascade's full-budget form.

    Args:
        stages: full-budget attacks sharing one norm.
        name: the label in tables and curves.
    """

    def __init__(self, stages: Sequence[Attack], name: str = "worst-of") -> None:
        self.stages = _stage_list(stages)
        self.norm = _common_norm(self.stages, f"worst-of {name!r}")
        self.name = name

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(member for stage in self.stages for member in stage.requires))

    def attack(self, model, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel,
               start: Tensor | None = None) -> Tensor:
        best = x.detach().clone()
        best_loss, _ = judge(model, objective, best, batch)
        for stage in self.stages:
            found = stage.attack_from(best if start is None else start, model, x, batch, objective,
                                      eps=threat.eps_for(x), bounds=threat.bounds)
            best, best_loss, _, _ = keep_worse(model, objective, batch, best, best_loss, found)
            start = None  # later stages start from the worst point so far
        return best

    def attack_from(self, start: Tensor, model, x, batch, objective, *, eps, bounds) -> Tensor:
        return self.attack(model, x, batch, objective, threat=ThreatModel(self.norm, eps, bounds), start=start)


class MinimumNormCurve(CurveAttack):
    """Robust accuracy at every eps from one minimum-norm run, each eps point verified by ``verify``.

    Args:
        minimum_norm: a minimum-norm attack with ``minimal(model, x, batch, objective, *, bounds) ->
            (x_min, norms)`` (FMN, DeepFool, C&W).
        verify: a fixed-eps attack (e.g. PGD, warm-started through its ``attack_from``) that checks the radii's
            verdicts: per sample at the largest eps below its radius, and one eps lower each time it fools
            there (see :func:`~medrobust.evaluation.curve.verified_curve`). ``None``: the radii alone.
        name: the label in tables and curves.

    After each call, ``last_radii`` holds the per-sample radii ``(B,)`` (``inf`` where none was found), lowered
    wherever the verification found a fooling point inside one.
    """

    def __init__(self, minimum_norm: Attack, verify: Attack | None = None, name: str = "fmn-curve") -> None:
        if not hasattr(minimum_norm, "minimal"):
            raise TypeError(f"minimum_norm must be a minimum-norm attack with .minimal(), got {minimum_norm!r}")
        self.minimum_norm, self.verify, self.name = minimum_norm, verify, name
        self.norm = _common_norm([minimum_norm] + ([verify] if verify else []), f"curve {name!r}")

    def curve(self, model, x: Tensor, batch: Mapping, objective: Any, *, eps_values, bounds) -> list[Tensor]:
        """Adversarial points for each eps (non-decreasing), from one minimum-norm run plus verification."""
        x_min, radii = self.minimum_norm.minimal(model, x, batch, objective, bounds=bounds)
        points, radii = verified_curve(self.verify, model, x, batch, objective, eps_values=eps_values,
                                       bounds=bounds, known=(x_min, radii), norm=self.norm)
        self.last_radii = radii
        return points

    def attack(self, model, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel) -> Tensor:
        return self.curve(model, x, batch, objective, eps_values=[threat.eps_for(x)], bounds=threat.bounds)[0]


# -- named suites (the eval= configs and the Python API build them here) -------------------------------
# FMN's first eps-ball update for short runs: the paper's 0.05 suits 100-1000 steps; in 10 steps it cannot
# shrink a DeepFool start that is 40 % too far (measured on the LIDC phantom's CNN: radii 14 % above FMN-300's
# on average, 1.4x at worst, vs 8 % and 1.2x with 0.2)
CURVE_GAMMA = 0.2
def quick_suite(norm: str = "linf") -> Cascade:
    """FGSM, then PGD-10 on what FGSM left standing."""
    from medrobust.attacks.gradient.fgsm import FGSM
    from medrobust.attacks.gradient.pgd import PGD

    return Cascade({"fgsm": FGSM(norm), "pgd10": PGD(norm, steps=10)}, name="quick")


def standard_suite(norm: str = "linf", steps: int = 100, queries: int = 1000, seed: int = 0) -> Cascade:
    """AutoAttack-style: APGD-CE, then APGD-T (targeted DLR; the margin loss below 4 classes, where DLR is
    undefined), then Square (black-box, Linf) on the survivors."""
    from medrobust.attacks.black_box.square import Square
    from medrobust.attacks.gradient.apgd import APGD

    stages = {"apgd-ce": APGD(norm, steps=steps, loss="ce", seed=seed),
              "apgd-t": APGD(norm, steps=steps, targeted=True, seed=seed)}
    if norm == "linf":
        stages["square"] = Square(queries=queries, seed=seed)
    return Cascade(stages, name="standard")


def segmentation_suite(norm: str = "linf", steps: int = 100, queries: int = 1000, seed: int = 0) -> Cascade:
    """The standard cascade for segmentation: APGD on the task's loss (Dice + CE, where APGD-CE stands for
    classifiers), SegPGD, CosPGD, the lowest-Dice APGD ensemble, then Square (black-box, Linf) on the survivors:
    the gradient-masking check. Each gradient stage takes ``steps``; segmentation tasks only (``requires``). The
    ensemble leaves out its Dice + CE member: early-stopped, it would repeat the first stage from the same start."""
    from medrobust.attacks.black_box.square import Square
    from medrobust.attacks.gradient.apgd import APGD
    from medrobust.attacks.segmentation.cospgd import CosPGD
    from medrobust.attacks.segmentation.ensemble import SegEnsemble
    from medrobust.attacks.segmentation.segpgd import SegPGD

    ensemble = SegEnsemble(norm, steps=steps, losses=("segpgd", "cospgd", "margin"), seed=seed)
    stages = {"apgd": APGD(norm, steps=steps, loss="default", seed=seed), "segpgd": SegPGD(norm, steps=steps),
              "cospgd": CosPGD(norm, steps=steps, seed=seed), "seg-ensemble": ensemble}
    if norm == "linf":
        stages["square"] = Square(queries=queries, seed=seed)
    return Cascade(stages, name="segmentation")


def curve_suite(norm: str = "linf", steps: int = 10, verify_steps: int = 3) -> MinimumNormCurve:
    """FMN radii for the whole curve (from DeepFool's start; a short run, so its eps-ball adapts by
    ``CURVE_GAMMA`` at first), the radii's verdicts checked by PGD warm-started from the FMN points."""
    from medrobust.attacks.gradient.pgd import PGD
    from medrobust.attacks.minimum_norm.fmn import FMN

    return MinimumNormCurve(FMN(norm, steps=steps, gamma_init=CURVE_GAMMA), PGD(norm, steps=verify_steps),
                            name="fmn-curve")


SUITES: dict[str, Callable[..., Attack]] = {"quick": quick_suite, "standard": standard_suite, "curve": curve_suite,
                                            "segmentation": segmentation_suite}


def build_suite(name: str, norm: str = "linf") -> Attack:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; options: {sorted(SUITES)}")
    return SUITES[name](norm=norm)


def robust_accuracy(model: Callable, images: Tensor, labels: Tensor, *, eps: float, norm: str = "linf",
                    suite: str = "standard", bounds: tuple[float, float] | None = (0.0, 1.0)) -> float:
    """Fraction of ``images`` ``(B, C, *spatial)`` a plain classifier still gets right under ``suite`` at ``eps``."""
    from medrobust.attacks.classification.objectives import ClassifierObjective

    objective, batch = ClassifierObjective(), {"label": labels}
    x_adv = build_suite(suite, norm)(model, images, batch, objective, eps=eps, bounds=bounds)
    with torch.no_grad():
        return objective.is_correct(model(x_adv), batch).float().mean().item()
