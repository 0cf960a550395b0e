"""JSMA's saliency maps: which input values to send to a bound next.

A *move* sends one input value to one of its bounds: moves ``0 .. N-1`` raise value ``i`` to ``high`` (the
paper's theta = +1), moves ``N .. 2N-1`` lower it to ``low`` (theta = -1). Its first-order effect on a scalar
``s`` is ``ds/dx_i * (bound - x_i)``. Values already changed, or sitting on that bound, offer no move. The
paper's images start near 0 and move to 1, where gradient and effect agree; medical images start anywhere in
their range, so the room to the bound weighs in.

- classifiers: the paper's map on the target's logit ``Z_t`` (``a``: the effect on ``Z_t``) and the other logits
  (``b``: on ``sum_{j != t} Z_j``): a move, or a pair of moves, is admissible where ``a > 0`` and ``b < 0``, scored
  ``a * |b|``. Pairs are the paper's; each of its two moves may go either way (its increasing and decreasing maps
  at once, and mixed pairs). Where nothing is admissible (a zero row of ``W``, saturated logits) the largest
  ``a - b`` is taken instead, the first-order gain of ``Z_t`` over the others; where even that is <= 0 the
  sample is stuck;
- any other task: the move of largest effect on the task's ``attack_loss`` (``|grad| x room``), then the next.
"""

from __future__ import annotations

import torch
from torch import Tensor


def move_room(values: Tensor, low: float, high: float, changed: Tensor) -> Tensor:
    """How far each move ``(n, 2N)`` goes from ``values`` ``(n, N)``: 0 where not allowed (changed, on the bound)."""
    room = torch.cat([high - values, values - low], dim=1).clamp_min(0)
    return room.masked_fill(torch.cat([changed, changed], dim=1), 0)


def move_effects(grad: Tensor, room: Tensor) -> Tensor:
    """First-order effect ``(n, 2N)`` of each move on a scalar with input gradient ``grad`` ``(n, N)``."""
    return torch.cat([grad, -grad], dim=1) * room


def _best(primary: Tensor, fallback: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the index of the largest ``primary`` score where any is > 0, else of the largest ``fallback``;
    and whether that score is > 0 ``(n,)``. Scores are ``-inf`` where not allowed."""
    use_primary = (primary > 0).any(dim=1, keepdim=True)
    value, index = torch.where(use_primary, primary, fallback).max(dim=1)
    return index, value > 0


def _scores(a: Tensor, b: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's score ``a * |b|`` where admissible (``a > 0``, ``b < 0``) and the fallback ``a - b``."""
    none = torch.tensor(float("-inf"), dtype=a.dtype, device=a.device)
    return torch.where(allowed & (a > 0) & (b < 0), -a * b, none), torch.where(allowed, a - b, none)


def _pair(a: Tensor, b: Tensor, allowed: Tensor, values: int, candidates: int) -> tuple[Tensor, Tensor]:
    """The best pair of moves ``(n, 2)`` among the ``candidates`` moves of largest ``|a|`` (the paper searches all
    pairs, O(N^2)), the move of larger gain ``a - b`` first; and whether one was found ``(n,)``."""
    k = min(candidates, a.shape[1])
    top = torch.where(allowed, a.abs(), -1.0).topk(k, dim=1).indices
    a_k, b_k, ok = a.gather(1, top), b.gather(1, top), allowed.gather(1, top)
    feature = top % values
    upper = torch.ones(k, k, dtype=torch.bool, device=a.device).triu(1)  # each unordered pair once
    pairable = ok[:, :, None] & ok[:, None, :] & (feature[:, :, None] != feature[:, None, :]) & upper
    index, found = _best(*(s.flatten(1) for s in _scores(a_k[:, :, None] + a_k[:, None, :],
                                                         b_k[:, :, None] + b_k[:, None, :], pairable)))
    pair = torch.stack([top.gather(1, (index // k)[:, None])[:, 0], top.gather(1, (index % k)[:, None])[:, 0]], 1)
    gain = (a - b).gather(1, pair)
    return torch.where((gain[:, 1] > gain[:, 0])[:, None], pair.flip(1), pair), found


def logit_moves(a: Tensor, b: Tensor, allowed: Tensor, per_step: int, candidates: int) -> tuple[Tensor, Tensor]:
    """A classifier's next ``per_step`` moves ``(n, per_step)`` and which to take ``(n, per_step)``: the best pair,
    or the best single move where no pair is found (a lone allowed value)."""
    single, single_found = _best(*_scores(a, b, allowed))
    if per_step == 1:
        return single[:, None], single_found[:, None]
    pair, pair_found = _pair(a, b, allowed, a.shape[1] // 2, candidates)
    moves = torch.where(pair_found[:, None], pair, single[:, None].expand(-1, 2))
    return moves, torch.stack([pair_found | single_found, pair_found], dim=1)


def loss_moves(gain: Tensor, allowed: Tensor, per_step: int) -> tuple[Tensor, Tensor]:
    """Any task's next moves ``(n, per_step)``, largest effect on its loss first, and which to take: those that
    raise it (two such moves are never one value's two directions: their gradients would differ in sign)."""
    value, moves = torch.where(allowed, gain, float("-inf")).topk(per_step, dim=1)
    return moves, value > 0
