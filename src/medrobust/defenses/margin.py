"""Margin-based adversarial training (seed 004: Ma et al., SPIE 2024): a margin per training sample, grown
while the model holds and pulled towards the distance of the adversarial point found when it does not.

"Correct" is the task's own ``is_correct`` (argmax for classification, Dice >= tau for segmentation, loss <= tau
for landmarks, |error| <= tau for regression), so the same defence trains every task. Each step, for the samples
the model gets right, PGD in the configured attack's norm (L2 in ``conf/adv/margin.yaml``) runs inside each
sample's margin ``E_i`` with the attack's steps and relative step (20 steps of ``4 E_i / 20``); where an iterate
is wrong, a bisection between the last correct and the first wrong iterate finds the decision boundary. Then:

- no adversarial point found: ``E_i += delta``;
- found at distance ``d_i``: ``E_i = max((E_i + d_i) / 2, delta)``;
- the sample wrong on the clean image: ``E_i = delta``;

clamped to ``[0, eps_max]``, ``eps_max`` being the callback's eps of the epoch (warm-up included) and ``delta``
``rel_margin_step * eps_max``. The loss is ``0.5 * (clean loss over the batch) + 0.5 * (loss at the correct
samples' adversarial points)``: the boundary point (its wrong side) where one was found, the last iterate
elsewhere. Margins are keyed by the batches' stable sample ``id``, kept in checkpoints, and merged across DDP
ranks at the end of every epoch (a sample may be drawn by another rank next epoch).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from medrobust.attacks.core.base import check_fraction, check_positive
from medrobust.attacks.core.batch import index_batch
from medrobust.attacks.core.session import attack_session, loss_and_grad, objective_values
from medrobust.attacks.core.steps import ascent_step
from medrobust.attacks.core.threat import constrain, lp_norm
from medrobust.defenses.base import Adversary, Defense
from medrobust.evaluation.eps_units import resolve_eps
from medrobust.reporting.margins import log_margins_to_wandb, plot_margins


class MarginObjective(Defense):
    """Seed 004's margin-based adversarial training (see the module docstring).

    Args:
        rel_margin_step: ``delta`` as a fraction of ``eps_max``, in (0, 1].
        bisection_steps: halvings of the segment between the last correct and first wrong iterate (>= 1); the
            boundary is then known to ``2^-bisection_steps`` of one PGD step.
        clean_weight: weight of the clean term; the adversarial term gets ``1 - clean_weight`` (0.5 each in
            the paper), in [0, 1).
    """

    name = "margin"
    requires = ("is_correct",)

    def __init__(self, rel_margin_step: float = 0.1, bisection_steps: int = 10, clean_weight: float = 0.5) -> None:
        self.rel_margin_step = check_fraction("adv.defense.rel_margin_step", rel_margin_step)
        if isinstance(bisection_steps, bool) or not isinstance(bisection_steps, int) or bisection_steps < 1:
            raise ValueError(f"adv.defense.bisection_steps must be an integer >= 1, got {bisection_steps!r}")
        if not 0.0 <= clean_weight < 1.0:
            raise ValueError(f"adv.defense.clean_weight must be in [0, 1), got {clean_weight!r}")
        self.bisection_steps = bisection_steps
        self.clean_weight = clean_weight
        self.margins: dict[str, float] = {}  # sample id -> margin, model units of the attack's norm
        self.updated: dict[str, float] = {}  # this epoch's updates on this rank, merged across ranks at its end
        self.history: list[tuple[int, list[float]]] = []  # (epoch, every margin) for the histogram figure

    # -- the loss ---------------------------------------------------------------------------------
    def __call__(self, module: LightningModule, batch: dict, adversary: Adversary) -> Tensor:
        x = batch["image"]
        ids = _ids(batch, len(x))
        eps_max = _per_sample(resolve_eps(adversary.eps, adversary.eps_unit, intensity=module.intensity, x=x), x)
        delta = self.rel_margin_step * eps_max
        margins = torch.tensor([self.margins.get(i, float("nan")) for i in ids], dtype=eps_max.dtype, device=x.device)
        margins = torch.where(torch.isnan(margins), delta, margins).clamp(min=torch.zeros_like(eps_max), max=eps_max)
        attack = adversary.attack
        search = boundary_search(module, module, x, batch, margins, norm=attack.norm, steps=attack.steps,
                                 rel_step=_rel_step(attack), bounds=module.input_bounds,
                                 bisection_steps=self.bisection_steps)
        new = torch.where(search.found, torch.maximum((margins + search.distance) / 2, delta), margins + delta)
        new = torch.where(search.clean_correct, new, delta).clamp(min=torch.zeros_like(eps_max), max=eps_max)
        self.updated.update(zip(ids, new.tolist()))
        self.margins.update(zip(ids, new.tolist()))
        self.log(module, "mean_margin", new.mean(), len(x))
        self.log(module, "found_fraction", search.found.float().mean(), len(x))
        return self._loss(module, batch, search)

    def _loss(self, module: LightningModule, batch: dict, search: "BoundarySearch") -> Tensor:
        x = batch["image"]
        rows = search.clean_correct.nonzero().flatten()
        if len(rows) == 0:
            return module.attack_loss(module(x), batch).mean()
        # one forward over clean and adversarial images together: one pass of BatchNorm statistics
        order = torch.cat([torch.arange(len(x), device=x.device), rows])
        losses = module.attack_loss(module(torch.cat([x, search.x_adv[rows]])), index_batch(batch, order))
        return self.clean_weight * losses[: len(x)].mean() + (1 - self.clean_weight) * losses[len(x):].mean()

    # -- state, merged across ranks and kept in checkpoints ---------------------------------------
    def end_epoch(self, trainer: Trainer, module: LightningModule) -> None:
        if trainer.world_size > 1:  # every rank's updates of this epoch, applied in rank order
            gathered: list[dict] = [{} for _ in range(trainer.world_size)]
            torch.distributed.all_gather_object(gathered, self.updated)
            for updates in gathered:
                self.margins.update(updates)
        self.updated = {}
        epoch = trainer.current_epoch
        self.history = [item for item in self.history if item[0] != epoch] + [(epoch, sorted(self.margins.values()))]
        if trainer.is_global_zero:
            plot_margins(self.history, Path(trainer.default_root_dir) / "curves" / "train_margins.png")
            log_margins_to_wandb(trainer.loggers, self.history[-1][1])

    def state_dict(self) -> dict:
        return {"margins": dict(self.margins), "history": [[epoch, list(values)] for epoch, values in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.margins = {str(key): float(value) for key, value in state_dict.get("margins", {}).items()}
        self.history = [(int(epoch), [float(v) for v in values]) for epoch, values in state_dict.get("history", [])]
        self.updated = {}


class BoundarySearch:
    """What :func:`boundary_search` found, per sample ``(B,)``: whether the clean image was correct, whether an
    adversarial point was found, its distance from ``x`` (``inf`` where none), and the training points ``x_adv``."""

    def __init__(self, clean_correct: Tensor, found: Tensor, distance: Tensor, x_adv: Tensor) -> None:
        self.clean_correct, self.found, self.distance, self.x_adv = clean_correct, found, distance, x_adv


def boundary_search(model, objective, x: Tensor, batch: dict, eps: Tensor, *, norm: str, steps: int, rel_step: float,
                    bounds, bisection_steps: int) -> BoundarySearch:
    """PGD from ``x`` inside per-sample balls ``eps`` ``(B,)``, each sample stopped at its first wrong iterate,
    then bisection between its last correct and first wrong iterate: the boundary point's wrong side.

    The first step judges ``x`` itself (no random start: the margin is measured from the clean image); samples
    wrong there are not attacked. Samples never wrong keep their last iterate (one judged forward past the last
    step) and ``distance`` inf.
    """
    n = len(x)
    last_correct, first_wrong = x.detach().clone(), x.detach().clone()
    clean_correct = torch.ones(n, dtype=torch.bool, device=x.device)
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    step = rel_step * eps
    with attack_session(model):
        idx, x_cur = torch.arange(n, device=x.device), x.detach()
        for i in range(steps + 1):
            sub = index_batch(batch, idx, batch_size=n)
            if i < steps:
                _, grad, correct = loss_and_grad(model, objective, x_cur, sub)
            else:  # the last iterate: judged, not stepped from
                with torch.no_grad():
                    _, correct = objective_values(model, objective, x_cur, sub)
            if i == 0:
                clean_correct[idx] = correct
            else:
                found[idx[~correct]] = True
            first_wrong[idx[~correct]] = x_cur[~correct]
            last_correct[idx[correct]] = x_cur[correct]
            if i == steps or not bool(correct.any()):
                break
            keep = correct.nonzero().flatten()
            idx, x_cur, grad = idx[keep], x_cur[keep], grad[keep]
            x_next = ascent_step(x_cur, grad, norm, step[idx], bounds=bounds)
            x_cur = constrain(x[idx], x_next, norm, eps[idx], bounds).detach()
        hit = found.nonzero().flatten()
        x_adv = last_correct.clone()
        distance = torch.full((n,), float("inf"), dtype=eps.dtype, device=x.device)
        if len(hit):
            boundary = _bisect(model, objective, last_correct[hit], first_wrong[hit], index_batch(batch, hit, batch_size=n),
                               bisection_steps)
            x_adv[hit] = boundary
            distance[hit] = lp_norm(boundary - x[hit], norm).to(eps.dtype)
    return BoundarySearch(clean_correct, found, distance, x_adv.detach())


def _bisect(model, objective, lo: Tensor, hi: Tensor, batch: dict, steps: int) -> Tensor:
    """Halve ``[lo, hi]`` ``steps`` times, ``lo`` correct and ``hi`` wrong throughout; returns ``hi``."""
    with torch.no_grad():
        for _ in range(steps):
            mid = (lo + hi) / 2
            _, correct = objective_values(model, objective, mid, batch)
            view = correct.view(-1, *([1] * (mid.dim() - 1)))
            lo, hi = torch.where(view, mid, lo), torch.where(view, hi, mid)
    return hi


def _ids(batch: dict, n: int) -> list[str]:
    ids = batch.get("id")
    if ids is None or len(ids) != n:
        raise KeyError("adv=margin keeps a margin per training sample and needs batch['id'] (a stable id per sample, "
                       f"one per image); this batch has {'none' if ids is None else len(ids)} for {n} images")
    return [str(i) for i in ids]


def _per_sample(eps, x: Tensor) -> Tensor:
    return torch.as_tensor(eps, dtype=torch.float32, device=x.device).expand(len(x)).clone()


def _rel_step(attack) -> float:
    """The attack's step as a fraction of eps (``rel_step_size``), PGD's ``2.5 / steps`` when it has none."""
    rel = getattr(attack, "rel_step_size", None)
    return check_positive("adv.attack.rel_step_size", rel if rel is not None else 2.5 / attack.steps)
