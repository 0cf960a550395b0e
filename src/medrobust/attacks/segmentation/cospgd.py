"""CosPGD (Agnihotri et al., "CosPGD: an efficient white-box adversarial attack for pixel-wise prediction
tasks", ICML 2024): PGD on the per-voxel CE weighted by the detached cosine between softmax and one-hot label
(:func:`~medrobust.attacks.segmentation.losses.cospgd_loss`), untargeted or towards a target map.

The PGD engine with a :class:`~medrobust.attacks.core.objectives.RankedLoss`: it climbs CosPGD's loss, which
falls as voxels flip (flipped voxels weigh less), and keeps the point ranked worst by the task's ``attack_loss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from torch import Tensor

from medrobust.attacks.core.batch import prepare
from medrobust.attacks.core.session import attack_session
from medrobust.attacks.core.threat import ThreatModel
from medrobust.attacks.gradient.pgd import PGD, pgd_attack
from medrobust.attacks.segmentation.dense import DENSE_OUTPUT, DENSE_TARGET_KEY, check_target, target_map
from medrobust.attacks.segmentation.losses import cospgd_objective


def cospgd_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel,
                  target: str | Tensor | None = None, seed: int | None = 0, **pgd_options: Any) -> Tensor:
    """CosPGD on segmentation logits ``(B, K, *spatial)`` against the masks ``batch[objective.label_key]``.

    Args:
        model, x, batch, objective, threat: as :func:`~medrobust.attacks.gradient.pgd.pgd_attack`.
        target: ``None`` (untargeted: climb CosPGD's loss); else the targeted form towards a per-voxel target
            map, given as DAG takes it (``"random"``, ``"next"``, ``"nearest"``, ``"swap:a,b"``,
            ``"dilate:a,b[,r]"`` or a ``(B, *spatial)`` tensor; see
            :func:`~medrobust.attacks.segmentation.dense.dense_targets`): descend targeted CosPGD's loss.
            Success is still ``objective.is_correct`` turning false.
        seed: seed of the ``"random"`` targets.
        **pgd_options: :func:`pgd_attack`'s keywords (steps, rel_step_size, restarts, early_stop, ...).

    Returns:
        ``x_adv`` ``(B, C, *spatial)`` (or an AttackResult with ``return_result=True``).
    """
    target = check_target("target", target)
    if target is not None:
        session = {key: pgd_options.get(key, True) for key in ("bn_eval", "dropout_eval")}
        with attack_session(model, **session):  # the clean forward for K and "nearest" in the attack's modes
            x, batch = prepare(x, batch)
            labels = batch[getattr(objective, "label_key", "label")]
            batch[DENSE_TARGET_KEY] = target_map(model, x, labels, target, seed, "CosPGD")
    return pgd_attack(model, x, batch, cospgd_objective(objective, targeted=target is not None), threat=threat,
                      **pgd_options)


class CosPGD(PGD):
    """CosPGD for configs (Hydra), suites and callbacks, on segmentation tasks only.

    Args:
        target: ``None`` (untargeted) or a target map mode (see :func:`cospgd_attack`); a tensor only through
            the functional form.
        seed: seed of the ``"random"`` targets.
        **pgd_keywords: :class:`~medrobust.attacks.PGD`'s (norm, steps, rel_step_size, restarts, early_stop, ...).

    Call: ``CosPGD(steps=20)(model, x, batch, task, eps=..., bounds=...)``; ``name`` is ``"cospgd20"``
    (``"cospgd20-t-swap1-2"`` towards ``"swap:1,2"``: file-name safe).
    """

    requires = DENSE_OUTPUT

    def __init__(self, *args: Any, target: str | None = None, seed: int | None = 0, **pgd_keywords: Any) -> None:
        super().__init__(*args, **pgd_keywords)
        self.target, self.seed = check_target("target", target), seed

    @property
    def name(self) -> str:
        if self.target is None:
            return "cos" + super().name
        return f"cos{super().name}-t-" + self.target.replace(":", "").replace(",", "-")

    @property
    def targeted(self) -> bool:  # a targeted attack stays out of the masking checks' strength order
        return self.target is not None

    def attack(self, model, x, batch, objective, *, threat: ThreatModel, **per_call: Any) -> Tensor:
        return cospgd_attack(model, x, batch, objective, threat=threat, target=self.target, seed=self.seed,
                             **per_call, **self.options)
