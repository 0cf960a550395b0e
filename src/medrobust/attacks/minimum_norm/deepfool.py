"""DeepFool (Moosavi-Dezfooli et al., "DeepFool: a simple and accurate method to fool deep neural networks",
CVPR 2016), L2 and Linf: step to the nearest boundary of the model's linearization until the model is wrong."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.batch import prepare
from medrobust.attacks.core.objectives import MarginObjective
from medrobust.attacks.core.options import at_least, hyperparameters, non_negative, norm_in, optional
from medrobust.attacks.core.session import attack_session, objective_values
from medrobust.attacks.core.threat import (
    Bounds,
    ascent_direction,
    batch_view,
    clamp_bounds,
    lp_norm,
    room_along,
)
from medrobust.attacks.core.tracking import BestTracker, WorkingSet
from medrobust.attacks.minimum_norm.base import CHECKS, MinimumNormAttack, dual_norm, offer_smallest
from medrobust.losses.classification import classification_margin

PUSH = 1e-4  # DeepFool's push past the linearized boundary (added to |f|, as the original code)


@hyperparameters(**CHECKS, norm=norm_in(), overshoot=non_negative, num_classes=optional(at_least(2)))
def deepfool_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, bounds: Bounds | None,
                    norm: str = "l2", steps: int = 50, overshoot: float = 0.02, num_classes: int | None = None,
                    return_norms: bool = False, bn_eval: bool = True,
                    dropout_eval: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """DeepFool: repeatedly jump to the nearest boundary of the local linearization.

    Each step linearizes ``f`` at the current point and adds the smallest step ``r`` that zeroes it,
    ``r = (|f| + 1e-4) w / ||w||_2^2`` (L2) or ``(|f| + 1e-4) sign(w) / ||w||_1`` (Linf), with ``w = grad f``;
    the point is ``x + (1 + overshoot) * sum(r)``, clamped into ``bounds``. Samples leave the working batch as
    soon as the model is wrong.

    - Classifiers (the output is logits ``(B, K)``, ``K >= 3``, ``batch[label_key]`` holds integer labels and
      the objective's margin is the logit margin ``z_y - max_{j != y} z_j``): the multi-class DeepFool;
      every candidate class ``j`` (the ``num_classes`` top classes of the clean logits, all by default) is
      linearized, ``f_j = z_j - z_y``, and the step goes to the nearest of those boundaries.
    - Any other objective (binary classifiers, regression, segmentation, ...): one boundary,
      ``f = -correct_margin``.

    Args:
        model: the forward, ``(B, C, *spatial) -> output``.
        x: clean images ``(B, C, *spatial)``, inside ``bounds``.
        batch: the batch dict the objective reads; its ``"image"`` is not used.
        objective: has ``correct_margin(output, batch) -> (B,)`` and ``is_correct(output, batch) -> (B,)``.
        bounds: ``(low, high)`` of valid inputs, or ``None`` (required: never assumed).
        norm: ``"l2"``, ``"linf"`` or ``"l1"`` (the step to the linearized boundary in that norm: along ``w``,
            along ``sign(w)``, or on the one free coordinate of largest ``|w_i|``).
        steps: at most this many linearization steps (one forward + one backward per candidate class each).
        overshoot: relative push past the boundary estimate.
        num_classes: candidate classes of the multi-class form, counting the label (>= 2); ``None``: all.
        return_norms: also return the norms ``(B,)``.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.

    Returns:
        detached ``x_adv`` ``(B, C, *spatial)``: per sample the first fooling point (the smallest DeepFool
        visits), ``x`` where the clean point is wrong (norm 0) or none was found within ``steps`` (norm
        ``inf``); with ``return_norms``, ``(x_adv, norms)`` (float32; float64 for float64 images).
    """
    label_key = getattr(objective, "label_key", "label")
    margin = MarginObjective(objective)
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval):
        x, batch = prepare(x, batch)
        tracker = BestTracker(x, prefer_success=False)  # scored by -norm: keeps the fooling point
        none = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        work = WorkingSet.full(x, batch, eps=none, step=none)  # eps / step unused
        r_total, x_adv, candidates = torch.zeros_like(x), x, None
        for i in range(steps + 1):
            leaf = x_adv.detach().requires_grad_(True)
            value, correct = objective_values(model, margin, leaf, work.batch)
            offer_smallest(tracker, work.idx, x_adv, lp_norm(x_adv - work.x, norm), ~correct)
            if i == 0:
                candidates = _candidates(margin.output, work.batch, label_key, value, num_classes)
            if i == steps or not bool(correct.any()):
                break
            f, w = _nearest_boundary(margin.output, value, leaf, correct, candidates, work.batch, label_key, norm)
            keep = correct  # fooled samples are done: their steps were not computed
            work, r_total, f, w = work.keep(keep), r_total[keep], f[keep], w[keep]
            candidates = None if candidates is None else candidates[keep]
            r_total = r_total + _step(f, w, norm, room_along(x_adv[keep], w, bounds))
            x_adv = clamp_bounds(work.x + (1 + overshoot) * r_total, bounds)
    x_adv = tracker.x_adv
    return (x_adv, -tracker.loss) if return_norms else x_adv


def _candidates(output: Any, batch: dict, label_key: str, value: Tensor, num_classes: int | None) -> Tensor | None:
    """Candidate classes ``(B, m)`` for the multi-class form, or ``None`` where one boundary is the answer.

    The multi-class form is only valid when the objective's margin *is* the logit margin, checked here on the
    clean output rather than trusted from the objective's type (task modules are objectives too).
    """
    labels = batch.get(label_key)
    if not (isinstance(output, Tensor) and output.ndim == 2 and output.shape[1] >= 3 and isinstance(labels, Tensor)
            and labels.shape == output.shape[:1] and not labels.is_floating_point()):
        return None
    with torch.no_grad():
        logits = output.detach()
        if not torch.allclose(classification_margin(logits, labels), value.detach(), rtol=1e-4, atol=1e-5):
            return None
        # the label's logit excluded, the highest others first
        others = logits.scatter(1, labels.long()[:, None], float("-inf")).argsort(dim=1, descending=True)
    take = output.shape[1] - 1 if num_classes is None else min(num_classes - 1, output.shape[1] - 1)
    return others[:, :take]


def _nearest_boundary(output, value, leaf, active, candidates, batch, label_key, norm) -> tuple[Tensor, Tensor]:
    """The linearization ``(f (B,), w = grad f (B, C, *spatial))`` whose zero set is nearest, ``f < 0`` now.

    Only the ``active`` samples' gradients matter (the others' rows are discarded by the caller).
    """
    if candidates is None:  # one boundary: the objective's own margin
        (grad,) = torch.autograd.grad(value[active].sum(), leaf)
        return -value.detach().to(leaf.dtype), -grad
    labels = batch[label_key].long()[:, None]
    true = output.gather(1, labels)
    best_f, best_w, best_dist = None, None, None
    for c in range(candidates.shape[1]):  # one backward per candidate, through one forward's graph
        f = (output.gather(1, candidates[:, c : c + 1]) - true)[:, 0]
        (w,) = torch.autograd.grad(f[active].sum(), leaf, retain_graph=c + 1 < candidates.shape[1])
        f = f.detach().to(leaf.dtype)
        dist = f.abs() / dual_norm(w, norm).clamp_min(1e-12)
        if best_dist is None:
            best_f, best_w, best_dist = f, w, dist
            continue
        closer = dist < best_dist
        best_f, best_dist = torch.where(closer, f, best_f), torch.where(closer, dist, best_dist)
        best_w = torch.where(batch_view(closer, w), w, best_w)
    return best_f, best_w


def _step(f: Tensor, w: Tensor, norm: str, room: Tensor | None) -> Tensor:
    """The smallest step zeroing the linearization ``f + <w, r>`` (plus DeepFool's push), ``(B, C, *spatial)``.

    L1: all of it on the coordinate of largest ``|w_i|`` that still has ``room`` (not at a bound it would be
    pushed against, where clamping would undo the step and DeepFool would stall).
    """
    if norm == "l1":
        free = w if room is None else w.masked_fill(room <= 0, 0)
        size = (f.abs() + PUSH) / lp_norm(free, "linf").clamp_min(1e-12)
        return batch_view(size, w) * ascent_direction(free, "l1")
    size = (f.abs() + PUSH) / dual_norm(w, norm).clamp_min(1e-12)
    if norm == "linf":
        return batch_view(size, w) * w.sign()
    return batch_view(size / lp_norm(w, "l2").clamp_min(1e-12), w) * w


class DeepFool(MinimumNormAttack):
    """DeepFool for configs (Hydra), callbacks and suites; ``name`` ``"deepfool"``.

    Args: as :func:`deepfool_attack` (``norm``, ``steps``, ``overshoot``, ``num_classes``, ``bn_eval``,
    ``dropout_eval``). ``minimal`` / ``radii`` / fixed-eps call: see :class:`~medrobust.attacks.minimum_norm.base.MinimumNormAttack`.
    """

    name = "deepfool"
    functional = staticmethod(deepfool_attack)
