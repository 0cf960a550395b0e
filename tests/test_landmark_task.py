"""The landmark task, its metrics and decoding on known answers: MRE / SDR / per-landmark errors with anisotropic
spacing, soft-argmax of sub-voxel Gaussians, seed 004's tau (Huber) from a real validation and through a checkpoint,
the margin, PGD's exact worst case on a model with linear coordinates; the configs and tiny runs."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from medrobust.attacks import PGD
from medrobust.datamodules.landmark_info import landmark_info
from medrobust.reporting.examples import save_example_grid
from medrobust.reporting.points import PointSet
from medrobust.tasks import LandmarkTask
from medrobust.tasks.base import compute_metrics, metric_collection
from medrobust.tasks.landmark_heatmaps import gaussian_js_divergence, gaussian_log_targets, js_divergence, soft_argmax
from medrobust.tasks.landmark_metrics import (LandmarkTarget, huber_location_scale, landmark_metrics, loss_threshold,
                                              per_landmark_errors)

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def _heatmap_net(dims: int, k: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return CONV[dims](1, k, 3, padding=1)


# -- metrics --------------------------------------------------------------------------------------------
def test_metrics_against_hand_computed_values_with_anisotropic_spacing():
    # sample 0 spacing (0.5, 2.0) mm: voxel offsets (6, 2) -> (3, 4) mm = 5 mm; (0, 1) -> 2 mm; (5, 0) -> 2.5 mm
    # sample 1 spacing (1, 1) mm: (3, 0) -> 3 mm; exact -> 0; (2.4, 3.2) -> 4 mm
    true = torch.tensor([[[10.0, 10.0], [20.0, 5.0], [7.0, 7.0]], [[4.0, 4.0], [8.0, 8.0], [1.0, 2.0]]])
    offsets = torch.tensor([[[6.0, 2.0], [0.0, 1.0], [5.0, 0.0]], [[3.0, 0.0], [0.0, 0.0], [2.4, 3.2]]])
    spacing = torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    pred = true + offsets
    reference = pred + torch.tensor([1.0, 0.0])  # one voxel along the first axis: 0.5 mm, then 1 mm
    metrics = metric_collection({**landmark_metrics(), **per_landmark_errors(["AC", "PC", "GENU"])})
    target = LandmarkTarget(true, spacing, torch.tensor([0.1, 0.2]), torch.tensor([True, False]))
    metrics.update(torch.stack([pred, reference], 1), target)
    values = {name: value.item() for name, value in compute_metrics(metrics).items()}
    assert values["mre"] == pytest.approx((5 + 2 + 2.5 + 3 + 0 + 4) / 6)
    assert values["sdr_2mm"] == pytest.approx(2 / 6)  # 2 and 0: the radius itself counts
    assert values["sdr_2p5mm"] == pytest.approx(3 / 6)
    assert values["sdr_3mm"] == pytest.approx(4 / 6)
    assert values["sdr_4mm"] == pytest.approx(5 / 6)
    assert values["error_AC"] == pytest.approx(4.0) and values["error_PC"] == pytest.approx(1.0)
    assert values["error_GENU"] == pytest.approx(3.25)
    assert values["landmark_shift"] == pytest.approx(0.75)
    assert values["accuracy"] == 0.5


def test_the_task_measures_in_mm_and_its_clean_metrics_add_per_landmark_errors_and_tau():
    task = LandmarkTask(_heatmap_net(2), num_landmarks=3, landmark_names=["AC", "PC", "lower lip"], tau=1.0)
    assert set(task.clean_metrics()) - set(task.robust_metrics()) == {"error_AC", "error_PC", "error_lower_lip",
                                                                     "loss_tau"}
    assert "landmark_shift" in task.robust_metrics() and "landmark_shift" not in task.clean_metrics()
    assert set(task.bounded_metrics) == {"accuracy", "sdr_2mm", "sdr_2p5mm", "sdr_3mm", "sdr_4mm"}
    # a heatmap peaked at the truth + (0, 2) voxels; spacing 0.5 x 3 mm: every landmark 6 mm off
    true = torch.tensor([[[5.0, 4.0], [9.0, 9.0], [3.0, 10.0]]])
    heatmaps = 5 * gaussian_log_targets(true + torch.tensor([0.0, 2.0]), (14, 16), 0.5).view(1, 3, 14, 16)
    batch = {"landmarks": true, "spacing": torch.tensor([[0.5, 3.0]])}
    assert task.mean_radial_error(heatmaps, batch).item() == pytest.approx(6.0, abs=0.02)
    preds, target = task.metric_inputs(heatmaps, batch)
    assert preds.shape == (1, 2, 3, 2) and torch.equal(preds[:, 0], preds[:, 1])
    assert torch.allclose(target.loss, task.attack_loss(heatmaps, batch))


# -- decoding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("sigma", (0.5, 1.0))
def test_soft_argmax_of_a_sharp_gaussian_returns_its_sub_voxel_centre(dims, sigma):
    shape = (20, 24, 18)[:dims]
    points = torch.tensor([[[6.3, 11.72, 9.45], [13.05, 4.5, 7.8]]])[..., :dims]
    grid = torch.stack(torch.meshgrid(*(torch.arange(float(n)) for n in shape), indexing="ij"))  # voxel centres
    squared = (grid[None, None] - points.reshape(1, 2, dims, *[1] * dims)).square().sum(2)  # (1, 2, *shape)
    logits = -squared / (2 * sigma**2)  # the log of a Gaussian heatmap at the points
    assert torch.allclose(gaussian_log_targets(points, shape, sigma), logits.flatten(2).log_softmax(-1), atol=1e-5)
    assert (soft_argmax(logits.flatten(2).log_softmax(-1), shape) - points).abs().max() < 0.05
    task = LandmarkTask(_heatmap_net(dims, 2), num_landmarks=2)  # through the task: temperature 1 at the start
    assert (task.coordinates(logits) - points).abs().max() < 0.05
    # targets are not rounded to the voxel grid (MONAI's GenerateHeatmap would give the same map for both)
    nearby = gaussian_log_targets(points + 0.3, shape, sigma)
    assert not torch.allclose(nearby, gaussian_log_targets(points, shape, sigma), atol=1e-3)


def test_js_divergence_is_zero_for_equal_maps_and_ln2_for_disjoint_ones():
    log_p = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]]).log()
    log_q = torch.tensor([[[0.0, 0.0, 0.25, 0.75]]]).log()
    assert js_divergence(log_p, log_p).item() == pytest.approx(0.0, abs=1e-7)
    assert js_divergence(log_p, log_q).item() == pytest.approx(math.log(2.0))
    half = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]]), torch.tensor([[[0.5, 0.0, 0.5, 0.0]]])  # m = (1/2, 1/4, 1/4, 0)
    assert js_divergence(half[0].log(), half[1].log()).item() == pytest.approx(0.5 * math.log(2.0))
    leaf = torch.randn(1, 1, 4, requires_grad=True)  # finite gradients where the other map is exactly 0
    (grad,) = torch.autograd.grad(js_divergence(leaf.log_softmax(-1), log_q).sum(), leaf)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(("shape", "sigma"), [((24, 20), 1.0), ((12, 12), 0.5), ((14, 12, 16), 1.0)])
def test_the_windowed_divergence_equals_the_whole_grid_one_in_value_and_gradient(shape, sigma):
    """The loss computes the JS divergence only near each landmark (the target is 0 beyond 8 std): the same value,
    and the same gradient with respect to the heatmap logits, as over the whole grid, also at the image's edge."""
    torch.manual_seed(0)
    points = torch.rand(3, 4, len(shape)) * (torch.tensor(shape) - 1)
    points[0, 0] = 0.2  # the window is cut by the image's corner
    for logits in (torch.randn(3, 4, *shape) * 3, 4 * gaussian_log_targets(points + 0.4, shape, sigma).view(3, 4, *shape)):
        leaf = logits.clone().requires_grad_(True)
        whole = js_divergence(leaf.flatten(2).log_softmax(-1), gaussian_log_targets(points, shape, sigma))
        (whole_grad,) = torch.autograd.grad(whole.sum(), leaf)
        windowed = gaussian_js_divergence(leaf.flatten(2).log_softmax(-1), points, shape, sigma)
        (windowed_grad,) = torch.autograd.grad(windowed.sum(), leaf)
        assert torch.allclose(windowed, whole, atol=1e-6) and whole.min() > 1e-3
        assert torch.allclose(windowed_grad, whole_grad, atol=1e-6, rtol=1e-4)


def test_regressed_coordinates_are_normalised_per_axis():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12 * 9, 4))
    nn.init.zeros_(net[1].weight)
    with torch.no_grad():
        net[1].bias.copy_(torch.tensor([-1.0, 1.0, 0.0, 0.5]))
    task = LandmarkTask(net, num_landmarks=2)
    assert torch.allclose(task(torch.zeros(1, 1, 12, 9)), torch.tensor([[[0.0, 8.0], [5.5, 6.0]]]))
    with pytest.raises(ValueError, match=r"heatmaps \(B, K, \*spatial\) = \(B, 3, 12, 9\)"):
        LandmarkTask(net, num_landmarks=3)(torch.zeros(1, 1, 12, 9))


# -- correctness, tau -----------------------------------------------------------------------------------
def test_huber_estimates_satisfy_their_equations_and_resist_outliers():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    mu, scale = huber_location_scale(values)
    assert mu == pytest.approx(4.0)  # symmetric: the centre
    x, c = values.double(), 1.5
    inside_normal = math.erf(c / 2**0.5)  # P(|z| <= c) for a standard normal z
    gamma = inside_normal + c**2 * (1 - inside_normal) - 2 * c * math.exp(-c**2 / 2) / (2 * math.pi) ** 0.5
    inside = (x - mu).abs() <= c * scale
    assert mu == pytest.approx(float(x.clamp(mu - c * scale, mu + c * scale).mean()), abs=1e-8)
    expected = float(((x - mu)[inside] ** 2).sum() / (len(x) * gamma - (~inside).sum() * c**2)) ** 0.5
    assert scale == pytest.approx(expected, rel=1e-6)
    with_outlier = torch.cat([values, torch.tensor([1000.0])])
    mean_rule = float(with_outlier.mean() + 3 * with_outlier.std(unbiased=False))
    assert loss_threshold(with_outlier) < 20 < mean_rule  # one diverged sample does not decide tau
    assert huber_location_scale(torch.full((5,), 0.3)) == (pytest.approx(0.3), 0.0)


def _loader(dims: int = 2, n: int = 8) -> DataLoader:
    torch.manual_seed(3)
    shape = (12,) * dims
    items = []
    for i in range(n):
        true = torch.rand(3, dims) * 8 + 2
        image = gaussian_log_targets(true[None], shape, 1.0).exp().sum(1).view(1, *shape)
        items.append({"image": image / image.max() + 0.05 * torch.rand(1, *shape), "landmarks": true,
                      "spacing": torch.tensor([1.5, 0.8, 1.0][:dims]), "id": str(i)})
    return DataLoader(items, batch_size=4)


def test_tau_is_recomputed_from_each_clean_validation_and_survives_a_checkpoint():
    task = LandmarkTask(_heatmap_net(2), num_landmarks=3)
    assert math.isnan(task.tau.item())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    taus = []
    for _ in range(2):
        logged = trainer.validate(task, _loader(), verbose=False)[0]
        with torch.no_grad():
            losses = torch.cat([task.attack_loss(task(b["image"]), b) for b in _loader()])
        assert task.tau.item() == pytest.approx(loss_threshold(losses), rel=1e-5)
        assert logged["val/loss_tau"] == pytest.approx(task.tau.item(), rel=1e-5)
        taus.append(task.tau.item())
        with torch.no_grad():
            task.net.weight.mul_(3.0)  # other weights, other losses: the next validation's tau differs
    assert taus[0] != pytest.approx(taus[1], rel=1e-3)
    fresh = LandmarkTask(_heatmap_net(2), num_landmarks=3)
    fresh.load_state_dict(task.state_dict())
    assert fresh.tau.item() == pytest.approx(taus[1])
    fixed = LandmarkTask(_heatmap_net(2), num_landmarks=3, tau=0.25)
    fixed.load_state_dict(task.state_dict())
    assert fixed.tau.item() == 0.25  # a configured tau beats the checkpoint's


@pytest.mark.slow
def test_tau_over_two_ddp_ranks_is_the_tau_of_all_their_losses():
    """The Huber tau needs every validation loss, not a mean of per-rank taus: ``val/loss_tau`` gathers the losses
    (``dist_reduce_fx="cat"``), so two ``ddp_spawn`` ranks, each with half of the 10 samples, give the tau of all
    10 that one process computes (and that the losses give directly)."""
    taus = {}
    for strategy, devices in (("auto", 1), ("ddp_spawn", 2)):
        task = LandmarkTask(_heatmap_net(2), num_landmarks=3)
        trainer = L.Trainer(accelerator="cpu", strategy=strategy, devices=devices, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.validate(task, _loader(n=10), verbose=False)
        taus[strategy] = float(trainer.callback_metrics["val/loss_tau"])
    task = LandmarkTask(_heatmap_net(2), num_landmarks=3).eval()
    with torch.no_grad():
        losses = torch.cat([task.attack_loss(task(b["image"]), b) for b in _loader(n=10)])
    assert taus["auto"] == pytest.approx(loss_threshold(losses), rel=1e-5)
    assert taus["ddp_spawn"] == pytest.approx(taus["auto"], rel=1e-5)
    half = loss_threshold(losses[::2])  # what a rank alone would have said: not the answer
    assert half != pytest.approx(taus["auto"], rel=1e-3)


@pytest.mark.parametrize("rule", ("loss", "mre", "loss before validation"))
def test_the_margin_is_positive_exactly_where_a_sample_is_correct(rule):
    torch.manual_seed(6)
    task = LandmarkTask(_heatmap_net(2), num_landmarks=3, correct="mre" if rule == "mre" else "loss",
                        radius_mm=0.71)  # between the 8th and 9th MRE: half of the samples within
    batch = {"landmarks": torch.rand(16, 3, 2) * 10, "spacing": torch.full((16, 2), 0.9)}
    heatmaps = 4 * torch.randn(16, 3, 12, 12) + 3 * gaussian_log_targets(batch["landmarks"], (12, 12), 1.0).view(
        16, 3, 12, 12)
    losses = task.attack_loss(heatmaps, batch)
    if rule == "loss":  # between two samples' losses: half of them correct, none exactly at tau
        task.validation_tau.fill_(float(losses.detach().sort().values[7:9].mean()))
    reference = losses if rule == "loss" else task.mean_radial_error(heatmaps, batch)
    threshold = task.tau if rule == "loss" else 0.71  # before a validation: the MRE rule
    correct = task.is_correct(heatmaps, batch)
    assert 0 < correct.sum() < 16 and torch.equal(correct, reference <= threshold)
    leaf = heatmaps.clone().requires_grad_(True)
    margin = task.correct_margin(leaf, batch)
    assert torch.equal(margin > 0, correct)
    (grad,) = torch.autograd.grad(margin.sum(), leaf)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- attacks --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("norm", ("linf", "l2"))
def test_pgd_reaches_the_exact_largest_displacement_of_linear_coordinates(dims, norm):
    """Coordinates linear in the input, only landmark 0's first coordinate depending on it (weights ``w`` on the
    normalised scale, ``(n - 1) / 2`` voxels per unit): within eps it moves at most ``(n - 1) / 2 * |w|_1 * eps``
    (Linf) or ``(n - 1) / 2 * |w|_2 * eps`` (L2), away from the truth just behind it."""
    torch.manual_seed(7)
    shape = (10, 8, 6)[:dims]
    inputs = int(np.prod(shape))
    net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 2 * dims))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].weight[0] = torch.randn(inputs) * 0.01
    task = LandmarkTask(net, num_landmarks=2, correct="mre", radius_mm=1e6).eval()  # never wrong: the whole budget
    x = torch.rand(3, 1, *shape) * 0.2 + 0.4
    clean = task(x).detach()
    batch = {"landmarks": clean - torch.tensor([1.0] + [0.0] * (2 * dims - 1)).view(2, dims),
             "spacing": torch.tensor([2.0, 0.7, 1.3][:dims]).expand(3, dims)}
    eps = 0.01 if norm == "linf" else 0.1
    x_adv = PGD(norm, steps=20, random_start=False)(task, x, batch, task, eps=eps, bounds=(0.0, 1.0))
    w = net[1].weight[0] * (shape[0] - 1) / 2
    expected = (w.abs().sum() if norm == "linf" else w.norm()) * eps
    moved = task(x_adv)[:, 0, 0] - clean[:, 0, 0]
    assert torch.allclose(moved, expected.expand(3), rtol=0.01)
    others = (task(x_adv) - clean).flatten(1)[:, 1:]
    assert others.abs().max() < 1e-5  # nothing else depends on the input


# -- examples, configs, runs ----------------------------------------------------------------------------
def test_point_sets_keep_their_names_and_draw_with_label_maps(tmp_path):
    points = PointSet(torch.tensor([[[2.0, 9.0, 3.0], [4.0, 1.0, 2.0]]] * 2), ["AC", "PC"])
    moved = points.detach().cpu()[:, :, :] + 1
    assert isinstance(moved, PointSet) and moved.point_names == ("AC", "PC")
    x = torch.rand(2, 1, 6, 12, 8)
    tissue = torch.zeros(2, 6, 12, 8, dtype=torch.long)
    masks = {"ground truth": points, "adversarial prediction": moved, "tissue": tissue}
    path = save_example_grid(x, x, tmp_path / "grid.png", title="t", masks=masks)
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match=r"\(B, K, D\)"):
        save_example_grid(x, x, tmp_path / "bad.png", title="t", masks={"p": PointSet(torch.zeros(2, 2, 2))})


def test_landmark_info_tells_the_configs_what_the_data_hold(tmp_path):
    from medrobust.data.landmark_examples import write_fcsv_scans

    assert landmark_info("count", "phantom", 2) == 10 and landmark_info("coordinates", "phantom", 3) == 96
    assert landmark_info("names", "isbi2015")[0] == "sella" and landmark_info("dims", "fcsv") == 3
    table = write_fcsv_scans(tmp_path)
    assert landmark_info("names", "fcsv", csv=str(table)) == ["AC", "PC", "GENU"]
    assert landmark_info("count", "fcsv", csv=str(table), landmark_names=["AC", "PC"]) == 2
    with pytest.raises(ValueError, match="data.csv"):
        landmark_info("count", "fcsv")


@pytest.mark.parametrize("kwargs, match", [
    ({"num_landmarks": 0}, "module.num_landmarks"), ({"correct": "dice"}, "module.correct"),
    ({"sigma_vox": 0}, "module.sigma_vox"), ({"tau": -1.0}, "module.tau"),
    ({"landmark_names": ["a", "b"]}, "module.landmark_names"),
    ({"landmark_names": ["a b", "a/b", "c"]}, "module.landmark_names"),  # the same metric key
])
def test_bad_arguments_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LandmarkTask(_heatmap_net(2), **{"num_landmarks": 3, **kwargs})


def test_3d_afids_with_the_coordinate_regressor_trains_adversarially_and_tests(tiny_for, tmp_path):
    from conftest import compose_config
    from medrobust.reporting import read_csv
    from medrobust.runner import build_callbacks, build_data_and_module, build_loggers, build_trainer

    cfg = compose_config("train", [*tiny_for("afids"), "data.spatial_dims=3", "model=landmark_regressor", "adv=pgd"],
                         tmp_path)
    assert cfg.model.out_channels == 32 * 3 and cfg.module.num_landmarks == 32
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(module.tau)  # measured at the end of the validation
    trainer.test(module, datamodule=datamodule, ckpt_path="best")
    assert {"test/mre", "test/error_AC", "test/loss_tau"} <= set(trainer.callback_metrics)
    rows = read_csv(tmp_path / "robustness.csv")
    assert {r["metric"] for r in rows} >= {"mre", "sdr_2mm", "landmark_shift", "accuracy"}
    assert (tmp_path / "examples" / "test_pgd10_linf_eps0p008.png").is_file()
