"""Targeted attacks against a linear multi-class model whose exact minimal perturbation to each target is an LP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from torch import nn

from medrobust.attacks import FMN, PGD, ClassifierObjective, Targeted, TargetedObjective, minimal_perturbation, pgd
from medrobust.attacks import pick_targets
from medrobust.attacks.core.threat import lp_norm
from test_minimal_norm import linear_multiclass

K, SHAPE = 4, (10, 2, 3, 3)


def problem():
    """A linear 4-class model (as the minimum-norm tests use), its weights and clean logits, and per sample
    the least likely class as the target: several boundaries away, not just the runner-up."""
    model, x, labels, _ = linear_multiclass(SHAPE, k=K)
    with torch.no_grad():
        logits = model(x)
    return model, model[1].weight.detach().numpy(), x, logits.numpy(), labels, logits.argmin(1)


def exact_radius(weight, logits, target, norm) -> float:
    """min ||delta|| such that logit t >= every other logit at x + delta: an LP (Linf, L1) or a QP (L2)."""
    others = [j for j in range(K) if j != target]
    a = np.stack([weight[j] - weight[target] for j in others])  # a @ delta <= z_t - z_j
    b = np.array([logits[target] - logits[j] for j in others])
    d = weight.shape[1]
    if norm == "linf":  # variables (delta, s): min s, |delta_i| <= s
        eye = np.eye(d)
        a_ub = np.block([[a, np.zeros((len(b), 1))], [eye, -np.ones((d, 1))], [-eye, -np.ones((d, 1))]])
        cost = np.r_[np.zeros(d), 1.0]
        return linprog(cost, A_ub=a_ub, b_ub=np.r_[b, np.zeros(2 * d)], bounds=(None, None)).fun
    if norm == "l1":  # delta = p - n, p, n >= 0: min sum(p + n)
        return linprog(np.ones(2 * d), A_ub=np.hstack([a, -a]), b_ub=b, bounds=(0, None)).fun
    constraint = {"type": "ineq", "fun": lambda v: b - a @ v}
    return float(np.linalg.norm(minimize(lambda v: float(v @ v), np.zeros(d), constraints=[constraint],
                                         method="SLSQP", options={"ftol": 1e-14, "maxiter": 500}).x))


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_targeted_fmn_and_pgd_against_the_exact_radius_to_the_target(norm):
    torch.manual_seed(0)
    model, weight, x, logits, labels, targets = problem()
    radius = torch.tensor([exact_radius(weight, logits[i], int(targets[i]), norm) for i in range(len(x))],
                          dtype=torch.float64)
    # FMN in L1 converges slowest (up to 5 % off after 100 steps on this problem, 0.8 % after 300)
    norms = minimal_perturbation(model, x, labels, norm=norm, bounds=None, targets=targets,
                                 steps=300 if norm == "l1" else 100)
    ratio = norms / radius
    assert (ratio >= 1 - 1e-6).all() and (ratio <= 1.02).all(), ratio
    # PGD on -CE(target): the nearest point where t wins is a vertex of several boundaries; within 10 %
    above = pgd(model, x, labels, eps=1.1 * radius, norm=norm, bounds=None, targets=targets, early_stop=True)
    with torch.no_grad():
        assert torch.equal(model(above).argmax(1), targets)  # every sample now predicts its target
        below = pgd(model, x, labels, eps=0.95 * radius, norm=norm, steps=50, bounds=None, targets=targets)
        assert not (model(below).argmax(1) == targets).any()
    assert (lp_norm(above - x, norm) <= 1.1 * radius * (1 + 1e-9)).all()


def test_targeted_wrapper_picks_targets_and_leaves_samples_already_there():
    torch.manual_seed(0)
    model, _, x, logits, labels, least = problem()
    batch = {"label": labels}
    logits = torch.as_tensor(logits)
    assert torch.equal(pick_targets(logits, labels, "least_likely"), least)
    runner_up = logits.scatter(1, labels[:, None], float("-inf")).argmax(1)
    assert torch.equal(pick_targets(logits, labels, "runner_up"), runner_up)
    fixed = Targeted(PGD(steps=20), target=2)
    assert fixed.name == "pgd20-to-class2" and Targeted(PGD(), "least_likely").name == "pgd10-to-least-likely"
    x_adv = fixed(model, x, batch, ClassifierObjective(), eps=5.0, bounds=None)
    at_target = labels == 2
    assert torch.equal(x_adv[at_target], x[at_target])  # already predicting the target: untouched
    with torch.no_grad():
        assert (model(x_adv[~at_target]).argmax(1) == 2).all()  # a large eps reaches the target
    # binary: the only other class, whatever the rule
    binary = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert torch.equal(pick_targets(binary, torch.tensor([0, 1]), "least_likely"), torch.tensor([1, 0]))


def test_targeted_arguments_and_batches_are_checked():
    logits, labels = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)
    for target, message in ((4, r"\[0, 4\).*4"), ("likeliest", "likeliest"), (1.5, "1.5")):
        with pytest.raises(ValueError, match=message):
            pick_targets(logits, labels, target)
    with pytest.raises(ValueError, match="likeliest"):
        Targeted(PGD(), target="likeliest")
    with pytest.raises(KeyError, match="'target'.*label"):
        TargetedObjective().attack_loss(logits, {"label": labels})
    objective = TargetedObjective()
    batch = {"target": torch.tensor([0, 1, 2])}
    reached = torch.tensor([[3.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2]])  # reached, reached, not yet
    assert objective.is_correct(reached, batch).tolist() == [False, False, True]
    assert torch.equal(objective.correct_margin(reached, batch) > 0, objective.is_correct(reached, batch))


def test_fmn_class_accepts_a_targeted_objective():
    model, weight, x, logits, labels, targets = problem()
    batch = {"label": labels, "target": targets}
    _, norms = FMN("l2").minimal(model, x, batch, TargetedObjective(), bounds=None)
    radius = torch.tensor([exact_radius(weight, logits[i], int(targets[i]), "l2") for i in range(len(x))],
                          dtype=torch.float64)
    assert ((norms / radius - 1).abs() <= 0.02).all()


def test_a_wrong_sample_whose_label_is_the_target_is_never_corrected():
    model = nn.Sequential(nn.Flatten(), nn.Identity())  # logits = the 3 inputs
    x = torch.tensor([[[0.4, 0.6, 0.1]], [[0.2, 0.7, 0.1]]])
    labels = torch.tensor([0, 1])  # sample 0 is wrong (predicts 1); sample 1 is right
    x_adv = Targeted(PGD(steps=20), target=0)(model, x, {"label": labels}, ClassifierObjective(), eps=0.3, bounds=None)
    assert torch.equal(x_adv[0], x[0])  # aiming it at its own label would fix the model's error
    assert model(x_adv[1:]).argmax(1).item() == 0  # the other one is pushed to the target
    margin = TargetedObjective().correct_margin(model(x), {"label": labels, "target": torch.tensor([0, 0])})
    assert margin[0] == 0 and margin[1] > 0  # "already there" for the minimum-norm attacks: radius 0


def test_targets_come_from_eval_mode_without_moving_batch_norm_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 3)).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x, labels = torch.rand(5, 1, 4, 4), torch.randint(0, 3, (5,))
    Targeted(PGD(steps=2))(net, x, {"label": labels}, ClassifierObjective(), eps=0.05, bounds=(0.0, 1.0))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items()) and net.training


def test_attacks_on_their_own_loss_and_regression_labels_are_refused():
    from medrobust.attacks import APGD

    with pytest.raises(ValueError, match="apgd.*'ce'.*loss='default'"):
        Targeted(APGD())
    assert Targeted(APGD(loss="default")).name == "apgd-to-least-likely"
    with pytest.raises(ValueError, match=r"integer class labels.*61.5"):
        pick_targets(torch.randn(3, 1), torch.tensor([61.5, 70.2, 45.0]), "least_likely")
    assert Targeted.requires == ("num_classes",)
