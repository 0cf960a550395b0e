"""Universal adversarial perturbations: one ``delta`` for a whole set of images (SGD-UAP style).

A universal perturbation (Moosavi-Dezfooli et al., 2017) is a single ``delta`` of shape ``(1, C, *spatial)``,
added to every image, that maximizes the mean ``attack_loss`` over a set of images. This module fits it with
the fast gradient variant (projected stochastic ascent over minibatches, as in SGD-UAP / Shafahi et al.,
"Universal adversarial training", 2020): per minibatch, the gradient of the summed loss w.r.t. ``delta``,
accumulated with momentum, then a steepest-ascent step (``sign`` for Linf, L2-normalized for L2) and a
projection onto the eps ball. ``delta`` is clamped per image into ``bounds`` only when applied.

Held-out evaluation (the point of a universal perturbation)::

    delta = fit_universal_perturbation(model, fit_loader, task, eps=0.004, bounds=(0.0, 1.0))
    x_adv = apply_universal(batch["image"], delta, bounds=(0.0, 1.0))   # images delta never saw

:class:`UniversalPerturbation` is the same thing behind the :class:`~medrobust.attacks.core.base.Attack` call: it
fits ``delta`` on the batch it is given (the group) and applies it to that same group, which measures how
much a single shared perturbation can do to that group, not how it transfers to unseen images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from medrobust.attacks.core.base import Attack, check_positive
from medrobust.attacks.core.batch import attack_key, index_batch, prepare
from medrobust.attacks.core.options import at_least, hyperparameters, norm_in, optional
from medrobust.attacks.core.session import attack_session, loss_and_grad
from medrobust.attacks.core.threat import DENSE_NORMS, ThreatModel, ascent_direction, clamp_bounds, project

REL_STEP = 0.5  # first-epoch step: eps / 2, decayed linearly over the epochs (sums to > eps for 1 batch/epoch)
MOMENTUM = 0.9  # averages the minibatch gradients, whose signs are noisy where images disagree


def apply_universal(x: Tensor, delta: Tensor, bounds: tuple[float, float] | None) -> Tensor:
    """``x + delta`` clamped into ``bounds`` (per image, so each image stays inside its own eps ball).

    Args:
        x: images ``(B, C, *spatial)``.
        delta: the universal perturbation ``(1, C, *spatial)`` (or ``(C, *spatial)``).
        bounds: ``(low, high)`` of valid inputs, or ``None`` when unbounded.
    """
    delta = _check_shape(delta if delta.ndim == x.ndim else delta.unsqueeze(0), x)
    return clamp_bounds(x + delta.to(dtype=x.dtype, device=x.device), bounds)


def _check_shape(delta: Tensor, x: Tensor) -> Tensor:
    if delta.shape[0] != 1 or delta.shape[1:] != x.shape[1:]:
        raise ValueError(f"the universal perturbation has shape {tuple(delta.shape)}, which does not fit images of "
                         f"shape {tuple(x.shape)}: it must be (1, {', '.join(map(str, x.shape[1:]))})")
    return delta


def _check_momentum(name: str, momentum: float) -> float:
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {momentum!r}")
    return float(momentum)


# what fitting a universal perturbation checks, whether given the norm or the threat model
_NORM = norm_in(DENSE_NORMS, "the universal perturbation")
_CHECKS = {"epochs": at_least(1), "momentum": _check_momentum}


def _single_eps(threat: ThreatModel) -> float:
    """One radius for the shared ``delta``: the smallest per-sample eps keeps every image inside its ball."""
    eps = threat.eps
    return float(eps.min()) if isinstance(eps, Tensor) and eps.numel() else float(eps)


@hyperparameters(**_CHECKS, norm=_NORM, step_size=check_positive)
def fit_universal_perturbation(model: Callable, batches: Iterable[Mapping], objective: Any, *, norm: str = "linf",
                               eps: float | Tensor, bounds: tuple[float, float] | None, epochs: int = 5,
                               step_size: float | None = None, momentum: float = MOMENTUM, image_key: str = "image",
                               bn_eval: bool = True, dropout_eval: bool = True) -> Tensor:
    """Fit one perturbation that maximizes the mean ``objective.attack_loss`` over ``batches``.

    Args:
        model: the forward, ``(B, C, *spatial) -> output``.
        batches: batch dicts with images ``batch[image_key]`` ``(B, C, *spatial)`` (same ``C, *spatial`` in
            all) and whatever the objective reads (labels...): a DataLoader or a list. With ``epochs > 1`` it
            is iterated again each epoch, so a one-shot iterator (generator) is refused.
        objective: has ``attack_loss(output, batch) -> (B,)`` and ``is_correct(output, batch) -> (B,)``.
        norm: ``"linf"`` or ``"l2"``.
        eps: radius in model units; a per-sample ``(B,)`` tensor is reduced to its minimum (one delta for all).
        bounds: ``(low, high)`` of valid inputs, or ``None``; images are clamped per image when applied.
        epochs: passes over ``batches``.
        step_size: first-epoch step (Linf: per coordinate; L2: of the step's norm); default ``eps / 2``. The
            step decays linearly over epochs, ``step_size * (epochs - e) / epochs`` in epoch ``e``, so late
            epochs refine rather than oscillate.
        momentum: heavy-ball factor on the (mean-abs normalized) minibatch gradients, in ``[0, 1)``.
        image_key: where the images are in each batch dict.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.

    Returns:
        detached ``delta`` ``(1, C, *spatial)`` in the dtype / device of the first batch's images, with
        ``||delta||_norm <= eps``.
    """
    threat = ThreatModel(norm, eps, bounds)  # validates eps and bounds with the usual messages
    if epochs > 1 and iter(batches) is batches:
        raise ValueError(f"batches must be re-iterable for epochs={epochs} (a DataLoader or a list), "
                         f"got a one-shot iterator {type(batches).__name__}")
    radius = _single_eps(threat)
    step = step_size if step_size is not None else REL_STEP * radius
    delta = velocity = None
    with attack_session(model, bn_eval=bn_eval, dropout_eval=dropout_eval):
        for epoch in range(epochs):
            rate = step * (epochs - epoch) / epochs
            seen = 0
            for raw in batches:
                if image_key not in raw:
                    raise KeyError(f"batch has no images under {image_key!r} (keys: {list(raw)})")
                x, batch = prepare(raw[image_key], raw)
                if delta is None:
                    delta = x.new_zeros((1, *x.shape[1:]))
                    velocity = torch.zeros_like(delta)
                _check_shape(delta, x)
                seen += 1
                if radius == 0:
                    continue
                delta = delta.to(dtype=x.dtype, device=x.device)
                grad = _delta_grad(model, objective, x, delta, batch, threat.bounds)
                velocity = momentum * velocity.to(grad) + grad / grad.abs().mean().clamp_min(1e-30)
                delta = delta + rate * ascent_direction(velocity, norm)
                delta = project(delta, norm, delta.new_full((1,), radius))
            if seen == 0:
                raise ValueError("batches yielded no batch" + (f" in epoch {epoch}" if epoch else ""))
    return delta.detach()


def _delta_grad(model, objective, x: Tensor, delta: Tensor, batch: dict, bounds) -> Tensor:
    """Gradient ``(1, C, *spatial)`` of the summed loss w.r.t. ``delta`` through the per-image clamp."""
    x_adv = apply_universal(x, delta, bounds)
    _, grad, _ = loss_and_grad(model, objective, x_adv, batch)
    if bounds is not None:  # clamped coordinates do not move with delta (torch.clamp's gradient mask)
        shifted = x + delta
        grad = grad * ((shifted >= bounds[0]) & (shifted <= bounds[1]))
    return grad.sum(dim=0, keepdim=True)


@hyperparameters(**_CHECKS, threat=_NORM, rel_step_size=check_positive, batch_size=optional(at_least(1)))
def universal_attack(model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel,
                     epochs: int = 5, rel_step_size: float | None = None, batch_size: int | None = None,
                     momentum: float = MOMENTUM, bn_eval: bool = True, dropout_eval: bool = True) -> Tensor:
    """One perturbation fitted on the group ``x`` ``(B, C, *spatial)`` and applied to it: ``x + delta`` clamped
    into ``threat.bounds``, with ``delta`` ``(1, C, *spatial)`` from :func:`fit_universal_perturbation`.

    Args:
        threat: norm (``linf`` / ``l2``), eps (a per-sample ``(B,)`` eps is reduced to its minimum) and bounds.
        epochs: passes over the group (>= 1).
        rel_step_size: first-epoch step as a multiple of eps; default 0.5 (decayed linearly over epochs).
        batch_size: minibatch size within the group; ``None``: the whole group each step.
        momentum: heavy-ball factor on the minibatch gradients, in ``[0, 1)``.
        bn_eval / dropout_eval: see :func:`~medrobust.attacks.core.session.attack_session`.
    """
    radius = _single_eps(threat)
    if radius == 0:
        return x.detach().clone()
    size = x.shape[0]
    chunk = batch_size or size
    # the group as minibatches; the images go in under a private key so batch["image"] is never read
    group = [{**index_batch(batch, slice(i, i + chunk), batch_size=size), _IMAGES: x[i:i + chunk]}
             for i in range(0, size, chunk)]
    delta = fit_universal_perturbation(
        model, group, objective, norm=threat.norm, eps=radius, bounds=threat.bounds, epochs=epochs,
        step_size=(rel_step_size or REL_STEP) * radius, momentum=momentum, image_key=_IMAGES,
        bn_eval=bn_eval, dropout_eval=dropout_eval)
    x, _ = prepare(x, {})  # a non-inference copy, like every attack's output
    return apply_universal(x, delta, threat.bounds)


class UniversalPerturbation(Attack):
    """A universal perturbation fitted on the batch it attacks, for configs (Hydra), suites and callbacks.

    ``attack(model, x, batch, objective, eps=..., bounds=...)`` is :func:`universal_attack`: one ``delta``
    ``(1, C, *spatial)`` fitted on the group ``x`` ``(B, C, *spatial)``, returning ``x + delta`` clamped into
    ``bounds``. It is a *group* attack: the same delta for every image of the batch, so it is weaker than
    per-image PGD, and its result on one image depends on the others in the batch. For held-out evaluation,
    fit with :func:`fit_universal_perturbation` on one set and :func:`apply_universal` to another.

    Args: those of :func:`universal_attack` (``norm`` ``"linf"`` or ``"l2"``, ``epochs``, ``rel_step_size``,
    ``batch_size``, ``momentum``, ``bn_eval``, ``dropout_eval``), checked the same way.

    ``name`` is ``"universal"``.
    """

    name = "universal"
    functional = staticmethod(universal_attack)


_IMAGES = attack_key("images")
