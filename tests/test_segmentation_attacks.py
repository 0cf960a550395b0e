"""Attacks on dense outputs against a per-voxel linear model with a known worst case, and the papers' losses.

Known answer: a 1x1 convolution with 2 classes has per-voxel logit difference ``m_v = w . x_v + b``. Within a
Linf ball of radius eps (no bounds) voxel ``v`` can be flipped exactly when ``|m_v| <= eps ||w||_1``, each
voxel on its own, and the corner ``x_v - eps sign(m_v) sign(w)`` pushes every voxel furthest. With the clean
prediction as the label, every flip lowers the foreground Dice, so the worst Dice at eps is the Dice of the map
with every flippable voxel flipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.attacks import PGD, CosPGD, SegEnsemble, SegPGD, ThreatModel, dag_attack, pgd_attack
from medrobust.attacks.core.objectives import StepLoss
from medrobust.attacks.segmentation.dense import dense_targets
from medrobust.attacks.segmentation.losses import (
    cospgd_loss,
    cospgd_objective,
    cospgd_targeted_loss,
    segpgd_loss,
    segpgd_objective,
)
from medrobust.evaluation.suites import quick_suite, segmentation_suite
from medrobust.tasks import SegmentationTask
from test_universal_dag_corruptions import pixel_problem, slack


def segmentation_task(net: nn.Module, num_classes: int = 2, tau: float = 0.5) -> SegmentationTask:
    """The task (Dice + CE loss; correct while the mean foreground Dice is >= ``tau``) around ``net``, in eval mode."""
    return SegmentationTask(net, num_classes=num_classes, tau=tau).eval()


def hard_dice(pred, labels):
    """Foreground (class 1) Dice per sample ``(B,)``."""
    p, g = (pred == 1).flatten(1).double(), (labels == 1).flatten(1).double()
    return 2 * (p * g).sum(1) / (p.sum(1) + g.sum(1))


def linear_voxel_problem(spatial_dims, batch_size=4, seed=0):
    """A 1x1 convolution, 3 channels -> 2 classes; images ``(B, 3, *spatial)``; labels = the clean prediction."""
    g = torch.Generator().manual_seed(seed)
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(3, 2, 1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        conv.bias.copy_(0.3 * torch.randn(2, generator=g, dtype=torch.float64))
    spatial = (10, 12) if spatial_dims == 2 else (5, 6, 7)
    x = torch.randn((batch_size, 3, *spatial), generator=g, dtype=torch.float64)
    with torch.no_grad():
        labels = conv(x).argmax(1)
    return conv, x, labels


def worst_case(conv, x, eps):
    """The exact worst point (the corner) and the map with every flippable voxel flipped."""
    w = (conv.weight[1] - conv.weight[0]).detach().flatten()  # (C,)
    with torch.no_grad():
        logits = conv(x)
    m = logits[:, 1] - logits[:, 0]
    labels = logits.argmax(1)
    flipped = m.abs() <= eps * w.abs().sum()
    corner = x - eps * m.sign().unsqueeze(1) * w.sign().reshape(1, -1, *(1,) * (x.ndim - 2))
    return corner, torch.where(flipped, 1 - labels, labels)


def eps_values(conv, x):
    """Three eps: quartiles of the voxels' radii ``|m_v| / ||w||_1``."""
    w = (conv.weight[1] - conv.weight[0]).detach().flatten()
    with torch.no_grad():
        logits = conv(x)
    radii = (logits[:, 1] - logits[:, 0]).abs().flatten() / w.abs().sum()
    return [float(q) for q in radii.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))]


ATTACKS = {"pgd": lambda: PGD(steps=10), "segpgd": lambda: SegPGD(steps=10), "cospgd": lambda: CosPGD(steps=10),
           "ensemble": lambda: SegEnsemble(steps=10)}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_full_budget_reaches_the_exact_worst_dice(spatial_dims, name):
    conv, x, labels = linear_voxel_problem(spatial_dims)
    batch, task = {"label": labels}, segmentation_task(conv)
    attack = ATTACKS[name]().full_budget()
    torch.manual_seed(0)
    for eps in eps_values(conv, x):
        _, worst = worst_case(conv, x, eps)
        x_adv = attack(task, x, batch, task, eps=eps, bounds=None)
        assert (x_adv - x).abs().amax() <= eps * (1 + 1e-9)
        with torch.no_grad():
            pred = conv(x_adv).argmax(1)
        missed = (pred != worst).flatten(1).sum(1)
        assert (missed <= 2).all(), (name, eps, missed)  # within a voxel or two of the worst map...
        assert torch.allclose(hard_dice(pred, labels), hard_dice(worst, labels), atol=0.03)  # ...so of its Dice
        assert hard_dice(worst, labels).max() < 0.95  # the eps matter


@pytest.mark.parametrize("name", ["segpgd", "cospgd", "ensemble"])
def test_early_stop_fools_exactly_the_samples_whose_worst_dice_is_below_tau(name):
    conv, x, labels = linear_voxel_problem(2, batch_size=8, seed=1)
    eps = eps_values(conv, x)[1]
    _, worst = worst_case(conv, x, eps)
    worst_dice = hard_dice(worst, labels)
    tau = float(worst_dice.median()) + 1e-6  # the median sample and those below fall; the others cannot
    task, batch = segmentation_task(conv, tau=tau), {"label": labels}
    torch.manual_seed(0)
    x_adv = ATTACKS[name]()(task, x, batch, task, eps=eps, bounds=None)
    with torch.no_grad():
        fooled = ~task.is_correct(task(x_adv), batch)
    assert torch.equal(fooled, worst_dice < tau)
    assert 0 < int(fooled.sum()) < 8


def test_segmentation_suite_is_dense_only_and_fools_the_breakable_samples():
    conv, x, labels = linear_voxel_problem(3, batch_size=6, seed=2)
    eps = eps_values(conv, x)[1]
    _, worst = worst_case(conv, x, eps)
    worst_dice = hard_dice(worst, labels)
    tau = float(worst_dice.median()) + 1e-6
    task, batch = segmentation_task(conv, tau=tau), {"label": labels}
    suite = segmentation_suite(steps=5, queries=20)
    assert suite.requires == ("num_classes", "include_background") and quick_suite().requires == ()
    assert all(hasattr(task, member) for member in suite.requires)
    x_adv = suite(task, x, batch, task, eps=eps, bounds=None)
    with torch.no_grad():
        fooled = ~task.is_correct(task(x_adv), batch)
    assert torch.equal(fooled, worst_dice < tau)
    assert suite.stage_counts[0] == 6 and suite.stage_counts[1] == int((worst_dice >= tau).sum())


# ------------------------------------------------------------------------------ the papers' losses
LOGITS = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]],
                        [[0.0, 1.0], [0.4, 3.0]],
                        [[-1.0, 0.5], [0.6, -2.0]]]], dtype=torch.float64)  # (1, K=3, 2, 2)
LABELS = torch.tensor([[[0, 1], [1, 0]]])  # voxels 0, 1 right; (1, 0) predicted 2, (1, 1) predicted 1: wrong


def _ce(logits, labels):
    """Per-voxel cross-entropy ``(B, *spatial)``, written out: logsumexp minus the label's logit."""
    return torch.logsumexp(logits, 1) - logits.gather(1, labels.unsqueeze(1))[:, 0]


@pytest.mark.parametrize("step", [1, 3, 5])
def test_segpgd_loss_is_the_papers_formula(step):
    steps, logits = 5, LOGITS.clone().requires_grad_(True)
    lam = (step - 1) / (2 * steps)  # 0, 0.2, 0.4
    ce = _ce(logits, LABELS)[0]
    right = torch.tensor([[True, True], [False, False]])
    expected = ((1 - lam) * ce[right].sum() + lam * ce[~right].sum()) / 4
    objective = segmentation_task(nn.Identity(), num_classes=3)
    at_step = segpgd_objective(objective).at_step(step, steps)
    loss = at_step.attack_loss(logits, {"label": LABELS})
    # the value ranks points (the task's loss), the gradient is SegPGD's of this step
    assert torch.allclose(loss, objective.attack_loss(LOGITS, {"label": LABELS}).double())
    assert torch.allclose(segpgd_loss(logits, LABELS, lam), expected.reshape(1))
    (got,) = torch.autograd.grad(loss.sum(), logits)
    (want,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(got, want)


def test_cospgd_loss_is_the_papers_formula_untargeted_and_targeted():
    logits = LOGITS.clone().requires_grad_(True)
    one_hot = F.one_hot(LABELS, 3).movedim(-1, 1).double()
    cos = F.cosine_similarity(LOGITS.softmax(1), one_hot, dim=1)  # (1, 2, 2)
    expected = (cos * _ce(logits, LABELS)).mean()
    assert torch.allclose(cospgd_loss(logits, LABELS), expected.reshape(1))
    (got,) = torch.autograd.grad(cospgd_objective(segmentation_task(nn.Identity(), 3)).attack_loss(logits, {"label": LABELS}).sum(), logits)
    (want,) = torch.autograd.grad(expected, logits)  # the cosine is a constant: not differentiated
    assert torch.allclose(got, want)
    target = torch.tensor([[[2, 2], [0, 1]]])
    cos_t = F.cosine_similarity(LOGITS.softmax(1), F.one_hot(target, 3).movedim(-1, 1).double(), dim=1)
    assert torch.allclose(cospgd_targeted_loss(LOGITS, target), ((1 - cos_t) * _ce(LOGITS, target)).mean().reshape(1))


def test_pgd_climbs_the_loss_of_each_step_and_ranks_by_the_objective():
    conv, x, labels = linear_voxel_problem(2, batch_size=2)
    seen = []

    def recorded(out, batch, step, steps):
        seen.append((step, steps))
        return F.cross_entropy(out, batch["label"], reduction="none").flatten(1).mean(1)

    pgd_attack(conv, x, {"label": labels}, StepLoss(segmentation_task(conv), recorded), threat=ThreatModel("linf", 0.1, None),
               steps=4, early_stop=False)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


# ------------------------------------------------------------------------------ seed-001 targets
def test_structure_targets_swap_and_dilate_2d_and_3d():
    labels = torch.tensor([[[0, 0, 2, 2, 2],
                            [0, 1, 2, 2, 2],
                            [0, 1, 1, 2, 2]]])
    logits = torch.zeros(1, 3, 3, 5)
    swapped = dense_targets("swap:1,2", logits, labels, None)
    assert torch.equal(swapped, torch.where(labels == 1, 2, torch.where(labels == 2, 1, labels)))
    grown = torch.tensor([[[0, 0, 1, 2, 2],
                           [0, 1, 1, 1, 2],
                           [0, 1, 1, 1, 2]]])
    assert torch.equal(dense_targets("dilate:1,2", logits, labels, None), grown)  # 1 grows into 2, not into 0
    assert torch.equal(dense_targets("dilate:1,2,3", logits, labels, None), torch.where(labels == 2, 1, labels))
    cube = torch.full((1, 5, 5, 5), 2)
    cube[0, 2, 2, 2] = 1
    grown_3d = dense_targets("dilate:1,2", torch.zeros(1, 3, 5, 5, 5), cube, None)
    assert int((grown_3d == 1).sum()) == 27 and bool((grown_3d[0, 1:4, 1:4, 1:4] == 1).all())
    for target, message in [("swap:1,1", "twice"), ("dilate:1,2,0", "radius"), ("swap:1", "swap:<a>,<b>")]:
        with pytest.raises(ValueError, match=message):
            CosPGD(target=target)
    with pytest.raises(ValueError, match=r"\[0, 3\).*got values in \[1, 7\]"):
        dense_targets("swap:1,7", logits, labels, None)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("attack", ["dag", "cospgd"])
def test_swap_targets_move_exactly_the_two_structures_within_reach(spatial_dims, attack):
    model, x, labels = pixel_problem(spatial_dims)  # 3 classes, per-pixel linear
    eps, target = 0.2, "swap:0,1"
    goal = dense_targets(target, torch.zeros(1, 3, 1, 1), labels, None)
    if attack == "dag":
        x_adv = dag_attack(model, x, {"label": labels}, threat=ThreatModel("linf", eps, None), target=target)
    else:
        torch.manual_seed(0)
        task = segmentation_task(model, num_classes=3)
        x_adv = CosPGD(steps=20, target=target).full_budget()(task, x, {"label": labels}, task, eps=eps, bounds=None)
    assert (x_adv - x).abs().amax() <= eps * (1 + 1e-9)
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    room = slack(model, x, labels, eps, None).gather(1, goal.unsqueeze(1))[:, 0]
    attacked = goal != labels
    assert (pred[attacked & (room > 0.02)] == goal[attacked & (room > 0.02)]).all()  # within reach: swapped
    assert (pred[attacked & (room < 0)] == labels[attacked & (room < 0)]).all()  # beyond reach: untouched
    assert torch.equal(pred[~attacked], labels[~attacked])  # the third structure stays


@pytest.mark.parametrize("make", [lambda: SegPGD("l2", steps=5), lambda: CosPGD("l2", steps=5),
                                  lambda: SegEnsemble("l2", steps=5, losses=["segpgd", "margin"])])
def test_l2_stays_in_ball_and_bounds_and_leaves_the_model_as_it_was(make):
    conv, x, labels = linear_voxel_problem(2, batch_size=3)
    model = nn.Sequential(conv, nn.BatchNorm2d(2).double(), nn.Dropout(0.2))
    task = segmentation_task(model).train()
    x = x.sigmoid()  # inside the (0, 1) bounds
    stats = model[1].running_mean.clone()
    x_adv = make()(task, x, {"label": labels}, task, eps=2.0, bounds=(0.0, 1.0))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 2.0 * (1 + 1e-9)).all()
    assert task.training and model[1].training and model[2].training
    assert torch.equal(model[1].running_mean, stats) and all(p.grad is None for p in model.parameters())
