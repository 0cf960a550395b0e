"""Splits and sampling of classification data: patient-level, label-stratified splits; class-balanced training draws."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medrobust.data.patches import stable_seed
from medrobust.datamodules.base import SPLITS, EpochShuffle

IMBALANCE_WARNING = 5.0  # largest / smallest class of the training split above this: a warning


def split_groups(groups: Sequence[str], labels: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per sample; every group (patient) goes whole to one split.

    Groups are ordered by stratum -- the rarest class (in the whole data) among the group's samples, rarest stratum
    first -- shuffled by ``seed`` within a stratum, and each goes to the split furthest below its share of the samples
    seen so far (as brain age's :func:`~medrobust.datamodules.brainage.split_subjects` walks its age strata): every
    split follows the class mix as closely as whole patients allow. When only as many groups are left as asked-for
    splits (fraction > 0) are still empty, each of those gets one.
    """
    names, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    labels = np.asarray(labels, dtype=np.int64)
    frequency = np.bincount(labels)
    sizes = np.bincount(inverse, minlength=len(names))
    stratum = np.full(len(names), -1)
    for g, label in zip(inverse, labels):  # the group's rarest class
        if stratum[g] < 0 or frequency[label] < frequency[stratum[g]]:
            stratum[g] = label
    rng = np.random.default_rng(stable_seed("classify-split", seed))
    strata = sorted(set(stratum.tolist()), key=lambda s: (frequency[s], s))
    order = np.concatenate([rng.permutation(np.flatnonzero(stratum == s)) for s in strata])
    fractions = np.asarray(fractions, dtype=np.float64)
    asked = fractions > 0
    per_group, filled, seen = np.full(len(names), -1), np.zeros(3), 0
    for left, g in zip(range(len(order), 0, -1), order):
        seen += sizes[g]
        deficit = np.where(asked, fractions * seen - filled, -np.inf)
        empty = asked & (filled == 0)
        if left <= empty.sum():
            deficit = np.where(empty, deficit, -np.inf)
        k = int(np.argmax(deficit))
        per_group[g], filled[k] = k, filled[k] + sizes[g]
    return per_group[inverse]


def assign_splits(fixed: Sequence[str], groups: Sequence[str], labels: np.ndarray, fractions: Sequence[float],
                  seed: int) -> np.ndarray:  # fmt: skip
    """Split index per sample: a fixed split (``train`` / ``val`` / ``test``) as given; the others (``""``) by
    :func:`split_groups` among the splits that no fixed sample names, their ``fractions`` renormalised (CBIS-DDSM:
    the published test split fixed, val carved from train by patient)."""
    fixed = np.asarray(fixed, dtype=str)
    assign = np.array([SPLITS.index(s) if s else -1 for s in fixed.tolist()], dtype=np.int64)
    free = np.flatnonzero(assign < 0)
    if len(free):
        taken = {int(k) for k in assign[assign >= 0]}
        share = np.array([0.0 if k in taken else f for k, f in enumerate(fractions)])
        if share.sum() <= 0:
            named = sorted(SPLITS[k] for k in taken)
            raise ValueError(f"data.split {list(fractions)}: the table fixes the splits {named}, leaving no fraction "
                             f"for its {len(free)} rows without a split")  # fmt: skip
        assign[free] = split_groups(np.asarray(groups)[free], np.asarray(labels)[free], share / share.sum(), seed)
    return assign


def count_classes(labels: np.ndarray, n_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).tolist()


def describe_counts(counts: Sequence[int], class_names: Sequence[str]) -> str:
    """``"benign 12, malignant 8"``."""
    return ", ".join(f"{name} {n}" for name, n in zip(class_names, counts))


def imbalance(counts: Sequence[int]) -> float:
    """Largest over smallest class count (inf with an empty class)."""
    return max(counts) / min(counts) if min(counts) > 0 else float("inf")


class BalancedEpochSampler(EpochShuffle):
    """``n`` draws with replacement, each class equally likely (sample weight ``1 / count`` of its class), drawn
    from ``(seed, epoch)`` alone like :class:`~medrobust.datamodules.base.EpochShuffle`: a resumed run draws what
    the uninterrupted one drew. Under DDP, Lightning wraps it in its ``DistributedSamplerWrapper``, which forwards
    ``set_epoch`` and deals this one list of draws (the same in every process) out among the processes."""

    def __init__(self, labels: np.ndarray, seed: int) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        super().__init__(len(labels), seed)
        self.weights = torch.as_tensor(1.0 / np.bincount(labels)[labels], dtype=torch.float64)

    def __iter__(self):
        generator = torch.Generator().manual_seed(stable_seed("balanced", self.seed, self.epoch))
        return iter(torch.multinomial(self.weights, self.n, replacement=True, generator=generator).tolist())
