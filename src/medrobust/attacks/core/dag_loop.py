"""DAG's iterations (Xie et al. ICCV 2017), shared by segmentation's dense DAG and detection's proposal DAG: each
step ascends the adversary's loss over what still stands, normalised by its Linf norm (the largest coordinate moves
by the whole step; L2: the unit direction), kept in the eps ball and the bounds; samples leave once done."""

from __future__ import annotations

from typing import Any, Callable

import torch

from medrobust.attacks.core.session import loss_and_grad, objective_values
from medrobust.attacks.core.threat import ThreatModel, ascent_direction, batch_view, constrain, lp_norm
from medrobust.attacks.core.tracking import BestTracker, WorkingSet


def dag_iterations(model: Callable, adversary: Any, work: WorkingSet, threat: ThreatModel, tracker: BestTracker,
                   steps: int) -> None:
    """``steps`` DAG iterations over the working set; done samples (``adversary.is_correct`` false) leave it, and
    every visited point goes to ``tracker``, ranked by ``adversary.score`` (set by each objective call)."""
    x_adv = work.x
    for _ in range(steps):
        _, grad, standing = loss_and_grad(model, adversary, x_adv, work.batch)
        tracker.update(work.idx, x_adv, adversary.score, standing)
        if not bool(standing.all()):
            work, x_adv, grad = work.keep(standing), x_adv[standing], grad[standing]
            if len(work) == 0:
                return
        if threat.norm == "linf":  # DAG's normalization: the largest coordinate moves by the full step
            direction = grad / batch_view(lp_norm(grad, "linf").clamp_min(torch.finfo(grad.dtype).tiny), grad)
        else:
            direction = ascent_direction(grad, "l2")
        x_adv = constrain(work.x, x_adv + batch_view(work.step, x_adv) * direction, threat.norm, work.eps,
                          threat.bounds)
    with torch.no_grad():  # the last iterate has not been looked at yet
        _, standing = objective_values(model, adversary, x_adv, work.batch)
    tracker.update(work.idx, x_adv, adversary.score, standing)
