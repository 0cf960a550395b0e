"""Group universal perturbations on regressors: one ``delta`` that shifts a whole group's predictions.

Li et al. ("Anatomical context protects deep learning from adversarial perturbations in medical imaging",
Neurocomputing 2020) fit a single Linf perturbation that maximizes the mean predicted brain age of a group
of images and study how its effect depends on the number of images it must serve: the shift shrinks as the
group grows and levels off past a few hundred images. :func:`universal_shift` runs that experiment: for each
group size, groups drawn deterministically from a fitting pool, a perturbation fitted on each with
:func:`~medrobust.attacks.group.universal.fit_universal_perturbation` on the :class:`ShiftObjective`, and the
shift it causes reported on the group itself and on held-out images it never saw.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from medrobust.attacks.core.base import check_at_least, check_positive
from medrobust.attacks.core.batch import index_batch, prepare
from medrobust.attacks.core.objectives import PredictionObjective
from medrobust.attacks.core.session import attack_session, objective_values
from medrobust.attacks.core.threat import check_bounds
from medrobust.attacks.group.universal import apply_universal, fit_universal_perturbation
from medrobust.attacks.regression.directional import ShiftObjective
from medrobust.evaluation.eps_units import resolve_eps

# Li et al. plot the effect against the number of images targeted, levelling off past ~300 images; this ladder
# spans that range on a log scale (each size capped by the fitting pool)
DEFAULT_GROUP_SIZES = (1, 10, 30, 100, 300, 1000)


def universal_shift(
    model: Callable,
    fit_batches: Iterable[Mapping],
    heldout_batches: Iterable[Mapping],
    objective: Any,
    *,
    eps: float,
    bounds: tuple[float, float] | None,
    eps_unit: str = "model",
    intensity: Any = None,
    direction: str = "up",
    norm: str = "linf",
    group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
    repeats: int = 3,
    seed: int = 0,
    epochs: int = 5,
    rel_step_size: float | None = None,
    image_key: str = "image",
    device: torch.device | str | None = None,
    bn_eval: bool = True,
    dropout_eval: bool = True,
) -> list[dict]:
    """The shift one universal perturbation per group causes, for groups of growing size.

    Args:
        model: the forward, ``(B, C, *spatial) -> output``.
        fit_batches: batch dicts (a DataLoader or a list) with images ``batch[image_key]`` ``(B, C, *spatial)``
            and whatever the objective reads; read once into memory as the pool groups are drawn from.
        heldout_batches: re-iterable batch dicts (a DataLoader or a list) of images no group contains; read
            once per group, in its own minibatches.
        objective: a regression objective with ``prediction(output, batch) -> (B,)`` and ``is_correct``.
        eps: the perturbation size in ``eps_unit``.
        bounds: ``(low, high)`` of valid inputs, or ``None``; every image is clamped into them.
        eps_unit: ``"model"``, ``"native"`` (through ``intensity``) or ``"range"``: a fraction of the
            intensity range of the *least* contrasted image of the pool and the held-out set, so the one
            radius keeps ``delta`` within ``eps`` of every image's own range and is the same for all groups.
        direction: ``"up"`` or ``"down"``.
        norm: ``"linf"`` (the paper's) or ``"l2"``.
        group_sizes: numbers of images per group, each capped by the pool size (duplicates dropped). The
            default, :data:`DEFAULT_GROUP_SIZES` ``(1, 10, 30, 100, 300, 1000)``, spans the range over which
            Li et al. report the effect levelling off (past ~300 images); it is not their exact ladder.
        repeats: groups drawn per size.
        seed: groups are drawn from ``seed``, the size and the repeat alone, so adding a size or a repeat
            leaves the other groups as they were.
        epochs / rel_step_size: of :func:`fit_universal_perturbation` (step ``rel_step_size * eps``).
        image_key: where the images are in each batch dict.
        device: where batches are moved (the model's device) when they come from a CPU DataLoader.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.

    Returns:
        one dict per group (sizes ascending, then repeats): ``group_size``, ``repeat``, ``direction``,
        ``eps`` (the radius in model units), ``fit_shift`` and ``heldout_shift`` (mean of
        ``prediction(x + delta) - prediction(x)`` over the group / the held-out images, target units, signed:
        > 0 when the predictions went up) and ``heldout_correct`` (fraction of held-out images the task still
        gets right under ``delta``, per ``objective.is_correct``).
    """
    shift = ShiftObjective(objective, direction)  # checks the objective and the direction
    bounds = check_bounds(bounds)
    repeats = check_at_least("repeats", repeats, 1)
    step = check_positive("rel_step_size", rel_step_size)
    if iter(heldout_batches) is heldout_batches:
        raise ValueError(f"heldout_batches must be re-iterable (a DataLoader or a list), it is read once per "
                         f"group; got a one-shot iterator {type(heldout_batches).__name__}")
    pool = [_to_device(dict(batch), device) for batch in fit_batches]
    if not pool:
        raise ValueError("fit_batches yielded no batch: there is no pool to draw groups from")
    sizes = [len(_images(batch, image_key)) for batch in pool]
    ladder = _ladder(group_sizes, sum(sizes))
    radius = _radius(eps, eps_unit, intensity, itertools.chain(pool, heldout_batches), image_key)
    session = {"bn_eval": bn_eval, "dropout_eval": dropout_eval}
    rows = []
    for size in ladder:
        for repeat in range(repeats):
            group = _draw(pool, sizes, size, _group_seed(seed, size, repeat), image_key)
            delta = fit_universal_perturbation(
                model, group, shift, norm=norm, eps=radius, bounds=bounds, epochs=epochs,
                step_size=None if step is None else step * radius, image_key=image_key, **session)
            fit_shift, _ = _evaluate(model, objective, group, delta, bounds, image_key, device, session)
            held_shift, held_correct = _evaluate(model, objective, heldout_batches, delta, bounds, image_key,
                                                 device, session)
            rows.append({"group_size": size, "repeat": repeat, "direction": direction, "eps": radius,
                         "fit_shift": fit_shift, "heldout_shift": held_shift, "heldout_correct": held_correct})
    return rows


def _images(batch: Mapping, image_key: str) -> Tensor:
    if image_key not in batch:
        raise KeyError(f"batch has no images under {image_key!r} (keys: {list(batch)})")
    return batch[image_key]


def _to_device(value: Any, device: torch.device | str | None) -> Any:
    """Tensors anywhere in a batch (dicts, lists, tuples) moved to ``device``; ``None`` leaves them."""
    return value if device is None else apply_to_collection(value, Tensor, lambda t: t.to(device))


def _ladder(group_sizes: Sequence[int], pool_size: int) -> list[int]:
    if not len(group_sizes):
        raise ValueError(f"group_sizes must name at least one group size, got {group_sizes!r}")
    return sorted({min(check_at_least("group size", size, 1), pool_size) for size in group_sizes})


def _radius(eps: float, unit: str, intensity: Any, batches: Iterable[Mapping], image_key: str) -> float:
    """One radius in model units; for ``range``, from the smallest intensity range among ``batches``."""
    if unit != "range":
        return float(resolve_eps(eps, unit, intensity=intensity))
    return min(float(resolve_eps(eps, "range", x=_images(batch, image_key)).min()) for batch in batches)


def _group_seed(seed: int, size: int, repeat: int) -> int:
    return ((int(seed) * 1_000_003 + size) * 1_009 + repeat) % 2**63


def _draw(pool: list[dict], sizes: list[int], size: int, seed: int, image_key: str) -> list[dict]:
    """``size`` images drawn without replacement from the pool, as sub-batches of the pool's batches."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(sum(sizes), generator=generator)[:size].sort().values
    group, start = [], 0
    for batch, n in zip(pool, sizes):
        rows = chosen[(chosen >= start) & (chosen < start + n)] - start
        if len(rows):
            group.append(index_batch(batch, rows, batch_size=n))
        start += n
    return group


def _evaluate(model, objective, batches: Iterable[Mapping], delta: Tensor, bounds, image_key: str, device,
              session: dict) -> tuple[float, float]:
    """Mean ``prediction(x + delta) - prediction(x)`` and fraction correct under ``delta`` over ``batches``."""
    predict = PredictionObjective(objective)
    total_shift = correct = count = 0.0
    with attack_session(model, **session), torch.no_grad():
        for raw in batches:
            raw = _to_device(dict(raw), device)
            x, batch = prepare(_images(raw, image_key), raw)
            clean, _ = objective_values(model, predict, x, batch)
            adv, right = objective_values(model, predict, apply_universal(x, delta, bounds), batch)
            total_shift += float((adv - clean).double().sum())
            correct += float(right.sum())
            count += x.shape[0]
    if count == 0:
        raise ValueError("heldout_batches yielded no images to evaluate the universal perturbation on")
    return total_shift / count, correct / count
