"""The segmentation task module and its metrics, on hand-made logits and masks with known answers, in 2-D and
3-D; tau from a real validation; sliding windows; PGD and the worst-case curve through the task."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from medrobust.attacks import PGD
from medrobust.evaluation.worst_case import robustness_curve
from medrobust.tasks import SegmentationTask
from medrobust.tasks.base import compute_metrics, metric_collection
from medrobust.tasks.segmentation import FALLBACK_TAU

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def _net(dims: int, classes: int = 3, kernel: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return CONV[dims](1, classes, kernel, padding=kernel // 2)


def _logits(masks: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits ``(B, K, *spatial)`` whose argmax is ``masks`` ``(B, *spatial)``."""
    return 10.0 * F.one_hot(masks, classes).movedim(-1, 1).float()


# -- the objective -----------------------------------------------------------------------------------
def _hand_loss(logits: torch.Tensor, label: torch.Tensor, loss: str) -> torch.Tensor:
    """Dice over the foreground classes with MONAI's smoothing (1e-5) plus voxel-mean CE, sample by sample."""
    values = []
    for z, y in zip(logits, label):
        p = z.softmax(0).flatten(1)
        g = F.one_hot(y.flatten(), z.shape[0]).T.float()
        dice = [(2 * (p[c] * g[c]).sum() + 1e-5) / (p[c].sum() + g[c].sum() + 1e-5) for c in range(1, z.shape[0])]
        ce = -(p.log() * g).sum(0).mean()
        dice_loss = 1 - torch.stack(dice).mean()
        values.append({"dice": dice_loss, "ce": ce, "dice_ce": dice_loss + ce}[loss])
    return torch.stack(values)


@pytest.mark.parametrize("loss", ("dice_ce", "dice", "ce"))
@pytest.mark.parametrize("dims", (2, 3))
def test_per_sample_loss_matches_a_hand_computation(loss, dims):
    torch.manual_seed(1)
    spatial = (3,) * dims
    logits = torch.randn(2, 3, *spatial)
    label = torch.randint(0, 3, (2, *spatial))
    task = SegmentationTask(_net(dims), num_classes=3, loss=loss)
    values = task.attack_loss(logits, {"label": label})
    assert values.shape == (2,)
    assert torch.allclose(values, _hand_loss(logits, label, loss), atol=1e-6)
    # per sample: changing one sample's logits leaves the other's loss alone
    moved = logits.clone()
    moved[1] += torch.randn_like(moved[1])
    assert task.attack_loss(moved, {"label": label})[0] == values[0]
    # a (B, 1, *spatial) label (MONAI's channel-first masks) means the same
    assert torch.equal(task.attack_loss(logits, {"label": label[:, None]}), values)


def test_is_correct_and_the_margin_agree():
    torch.manual_seed(2)
    label = torch.randint(0, 3, (8, 6, 6))
    logits = _logits(label, 3) + 12.0 * torch.randn(8, 3, 6, 6)  # noisy: Dice spread over samples
    task = SegmentationTask(_net(2), num_classes=3, tau=0.6)
    batch = {"label": label}
    dice = task.dice(logits, batch)
    assert 0 < (dice >= 0.6).sum() < 8  # both kinds present
    correct = task.is_correct(logits, batch)
    assert torch.equal(correct, dice >= 0.6)
    leaf = logits.clone().requires_grad_(True)
    margin = task.correct_margin(leaf, batch)
    assert torch.allclose(margin, dice - 0.6)  # the value is the hard Dice's
    assert torch.equal(margin >= 0, correct) and torch.equal(margin[dice != 0.6] > 0, correct[dice != 0.6])
    (grad,) = torch.autograd.grad(margin.sum(), leaf)  # the gradient the soft Dice's: minimum-norm attacks follow it
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- the metrics -------------------------------------------------------------------------------------
def _known_masks(dims: int = 2):
    """Two 6^dims samples, classes 1-3 (3 absent everywhere): sample 0's class-1 square predicted one voxel off
    along the last axis, its class-2 voxel missed; sample 1's class 1 exact and 3 voxels of class 2 predicted
    where the label has none."""
    shape = (2,) + (6,) * dims
    label, pred = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    block = (slice(1, 3),) * (dims - 1)
    label[(0, *block, slice(1, 3))] = 1
    pred[(0, *block, slice(2, 4))] = 1
    label[(0, *(4,) * dims)] = 2
    label[(1, *block, slice(1, 3))] = 1
    pred[(1, *block, slice(1, 3))] = 1
    pred[(1, *(5,) * (dims - 1), slice(0, 3))] = 2
    return pred, label


@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("with_spacing", (False, True))
def test_metrics_against_hand_computed_values(dims, with_spacing):
    pred, label = _known_masks(dims)
    spacing = torch.tensor([[2.0] * (dims - 1) + [0.5]] * 2) if with_spacing else None
    task = SegmentationTask(_net(dims, 4), num_classes=4, tau=0.6, class_names=["bg", "csf", "gm", "absent"])
    batch = {"label": label, **({"spacing": spacing} if with_spacing else {})}
    metrics = metric_collection(task.robust_metrics())
    metrics.update(*task.metric_inputs(_logits(pred, 4), batch, reference=_logits(label, 4)))
    values = {name: value.item() for name, value in compute_metrics(metrics).items()}
    # Dice per sample: s0 = (0.5 [2 of 4 voxels shared], 0 [missed], 1 [absent in both]); s1 = (1, 0 [hallucinated], 1)
    s0, s1 = (0.5 + 0 + 1) / 3, (1 + 0 + 1) / 3
    assert values["dice"] == pytest.approx((s0 + s1) / 2)
    assert values["dice_csf"] == pytest.approx(0.75)
    assert values["dice_gm"] == 0.0 and values["dice_absent"] == 1.0
    assert values["accuracy"] == 0.5  # s1 >= 0.6 > s0
    assert values["pred_change"] == pytest.approx(1 - (s0 + s1) / 2)  # the reference is the truth here
    # HD95: the shifted square 1 voxel (0.5 mm) off; the missed and the hallucinated class 2 at the worst case,
    # the image diagonal; class 3, empty in both, 0
    step = 0.5 if with_spacing else 1.0
    extent = torch.tensor([6.0] * dims) * (spacing[0] if with_spacing else 1.0)
    diagonal = extent.pow(2).sum().sqrt().item()
    assert values["hd95"] == pytest.approx((step + diagonal + 0 + 0 + diagonal + 0) / 6)
    voxel_ml = spacing[0].prod().item() / 1000 if with_spacing else 1.0
    assert values["fp_volume"] == pytest.approx((0 + 3 * voxel_ml) / 2)


def test_clean_evaluation_shows_no_change_and_the_clean_metrics_leave_it_out():
    pred, label = _known_masks()
    task = SegmentationTask(_net(2, 4), num_classes=4)
    metrics = metric_collection(task.robust_metrics())
    metrics.update(*task.metric_inputs(_logits(pred, 4), {"label": label}))
    assert compute_metrics(metrics)["pred_change"].item() == 0.0
    assert set(task.robust_metrics()) - set(task.clean_metrics()) == {"pred_change"}
    assert set(task.clean_metrics()) == {"accuracy", "dice", "dice_class1", "dice_class2", "dice_class3", "hd95",
                                         "fp_volume"}
    directions = {name: metric.higher_is_better for name, metric in task.robust_metrics().items()}
    assert directions["dice"] and directions["accuracy"] and directions["dice_class2"]
    assert directions["hd95"] is False and directions["fp_volume"] is False and directions["pred_change"] is None
    assert task.bounded_metrics == ("accuracy", "dice", "dice_class1", "dice_class2", "dice_class3", "pred_change")
    assert (task.outputs_logits, task.label_key, task.success_metric, task.shift_metric) == (
        False, "label", "accuracy", "pred_change")


# -- tau from the clean validation ----------------------------------------------------------------------
def _loader(dims: int = 2, n: int = 4) -> DataLoader:
    torch.manual_seed(3)
    images = torch.rand(n, 1, *(8,) * dims)
    samples = [{"image": image, "label": (image[0] > 0.5).long(), "id": index} for index, image in enumerate(images)]
    return DataLoader(samples, batch_size=2)


class _TauSeenByCallbacks(L.Callback):
    """Records tau in a callback's validation epoch end, after asking the module to finish its clean validation
    (what the robustness evaluation does to attack with the current epoch's tau)."""

    def __init__(self, finish_first: bool) -> None:
        self.finish_first, self.seen = finish_first, []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.finish_first:
            pl_module.finish_clean_validation()
        self.seen.append(pl_module.tau.item())


@pytest.mark.parametrize("finish_first", (False, True))
def test_tau_is_the_clean_validation_dice_and_survives_a_checkpoint(finish_first):
    net = nn.Conv2d(1, 2, 1)
    with torch.no_grad():  # a fixed, imperfect segmenter: foreground where the image exceeds 0.7 (label: 0.5)
        net.weight.copy_(torch.tensor([0.0, 10.0]).view(2, 1, 1, 1)), net.bias.copy_(torch.tensor([0.0, -7.0]))
    task = SegmentationTask(net, num_classes=2)
    assert task.tau.item() == FALLBACK_TAU and math.isnan(task.validation_tau.item())
    seen = _TauSeenByCallbacks(finish_first)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[seen])
    logged = trainer.validate(task, _loader(), verbose=False)[0]
    assert 0.2 < logged["val/dice"] < 0.95
    assert task.tau.item() == pytest.approx(logged["val/dice"])
    # a callback asking first sees this validation's tau; otherwise the previous one (here the fallback)
    assert seen.seen == [pytest.approx(logged["val/dice"]) if finish_first else FALLBACK_TAU]
    fresh = SegmentationTask(nn.Conv2d(1, 2, 1), num_classes=2)
    fresh.load_state_dict(task.state_dict())
    assert fresh.tau.item() == pytest.approx(logged["val/dice"])
    fixed = SegmentationTask(nn.Conv2d(1, 2, 1), num_classes=2, tau=0.9)
    fixed.load_state_dict(task.state_dict())
    assert fixed.tau.item() == pytest.approx(0.9)  # a configured tau beats the checkpoint's


# -- sliding windows -----------------------------------------------------------------------------------
def _input_grad(forward, task: SegmentationTask, x: torch.Tensor, label: torch.Tensor):
    x = x.clone().requires_grad_(True)
    output = forward(x)
    (grad,) = torch.autograd.grad(task.attack_loss(output, {"label": label}).sum(), x)
    return output.detach(), grad


@pytest.mark.parametrize("dims", (2, 3))
def test_sliding_window_is_differentiable(dims):
    torch.manual_seed(4)
    x = torch.rand(2, 1, *(8,) * dims)
    label = (x[:, 0] > 0.5).long()
    # a per-voxel net: windows change nothing, so output and input gradient equal the plain forward's
    task = SegmentationTask(_net(dims, 2, kernel=1), num_classes=2, roi_size=[4] * dims, sw_overlap=0.5).eval()
    plain_out, plain_grad = _input_grad(task.net, task, x, label)
    window_out, window_grad = _input_grad(task, task, x, label)
    assert torch.allclose(window_out, plain_out, atol=1e-5) and torch.allclose(window_grad, plain_grad, atol=1e-6)
    # a 3^dims net: one window covering the image is the plain forward; smaller windows still give finite,
    # nonzero gradients through MONAI's inferer
    task = SegmentationTask(_net(dims, 2), num_classes=2, roi_size=[4] * dims).eval()
    plain_out, plain_grad = _input_grad(task.net, task, x, label)
    covering = SegmentationTask(_net(dims, 2), num_classes=2, roi_size=[8] * dims).eval()
    cover_out, cover_grad = _input_grad(lambda image: covering.inferer(image, covering.net), task, x, label)
    assert torch.allclose(cover_out, plain_out, atol=1e-5) and torch.allclose(cover_grad, plain_grad, atol=1e-6)
    window_out, window_grad = _input_grad(task, task, x, label)
    assert torch.isfinite(window_grad).all() and window_grad.abs().sum() > 0
    assert not torch.allclose(window_out, plain_out)  # windows did run (border effects)
    assert torch.equal(task.train()(x), task.net(x))  # training forwards see the patch as it is


# -- attacks through the task ----------------------------------------------------------------------------
@pytest.mark.parametrize("dims", (2, 3))
def test_pgd_and_the_worst_case_curve_run_through_the_task(dims):
    torch.manual_seed(5)
    task = SegmentationTask(_net(dims), num_classes=3, tau=0.9).eval()
    x = torch.rand(2, 1, *(6,) * dims)
    batch = {"image": x, "label": task(x).argmax(1)}  # the clean prediction is right: Dice 1, every sample correct
    clean_loss = task.attack_loss(task(x), batch)
    x_adv = PGD(steps=3, random_start=False)(task, x, batch, task, eps=0.05, bounds=(0.0, 1.0))
    assert x_adv.shape == x.shape and (x_adv - x).abs().amax() <= 0.05 + 1e-6
    assert (task.attack_loss(task(x_adv), batch) > clean_loss).all()
    curve = robustness_curve(PGD(steps=3), task, x, batch, task, eps_values=[0.02, 0.05], bounds=(0.0, 1.0))
    assert len(curve.first_failure) == len(curve.worst) == 2
    worst = [task.attack_loss(task(point), batch) for point in curve.worst]
    assert (worst[0] >= clean_loss).all() and (worst[1] >= worst[0] - 1e-6).all()  # worst case grows with eps
    metrics = metric_collection(task.robust_metrics())
    metrics.update(*task.metric_inputs(task(curve.worst[1]), batch, reference=task(x)))
    values = compute_metrics(metrics)
    assert all(torch.isfinite(value) for value in values.values()) and values["pred_change"] > 0
    masks = task.example_masks(task(x), batch, task(curve.worst[1]))  # the example grids' rows
    assert list(masks) == ["ground truth", "clean prediction", "adversarial prediction"]
    assert all(mask.shape == batch["label"].shape for mask in masks.values())
    assert torch.equal(masks["clean prediction"], batch["label"])
    assert not torch.equal(masks["adversarial prediction"], batch["label"])


# -- arguments ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 1}, "module.num_classes"), ({"loss": "focal"}, "module.loss"), ({"tau": 0.0}, "module.tau"),
    ({"tau": 1.5}, "module.tau"), ({"class_names": ["a", "b"]}, "module.class_names"),
    ({"class_names": ["bg", "a", "a"]}, "module.class_names"),
    ({"class_names": ["bg", "a b", "a/b"]}, "module.class_names"),  # the same metric key
    ({"class_names": ["bg", "/", "c"]}, "module.class_names"),
    ({"roi_size": [0, 4]}, "module.roi_size"), ({"roi_size": [4, 4], "sw_overlap": 1.0}, "module.sw_overlap"),
    ({"roi_size": [4, 4], "sw_mode": "cubic"}, "module.sw_mode"),
])
def test_bad_arguments_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationTask(_net(2), **{"num_classes": 3, **kwargs})


def test_class_names_become_metric_keys():
    task = SegmentationTask(_net(2), num_classes=3, class_names=["background", "left atrium", "non-enhancing tumor"])
    assert {"dice_left_atrium", "dice_non-enhancing_tumor"} <= set(task.robust_metrics())


def test_bad_batches_name_what_was_expected():
    task = SegmentationTask(_net(2), num_classes=3)
    logits = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"integer labels in \[0, 3\)"):
        task.attack_loss(logits, {"label": torch.full((2, 4, 4), 3)})
    with pytest.raises(ValueError, match="matching the logits"):
        task.attack_loss(logits, {"label": torch.zeros(2, 5, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match="module.num_classes=3"):
        task.attack_loss(torch.zeros(2, 4, 4, 4), {"label": torch.zeros(2, 4, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"batch\['spacing'\] must be \(B, D\)"):
        task.metric_inputs(logits, {"label": torch.zeros(2, 4, 4, dtype=torch.long), "spacing": torch.ones(2, 3)})
    windowed = SegmentationTask(_net(2), num_classes=3, roi_size=[4, 4, 4]).eval()
    with pytest.raises(ValueError, match="module.roi_size"):
        windowed(torch.zeros(1, 1, 8, 8))


# -- HD95: our torch port against MONAI's compute_hausdorff_distance -------------------------------------
def _monai_hd95(pred_hot, label_hot, spacing):
    import warnings

    from monai.metrics import compute_hausdorff_distance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty masks: MONAI warns and gives inf / NaN, compared separately
        return compute_hausdorff_distance(pred_hot.float(), label_hot.float(), include_background=True,
                                          percentile=95, spacing=spacing).double()


def _blob_labels(n: int, shape: tuple, classes: int, seed: int) -> torch.Tensor:
    """Smoothed-noise label maps ``(n, *shape)``: blobs of irregular shape, some touching the border."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, classes, *shape, generator=generator)
    pool = F.avg_pool2d if len(shape) == 2 else F.avg_pool3d
    for _ in range(2):
        noise = pool(noise, 5, 1, 2)
    return noise.argmax(dim=1)


@pytest.mark.parametrize("shape", ((48, 40), (17, 29), (14, 12, 16)))
@pytest.mark.parametrize("with_spacing", (False, True))
def test_hd95_equals_monai_on_random_blobs(shape, with_spacing):
    from medrobust.tasks.segmentation_metrics import hd95_per_class, one_hot
    classes, n = 4, 5
    pred, label = _blob_labels(n, shape, classes, 0), _blob_labels(n, shape, classes, 1)
    spacing = torch.rand(n, len(shape), generator=torch.Generator().manual_seed(2)) * 2 + 0.3 if with_spacing else None
    ours = hd95_per_class(pred, label, classes, spacing=spacing)
    reference = _monai_hd95(one_hot(pred, classes, False), one_hot(label, classes, False),
                            None if spacing is None else spacing.tolist())
    assert torch.isfinite(reference).all()  # every pair non-empty: the comparison covers all of them
    assert torch.allclose(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dims", (2, 3))
def test_hd95_equals_monai_on_tiny_masks(dims):
    """Single voxels, corners and masks touching the border, with anisotropic spacing."""
    from medrobust.tasks.surface_distance import percentile_hausdorff
    shape = (5, 7, 6)[:dims]
    pred, label = torch.zeros(6, *shape, dtype=torch.bool), torch.zeros(6, *shape, dtype=torch.bool)
    pred[(0,) + (0,) * dims] = True                       # single voxel in a corner ...
    label[(0,) + tuple(s - 1 for s in shape)] = True      # ... against the opposite corner
    pred[1] = True                                        # the whole image ...
    label[(1,) + (2,) * dims] = True                      # ... against a single voxel
    pred[(2, slice(None))] = True                         # a slab along axis 0, touching the border
    label[(2, slice(None), 3)] = True
    pred[(3,) + (1,) * dims] = True                       # identical single voxels: 0
    label[(3,) + (1,) * dims] = True
    pred[4, 1:4, 2:5] = True                              # a box against its shifted copy
    label[4, 2:5, 1:4] = True
    pred[(5, 0)] = True                                   # border row against a full image
    label[5] = True
    spacing = torch.tensor([0.7, 2.5, 1.3][:dims]).expand(6, dims)
    ours = percentile_hausdorff(pred, label, spacing)
    reference = _monai_hd95(pred[:, None], label[:, None], spacing.tolist())[:, 0]
    assert torch.allclose(ours, reference, atol=1e-4, rtol=0)
    assert ours[3] == 0


def test_hd95_empty_masks_keep_their_rules():
    from medrobust.tasks.segmentation_metrics import hd95_per_class, image_diagonal
    label = torch.zeros(2, 8, 8, dtype=torch.long)
    pred = label.clone()
    label[0, 2:4, 2:4] = 1  # class 1: predicted empty in sample 0; class 2 empty everywhere
    spacing = torch.tensor([[1.0, 2.0], [0.5, 0.5]])
    values = hd95_per_class(pred, label, 3, spacing=spacing)
    assert values[0, 0] == pytest.approx(image_diagonal((8, 8), spacing, 2)[0].item())
    assert values[1].tolist() == [0.0, 0.0] and values[0, 1] == 0
