"""The out-of-distribution attack of seed 002 (Chen et al., "shape reconstruction under attack", SPIE MI 2021).

From an image that is not a nodule patch (noise, lung without a nodule, another task's image), find ``delta`` with
``||delta||_2 <= budget`` and ``x + delta`` inside the input bounds such that the shape network outputs a chosen
in-distribution shape: target outline points and target mask. The objective minimised, per sample, in fp32::

    mean_k ||p_k - t_k||^2  (px^2)  +  dice_weight * (1 - softDice(sigmoid(mask logits), target mask))

with Adamax (the paper: Adamax, lr 0.01, 2000 iterations), starting at ``delta = 0``. Adamax moves a variable
``w``; after each step the point scored is ``delta = P(w)``, the projection onto the L2 ball of radius ``budget``,
then ``x + delta`` clamped into the bounds (:func:`~medrobust.attacks.core.threat.constrain`: clamping moves every
coordinate towards ``x``, which is inside the bounds, so the clamped point stays in the ball and needs no
re-projection). The gradient at that point reaches ``w`` through ``P`` (:func:`pulled_back`), not as a step that
``P`` then cuts: Adamax scales each coordinate on its own, and projected Adamax stalls short of the constrained
optimum (19 % above the optimal error on a linear model) where this one converges to it.

Kept per sample: the lowest-objective point seen among those whose mean point error to the target is no larger
than the start's. The start (``delta = 0``, feasible) always qualifies, so a budget never reports a worse point
error than no attack, by construction; with ``dice_weight = 0`` the restriction never binds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medrobust.attacks.core.session import attack_session
from medrobust.attacks.core.threat import Bounds, batch_view, check_bounds, check_eps, constrain, per_sample_eps

_DICE_SMOOTH = 1.0  # soft Dice's smoothing in pixels, as ShapeTask's: an empty target mask gives a finite loss
_BOUNDS_SLACK = 1e-6  # x_source may sit this far outside the bounds (rounding of a windowed image)


def mean_point_error(points: Tensor, target_points: Tensor) -> Tensor:
    """Mean Euclidean distance ``(B,)`` in pixels between ``points`` and ``target_points`` ``(B, K, 2)``: the MRSE
    the shape task's success criterion reads."""
    return (points.float() - target_points.float()).square().sum(dim=-1).sqrt().mean(dim=1)


def shape_objective(output: dict, target_points: Tensor, target_mask: Tensor, dice_weight: float) -> Tensor:
    """The attack's objective ``(B,)`` (module docstring) for a network ``output`` ``{"points": (B, K, 2),
    "mask": (B, 1, H, W) logits}`` and the targets ``(B, K, 2)`` points, ``(B, H, W)`` mask; fp32."""
    points = output["points"].float()
    squared = (points - target_points.float()).square().sum(dim=-1).mean(dim=1)
    if dice_weight == 0:
        return squared
    prob = torch.sigmoid(output["mask"].float()).flatten(1)
    true = target_mask.float().flatten(1)
    dice = (2 * (prob * true).sum(dim=1) + _DICE_SMOOTH) / (prob.sum(dim=1) + true.sum(dim=1) + _DICE_SMOOTH)
    return squared + dice_weight * (1 - dice)


class OODShapeAttack:
    """Make a shape network output target shapes from out-of-distribution images (module docstring).

    Args:
        steps: Adamax iterations (``eval.steps``; the paper used 2000), >= 1.
        lr: Adamax learning rate, model units per step (``eval.lr``; the paper's 0.01), > 0.
        dice_weight: weight of the mask's soft-Dice loss against the mean squared point error (``eval.dice_weight``),
            >= 0; 0 attacks the outline alone.

    ``attack(model, x_source, target_points, target_mask, budget=..., bounds=...) -> x_adv``: ``x_source``
    ``(B, C, H, W)``, targets ``(B, K, 2)`` (row, col pixels) and ``(B, H, W)`` (or ``(B, 1, H, W)``); ``budget``
    the L2 radius in model units, a float or one per sample ``(B,)``; ``bounds`` ``(low, high)`` or ``None``.
    ``model(x)`` must return ``{"points": (B, K, 2), "mask": (B, 1, H, W)}``. Deterministic; the model runs in
    eval mode with its parameters frozen, its modes and flags restored on exit
    (:func:`~medrobust.attacks.core.session.attack_session`).
    """

    def __init__(self, steps: int = 300, lr: float = 0.01, dice_weight: float = 1.0) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"eval.steps (OOD attack iterations) must be an integer >= 1, got {steps!r}")
        for key, value, low_ok in (("lr", lr, False), ("dice_weight", dice_weight, True)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and not low_ok):
                raise ValueError(f"eval.{key} must be a finite number {'>= 0' if low_ok else '> 0'}, got {value!r}")
        self.steps, self.lr, self.dice_weight = steps, float(lr), float(dice_weight)

    def __call__(self, model, x_source: Tensor, target_points: Tensor, target_mask: Tensor, *,
                 budget: float | Tensor, bounds: Bounds | None = None) -> Tensor:
        x = x_source.detach()
        target_points, target_mask = self._check(x, target_points, target_mask)
        bounds = check_bounds(bounds)
        if bounds is not None and not bool(((x >= bounds[0] - _BOUNDS_SLACK) & (x <= bounds[1] + _BOUNDS_SLACK)).all()):
            raise ValueError(f"OODShapeAttack: x_source must lie inside bounds {bounds} (its values span "
                             f"[{float(x.min()):g}, {float(x.max()):g}]); delta = 0 must be a feasible start")
        eps = per_sample_eps(check_eps(budget), x)
        if not bool((eps > 0).any()):
            return x.clone()
        with attack_session(model):
            return self._run(model, x, target_points, target_mask, eps, bounds)

    def _run(self, model, x: Tensor, target_points: Tensor, target_mask: Tensor, eps: Tensor,
             bounds: Bounds | None) -> Tensor:
        w = torch.zeros_like(x, requires_grad=True)  # Adamax's variable; the point scored is constrain(x, x + w)
        optimizer = torch.optim.Adamax([w], lr=self.lr)
        best_x, best_loss = x.clone(), torch.full_like(eps, math.inf, dtype=torch.float32)
        start_error: Tensor | None = None
        for step in range(self.steps + 1):  # the last pass only scores the final point
            with torch.no_grad():  # project onto the ball, then clamp into the bounds
                x_adv = constrain(x, x + w, "l2", eps, bounds)
            leaf = x_adv.requires_grad_(step < self.steps)
            output = _checked(model(leaf), target_points.shape, x.shape)
            loss = shape_objective(output, target_points, target_mask, self.dice_weight)  # fp32, elementwise
            with torch.no_grad():
                error = mean_point_error(output["points"], target_points)
                start_error = error if start_error is None else start_error
                better = (loss < best_loss) & (error <= start_error)
                best_loss = torch.where(better, loss, best_loss)
                best_x = torch.where(batch_view(better, x), x_adv, best_x)
            if step == self.steps:
                break
            (grad,) = torch.autograd.grad(loss.sum(), leaf)  # at the scored point
            w.grad = pulled_back(grad, w.detach(), eps, x_adv.detach(), bounds)
            optimizer.step()
            if bounds is not None:
                with torch.no_grad():  # w beyond a bound only dilutes the projection's budget
                    w.copy_(x.add(w).clamp_(*bounds).sub_(x))
        return best_x.detach()

    @staticmethod
    def _check(x: Tensor, target_points: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 4:
            raise ValueError(f"OODShapeAttack takes 2-D images (B, C, H, W), got shape {tuple(x.shape)}")
        if target_points.ndim != 3 or target_points.shape[0] != x.shape[0] or target_points.shape[2] != 2:
            raise ValueError(f"target_points must be (B, K, 2) with B = {x.shape[0]}, got {tuple(target_points.shape)}")
        if target_mask.ndim == 4 and target_mask.shape[1] == 1:
            target_mask = target_mask[:, 0]
        if tuple(target_mask.shape) != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"target_mask must be (B, H, W) = {(x.shape[0], *x.shape[2:])}, got "
                             f"{tuple(target_mask.shape)}")
        return target_points.detach().to(x.device), target_mask.detach().to(x.device)


def _checked(output, points_shape: torch.Size, x_shape: torch.Size) -> dict:
    """``output`` if it is a shape network's ``{"points": (B, K, 2), "mask": (B, 1, H, W)}``, else a ValueError."""
    expected = {"points": tuple(points_shape), "mask": (x_shape[0], 1, *x_shape[2:])}
    if isinstance(output, dict) and all(tuple(getattr(output.get(k), "shape", ())) == v for k, v in expected.items()):
        return output
    got = {k: tuple(getattr(v, "shape", ())) for k, v in output.items()} if isinstance(output, dict) else type(output)
    raise ValueError(f"OODShapeAttack needs a shape network: model(x) must return {expected} (points, mask logits) "
                     f"for images {tuple(x_shape)} and targets {tuple(points_shape)}; got {got}")


def pulled_back(grad: Tensor, w: Tensor, eps: Tensor, x_adv: Tensor, bounds: Bounds | None) -> Tensor:
    """The gradient ``(B, C, H, W)`` Adamax gets for ``w``, from ``grad``, the objective's gradient at the scored
    point ``x_adv = clamp(x + P(w))``, ``P`` the projection onto the L2 ball of radius ``eps`` ``(B,)``.

    Inside the ball ``P`` is the identity: ``grad`` itself. Outside, ``grad`` through ``P``'s Jacobian
    ``eps / ||w|| (I - u u^T)``, ``u = w / ||w||`` (tangential: the point slides along the sphere), plus the
    radial part of ``grad`` where descent points into the ball (so an optimum inside stays reachable). Coordinates
    at a bound that descent pushes out of it get 0 (the clamp's straight-through gradient, less what it blocks).

    Why not project ``w`` itself after each step: Adamax divides each coordinate by its own scale, so a
    projected step stalls where the *scaled* gradient, not the gradient, is normal to the sphere (19 % above
    the optimal error on the linear model of tests/test_ood.py). This gradient is zero exactly at the constrained
    problem's stationary (KKT) points, which are then Adamax's only fixed points whatever its scaling.
    """
    if bounds is not None:
        blocked = ((x_adv <= bounds[0]) & (grad > 0)) | ((x_adv >= bounds[1]) & (grad < 0))
        grad = grad.masked_fill(blocked, 0.0)
    norm = w.flatten(1).norm(dim=1)
    unit = w / batch_view(norm.clamp_min(torch.finfo(w.dtype).tiny), w)
    radial = (grad * unit).flatten(1).sum(dim=1)  # > 0: descent (-grad) points into the ball
    outside = norm > eps
    scale = torch.where(outside, eps / norm.clamp_min(torch.finfo(w.dtype).tiny), torch.ones_like(norm))
    tangential = grad - batch_view(radial, grad) * unit
    kept = torch.where(outside, radial.clamp(min=0), radial)
    return batch_view(scale, grad) * tangential + batch_view(kept, grad) * unit
