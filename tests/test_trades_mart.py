"""TRADES and MART: the tasks' output divergences and both losses against hand computations, TRADES' inner attack
climbing the divergence, seeded random starts, and one tiny fit per task config (MART: classifiers only)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.attacks import PGD
from medrobust.callbacks import AdversarialTraining
from medrobust.defenses import MART, TRADES, Adversary
from medrobust.defenses.mart import wrong_class_boost
from medrobust.defenses.trades import CLEAN_OUTPUT_KEY, divergence_objective
from medrobust.tasks.landmark_heatmaps import js_divergence
from medrobust.runner import build_callbacks, build_data_and_module, build_trainer
from medrobust.tasks import ClassificationTask, LandmarkTask, RegressionTask, SegmentationTask
from conftest import compose_config

# defences log through the module; called here without a trainer, Lightning warns that nothing is logged
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")



class FixedAttack:
    """A stand-in attack returning given points; records the objective and batch it was given."""

    name = "fixed"

    def __init__(self, x_adv: torch.Tensor) -> None:
        self.x_adv = x_adv

    def __call__(self, model, x, batch, objective, *, eps, bounds):
        self.objective, self.batch = objective, batch
        return self.x_adv


def _logit_classifier(num_classes: int) -> ClassificationTask:
    """A classifier whose "images" ``(B, 1, K)`` are its logits: losses by hand need no network."""
    return ClassificationTask(nn.Flatten(), num_classes=num_classes, input_bounds=(-10.0, 10.0)).train()


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(z) for z in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# -- the tasks' output divergences ---------------------------------------------------------------------------
def _divergence_cases():
    """(task module, one output, the batch): each output kind the contract has."""
    torch.manual_seed(0)
    regression = RegressionTask(nn.Identity(), target_mean=50.0, target_std=10.0)
    landmarks = LandmarkTask(nn.Identity(), num_landmarks=2)
    points = {"landmarks": torch.rand(2, 2, 2) * 5, "spacing": torch.tensor([[0.5, 1.0], [2.0, 1.0]])}
    return {
        "class_logits": (ClassificationTask(nn.Identity(), num_classes=3), torch.randn(4, 3),
                         {"label": torch.tensor([0, 1, 2, 0])}),
        "voxel_logits": (SegmentationTask(nn.Identity(), num_classes=3), torch.randn(2, 3, 4, 5, 6),
                         {"label": torch.randint(0, 3, (2, 4, 5, 6))}),
        "prediction": (regression, torch.randn(4, 1), {"label": torch.rand(4) * 80}),
        "heatmaps": (landmarks, torch.randn(2, 2, 6, 6), points),
        "coordinates": (landmarks, torch.rand(2, 2, 2) * 5, points),
    }


@pytest.mark.parametrize("case", list(_divergence_cases()))
def test_output_divergence_is_zero_exactly_at_the_clean_output_and_positive_elsewhere(case):
    task, output, batch = _divergence_cases()[case]
    at_clean = task.output_divergence(output, output.clone(), batch)
    assert at_clean.shape == (len(output),) and torch.equal(at_clean, torch.zeros(len(output)))
    moved = task.output_divergence(output, output + 0.3 * torch.randn_like(output), batch)
    assert moved.shape == (len(output),) and bool((moved > 0).all())


def test_class_divergence_and_its_gradient_match_the_hand_computation():
    task = ClassificationTask(nn.Identity(), num_classes=2)
    clean, adversarial = [0.3, -0.2], [1.0, 0.5]
    z_adv = torch.tensor([adversarial], requires_grad=True)
    divergence = task.output_divergence(torch.tensor([clean]), z_adv, {})
    p, q = _softmax(clean), _softmax(adversarial)
    assert divergence.item() == pytest.approx(_kl(p, q), rel=1e-5)
    (grad,) = torch.autograd.grad(divergence.sum(), z_adv)  # d/dz' KL(p || softmax(z')) = softmax(z') - p
    assert grad[0].tolist() == pytest.approx([q[0] - p[0], q[1] - p[1]], abs=1e-6)


def test_regression_and_landmark_divergences_match_the_hand_computation():
    regression, output, batch = _divergence_cases()["prediction"]
    moved = output + torch.tensor([[0.1], [-0.2], [0.0], [1.5]])
    expected = torch.tensor([0.1, -0.2, 0.0, 1.5]) ** 2  # the standardised output's change, squared
    assert torch.allclose(regression.output_divergence(output, moved, batch), expected, atol=1e-6)
    landmarks, coords, points = _divergence_cases()["coordinates"]
    shift = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, 0.0]]])  # voxels
    mm = shift * points["spacing"][:, None, :]  # (0.5, 0, 0, 2) and (2, 1, 0, 0) mm
    weight = landmarks.coord_weight  # in the loss's units: its weight per mm
    assert torch.allclose(landmarks.output_divergence(coords, coords + shift, points),
                          weight * mm.square().mean(dim=(1, 2)))
    assert landmarks.output_divergence(coords, coords + shift, points).tolist() == pytest.approx(
        [weight * 4.25 / 4, weight * 5 / 4])


def test_the_landmark_heatmap_divergence_adds_the_maps_js_weighted_as_in_the_loss():
    landmarks, heatmaps, points = _divergence_cases()["heatmaps"]
    moved = heatmaps + torch.randn_like(heatmaps)
    clean, adversarial = landmarks.coordinates(heatmaps), landmarks.coordinates(moved)
    mm = (adversarial - clean) * points["spacing"][:, None, :]
    maps = js_divergence(landmarks.log_probs(heatmaps), landmarks.log_probs(moved)).mean(dim=1)
    expected = landmarks.coord_weight * mm.square().mean(dim=(1, 2)) + landmarks.heatmap_weight * maps
    assert torch.allclose(landmarks.output_divergence(heatmaps, moved, points), expected, atol=1e-6)


# -- TRADES --------------------------------------------------------------------------------------------------
def test_trades_loss_is_the_clean_loss_plus_beta_times_the_divergence():
    module, beta = _logit_classifier(3), 2.5
    clean_logits = [[1.0, 2.0, 0.0], [0.5, 0.0, -1.0]]
    adv_logits = [[1.5, 1.0, 0.2], [0.0, 0.4, -0.5]]
    batch = {"image": torch.tensor(clean_logits)[:, None], "label": torch.tensor([0, 2])}
    attack = FixedAttack(torch.tensor(adv_logits)[:, None])
    loss = TRADES(beta=beta, start_std=None)(module, batch, Adversary(attack, module, 0.1))

    ce = [-math.log(_softmax(z)[y]) for z, y in zip(clean_logits, [0, 2])]
    kl = [_kl(_softmax(c), _softmax(a)) for c, a in zip(clean_logits, adv_logits)]
    assert loss.item() == pytest.approx(sum(ce) / 2 + beta * sum(kl) / 2, rel=1e-5)
    # the attack climbed the divergence from the clean output the batch carries, judged by the task
    assert torch.allclose(attack.batch[CLEAN_OUTPUT_KEY], torch.tensor(clean_logits))
    at_clean = attack.objective.attack_loss(torch.tensor(clean_logits), attack.batch)
    assert torch.equal(at_clean, torch.zeros(2)) and attack.objective.base is module


def _segmenter() -> SegmentationTask:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))
    return SegmentationTask(net, num_classes=3, input_bounds=(0.0, 1.0)).train()


def _classifier() -> ClassificationTask:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return ClassificationTask(net, num_classes=3, input_bounds=(0.0, 1.0)).train()


@pytest.mark.parametrize("build", [_classifier, _segmenter], ids=["classification", "segmentation"])
def test_trades_inner_attack_climbs_the_divergence_from_its_small_random_start(build):
    module, eps, std = build(), 0.05, 0.001
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 6, 6, generator=generator)
    label = torch.randint(0, 3, (4,) if isinstance(module, ClassificationTask) else (4, 6, 6), generator=generator)
    batch = {"image": x, "label": label}
    adversary = Adversary(PGD(steps=5, early_stop=False), module, eps)
    torch.manual_seed(2)
    x_adv = TRADES(start_std=std).adversarial_images(module, batch, adversary)
    torch.manual_seed(2)  # the same draw: the attack's start, moved into the ball and the bounds
    start = torch.minimum(torch.maximum(x + std * torch.randn_like(x), x - eps), x + eps).clamp(0, 1)

    assert module.training and (x_adv - x).abs().max() <= eps + 1e-6  # modes restored, inside the ball
    with torch.no_grad():  # divergences as the attack sees them: BatchNorm on running statistics
        module.eval()
        clean = {**batch, CLEAN_OUTPUT_KEY: module(x)}
        objective = divergence_objective(module)
        at_start, at_adv = (objective.attack_loss(module(z), clean) for z in (start, x_adv))
    assert bool((at_adv > 10 * at_start.abs()).all()) and bool((at_adv > 1e-5).all())  # KL rounds to +-1e-7


def test_trades_random_start_follows_the_callbacks_seed_per_batch():
    """The start is drawn inside the callback's per-(seed, epoch, batch, rank) seeding: a resumed run, which
    restores no defence state (TRADES has none), draws what the uninterrupted run drew."""
    module, generator = _classifier(), torch.Generator().manual_seed(3)
    batch = {"image": torch.rand(4, 1, 6, 6, generator=generator), "label": torch.tensor([0, 1, 2, 1])}
    callback = AdversarialTraining(PGD(steps=1, early_stop=False), eps=0.05, defense=TRADES(), seed=7)
    losses, state = [], copy.deepcopy(module.state_dict())
    for batch_idx in (0, 0, 1):
        module.load_state_dict(state)  # the BatchNorm statistics the previous training forward moved
        callback._batch_idx = batch_idx
        losses.append(callback.objective(module, batch).item())
    assert losses[0] == losses[1] != losses[2]
    assert callback.state_dict()["defense"] == {} == MART().state_dict()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"beta": -1.0}, "adv.defense.beta must be a number >= 0, got -1.0"),
    ({"start_std": 0.0}, "adv.defense.start_std must be a number > 0 (model units) or null"),
])
def test_trades_rejects_bad_settings_naming_the_key(kwargs, message):
    with pytest.raises(ValueError) as info:
        TRADES(**kwargs)
    assert message in str(info.value)


# -- MART ----------------------------------------------------------------------------------------------------
def test_mart_loss_equals_the_hand_computation():
    module, lam = _logit_classifier(3), 5.0
    clean_logits = [[1.0, 2.0, 0.0], [0.5, 0.0, -1.0]]
    adv_logits = [[0.2, 1.0, 1.5], [0.0, 0.4, -0.5]]
    labels = [0, 2]
    batch = {"image": torch.tensor(clean_logits)[:, None], "label": torch.tensor(labels)}
    attack = FixedAttack(torch.tensor(adv_logits)[:, None])
    loss = MART(lam=lam)(module, batch, Adversary(attack, module, 0.1))

    total = 0.0
    for clean, adv, y in zip(clean_logits, adv_logits, labels):
        p, q = _softmax(clean), _softmax(adv)
        strongest_wrong = max(qk for k, qk in enumerate(q) if k != y)
        total += -math.log(q[y]) - math.log(1 - strongest_wrong) + lam * _kl(p, q) * (1 - p[y])
    assert loss.item() == pytest.approx(total / 2, rel=1e-5)
    assert attack.objective is module  # the inner attack climbs the task's own loss (the CE)


def test_mart_boost_is_the_ce_with_two_classes_and_finite_when_saturated():
    logits, label = torch.tensor([[0.3, -1.2], [2.0, 0.5]]), torch.tensor([1, 0])
    assert torch.allclose(wrong_class_boost(logits, label), F.cross_entropy(logits, label, reduction="none"))
    saturated = wrong_class_boost(torch.tensor([[0.0, 200.0, 0.0]]), torch.tensor([0]))  # p_1 rounds to 1
    assert saturated.item() == pytest.approx(200.0 - math.log(2), rel=1e-6)


# -- every task config ---------------------------------------------------------------------------------------
def _fit(overrides: list[str], tmp_path):
    cfg = compose_config("train", [*overrides, "eval=none"], tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    trainer.fit(module, datamodule=datamodule)
    return cfg, trainer


# every task trains with adv=trades in tests/test_contract.py; here one per kind of divergence, its terms looked at
@pytest.mark.parametrize("task", ["lidc", "brainseg", "brainage", "afids"])
def test_trades_fits_one_tiny_epoch_with_finite_terms(tiny_for, task, tmp_path):
    cfg, trainer = _fit([*tiny_for(task), "adv=trades"], tmp_path)
    assert cfg.adv.attack.early_stop is False and cfg.adv.defense.beta == 6.0
    assert trainer.state.finished
    for key in ("train/trades/clean_loss", "train/trades/divergence"):
        assert torch.isfinite(trainer.callback_metrics[key])


def test_mart_fits_a_classifier_and_refuses_a_regressor_at_setup(tiny_for, tmp_path):
    _, trainer = _fit([*tiny_for("lidc"), "adv=mart"], tmp_path / "lidc")
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics["train/mart/kl"])
    with pytest.raises(TypeError, match=r"AdversarialTraining \(mart\) needs a task module with `outputs_logits`; "
                                        r"BrainAgeTask declares it False"):
        _fit([*tiny_for("brainage"), "adv=mart"], tmp_path / "brainage")


def test_requires_counts_declared_capabilities_by_value_and_other_members_by_presence():
    """``outputs_logits = False`` (a declared capability) lacks what MART needs; ``include_background = False`` (a
    setting) is still there for the attacks that read it."""
    from medrobust.tasks.base import lacking

    class Dense:
        outputs_logits = False
        include_background = False

    assert lacking(Dense, ("outputs_logits", "include_background", "prediction")) == ["outputs_logits", "prediction"]
