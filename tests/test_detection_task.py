"""DetectionTask on real LUNA phantom batches and a real CenterNet: the loss, seed 004's per-term tau through a
validation and the checkpoint, is_correct / correct_margin, the accumulated detection metrics, and a tiny fit."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from medrobust.datamodules.detection import collate_detection
from medrobust.datamodules.luna import LunaDataModule
from medrobust.models.centernet import CenterNet, encode_targets
from medrobust.tasks.base import compute_metrics, metric_collection
from medrobust.tasks.detection import FALLBACK_TAU, TERMS, DetectionTask, box_outlines

SIZE = 64


def make_task(**kwargs) -> DetectionTask:
    torch.manual_seed(0)
    net = CenterNet(spatial_dims=2, in_channels=1, num_classes=1, features=(8, 16, 32), stride=4, image_size=SIZE)
    return DetectionTask(net, memory_format="contiguous", **kwargs)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.fixture(scope="module")
def dm(lidc_mini_db, tmp_path_factory) -> LunaDataModule:
    dm = LunaDataModule(root=str(tmp_path_factory.mktemp("luna_det")), annotation_db=lidc_mini_db, image_size=SIZE,
                        max_scans=8, batch_size=6, augment=False)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def batch(dm) -> dict:
    """A training batch with target boxes (and, where the data have them, irrelevant findings)."""
    batches = list(dm.train_dataloader())
    with_irrelevant = [b for b in batches if (b["box_valid"] & ~b["box_target"]).any() and b["box_target"].any()]
    chosen = (with_irrelevant or [b for b in batches if b["box_target"].any()])[0]
    assert chosen["box_target"].any()
    return chosen


def sample(batch: dict, i: int) -> dict:
    return {key: value[i:i + 1] for key, value in batch.items()}


def perfect_output(task: DetectionTask, batch: dict) -> dict:
    """The encoded targets as a CenterNet output: heatmap logits of the target Gaussians, size / offset maps holding
    each target's values at its centre cell."""
    out_shape = tuple(n // task.stride for n in batch["image"].shape[2:])
    dims = len(out_shape)
    targets = encode_targets(batch["boxes"], batch["labels"], task.target_mask(batch), out_shape, task.stride,
                             task.num_classes)
    heatmap = torch.logit(targets["heatmap"].clamp(1e-4, 1 - 1e-4))
    output = {"heatmap": heatmap}
    for key in ("size", "offset"):
        dense = torch.zeros(len(heatmap), dims, math.prod(out_shape))
        for b in range(len(heatmap)):
            keep = targets["mask"][b]
            dense[b][:, targets["index"][b][keep]] = targets[key][b][keep].T
        output[key] = dense.view(len(heatmap), dims, *out_shape)
    return output


def squares(count: int, seed: int, batch_size: int = 8) -> list[dict]:
    """Synthetic batches: dim noisy backgrounds with one or two bright squares, each boxed (one class, all targets)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = 0.1 * torch.rand(batch_size, 1, SIZE, SIZE, generator=g)
        boxes = torch.zeros(batch_size, 2, 4)
        valid = torch.zeros(batch_size, 2, dtype=torch.bool)
        for b in range(batch_size):
            for k in range(int(torch.randint(1, 3, (), generator=g))):
                side = int(torch.randint(6, 14, (), generator=g))
                r, c = (int(v) for v in torch.randint(0, SIZE - side, (2,), generator=g))
                images[b, 0, r:r + side, c:c + side] = 1.0
                boxes[b, k] = torch.tensor([r, c, r + side, c + side], dtype=torch.float32)
                valid[b, k] = True
        batches.append({"image": images, "boxes": boxes, "labels": torch.where(valid, 0, -1), "box_valid": valid,
                        "box_target": valid.clone()})
    return batches


@pytest.fixture(scope="module")
def fitted():
    """A CenterNet fitted a few epochs on bright squares through Lightning, validated each epoch (tau)."""
    task = make_task(optimizer=lambda params: torch.optim.Adam(params, lr=3e-3))
    train, val = squares(12, seed=1), squares(2, seed=2)
    task.eval()
    with torch.no_grad():
        before = torch.cat([task.attack_loss(task(b["image"]), b) for b in val]).mean()
    task.train()
    trainer(max_epochs=4, num_sanity_val_steps=0).fit(task, DataLoader(train, batch_size=None),
                                                      DataLoader(val, batch_size=None))
    task.eval()
    return task, val, before


# ----------------------------------------------------------------------------------------- the loss
def test_a_training_step_on_luna_gives_a_finite_loss_and_gradients(batch):
    task = make_task()
    task.train()
    loss = task.train_objective(task, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in task.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_attack_loss_is_per_sample_and_leaves_irrelevant_findings_out(batch):
    task = make_task().eval()
    with torch.no_grad():
        output = task(batch["image"])
        loss = task.attack_loss(output, batch)
        assert loss.shape == (len(batch["image"]),) and torch.isfinite(loss).all()
        for i in range(len(loss)):
            alone = task.attack_loss(task(batch["image"][i:i + 1]), sample(batch, i))
            torch.testing.assert_close(alone[0], loss[i], rtol=1e-4, atol=1e-5)
        irrelevant = (batch["box_valid"] & ~batch["box_target"]).any(dim=1)
        as_targets = task.attack_loss(output, {**batch, "box_target": batch["box_valid"].clone()})
    # samples with an irrelevant finding lose differently when it is trained as a positive; the others alike
    assert torch.equal(as_targets[~irrelevant], loss[~irrelevant])
    if irrelevant.any():
        assert not torch.allclose(as_targets[irrelevant], loss[irrelevant])


def test_the_divergence_is_zero_on_equal_outputs_and_grows_with_the_change(batch):
    task = make_task().eval()
    with torch.no_grad():
        clean = task(batch["image"])
        same = task.output_divergence(clean, clean, batch)
        moved = {key: value + 0.5 for key, value in clean.items()}
        apart = task.output_divergence(clean, moved, batch)
    assert same.shape == (len(batch["image"]),) and torch.allclose(same, torch.zeros_like(same), atol=1e-6)
    assert (apart > 1e-3).all()


# ----------------------------------------------------------------------------------------- tau
def test_tau_comes_from_a_validation_pass_and_travels_in_the_checkpoint(dm, tmp_path):
    task = make_task()
    assert torch.isnan(task.validation_tau).all()
    assert task.tau.tolist() == pytest.approx([FALLBACK_TAU[t] for t in TERMS])
    # several batches, the last one smaller: the taus are per-sample means, not means of batch means
    batches = list(DataLoader(dm.data_train, batch_size=5, collate_fn=collate_detection))
    assert len(batches) > 1 and len(batches[-1]["image"]) != len(batches[0]["image"])
    run = trainer()
    run.validate(task, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    task.eval()
    with torch.no_grad():
        terms = torch.cat([task.loss_terms(task(b["image"]), b) for b in batches])
    assert torch.isfinite(task.validation_tau).all()
    torch.testing.assert_close(task.validation_tau, terms.mean(dim=0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(task.tau, task.validation_tau)

    path = tmp_path / "detection.ckpt"
    run.save_checkpoint(path)
    restored = make_task()
    restored.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    torch.testing.assert_close(restored.tau, task.tau)
    fixed = make_task(tau={"heatmap": 1.0, "size": 2.0, "offset": 3.0})
    fixed.load_state_dict(restored.state_dict())  # a fixed tau is not overridden by a checkpoint's buffer
    assert fixed.tau.tolist() == [1.0, 2.0, 3.0]


def test_correct_and_margin_agree_and_large_noise_makes_samples_incorrect(fitted):
    task, val, _ = fitted
    assert torch.isfinite(task.validation_tau).all()  # the fit's validations set it
    batch = val[0]
    with torch.no_grad():
        clean = task(batch["image"])
        terms = task.loss_terms(clean, batch)
        task.validation_tau.copy_(terms.amax(dim=0) * 1.05)  # every clean sample correct, with slack
        margin, correct = task.correct_margin(clean, batch), task.is_correct(clean, batch)
        assert correct.all() and (margin > 0).all()
        noisy = batch["image"] + torch.randn(batch["image"].shape, generator=torch.Generator().manual_seed(0))
        output = task(noisy)
        margin, correct = task.correct_margin(output, batch), task.is_correct(output, batch)
        per_term = task.loss_terms(output, batch) <= task.tau
    assert torch.equal(margin > 0, correct) and torch.equal(correct, per_term.all(dim=1))
    assert correct.float().mean() < 0.5


def test_the_margin_has_input_gradients(batch):
    task = make_task().eval()
    x = batch["image"].clone().requires_grad_(True)
    task.correct_margin(task(x), batch).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- metrics
def test_perfect_outputs_score_full_marks_accumulated_over_batches(dm):
    task = make_task(tau={"heatmap": 10.0, "size": 1.0, "offset": 1.0})
    clean = metric_collection(task.clean_metrics())
    robust = metric_collection(task.robust_metrics())
    targets = 0
    batches = list(dm.train_dataloader())
    assert len(batches) > 1
    for b in batches:
        output = perfect_output(task, b)
        clean.update(*task.metric_inputs(output, b))
        robust.update(*task.metric_inputs(output, b, reference=output))
        targets += int(b["box_target"].sum())
    assert targets > 0
    values = compute_metrics(clean)
    assert set(values) == {"accuracy", "mean_iou", "cpm", "map_50", "map_50_95", "tau_heatmap", "tau_size",
                           "tau_offset"}
    assert values["mean_iou"] == pytest.approx(1.0, abs=1e-3)
    assert values["cpm"] == pytest.approx(1.0) and values["map_50"] == pytest.approx(1.0)
    assert values["map_50_95"] == pytest.approx(1.0)
    assert values["accuracy"] == pytest.approx(1.0)
    assert values["tau_size"] < 1e-3 and values["tau_offset"] < 1e-3
    robust_values = compute_metrics(robust)
    assert robust_values["vanished_rate"] == 0.0 and robust_values["fabricated_per_image"] == 0.0

    # sure detections on the irrelevant findings too: the FROC ignores them and mAP drops them, so still full marks
    assert any((b["box_valid"] & ~b["box_target"]).any() for b in batches)
    clean.reset()
    for b in batches:
        clean.update(*task.metric_inputs(perfect_output(task, {**b, "box_target": b["box_valid"]}), b))
    values = compute_metrics(clean)
    assert values["cpm"] == pytest.approx(1.0) and values["map_50"] == pytest.approx(1.0)

    # the same images with every detection gone: the clean ones vanished, nothing found
    robust.reset()
    for b in batches:
        output = perfect_output(task, b)
        blind = {**output, "heatmap": torch.full_like(output["heatmap"], -20.0)}
        robust.update(*task.metric_inputs(blind, b, reference=output))
    gone = compute_metrics(robust)
    assert gone["vanished_rate"] == 1.0 and gone["mean_iou"] == 0.0 and gone["cpm"] == 0.0


def test_without_target_boxes_the_box_metrics_are_left_out(dm):
    task = make_task()
    clean = metric_collection(task.clean_metrics())
    b = next(iter(dm.val_dataloader()))
    empty = {**b, "box_valid": torch.zeros_like(b["box_valid"]), "box_target": torch.zeros_like(b["box_target"])}
    with torch.no_grad():
        clean.update(*task.metric_inputs(task.eval()(b["image"]), empty))
    assert set(compute_metrics(clean)) == {"accuracy", "tau_heatmap", "tau_size", "tau_offset"}


def test_example_masks_draw_the_boxes(batch):
    task = make_task()
    masks = task.example_masks(perfect_output(task, batch), batch, perfect_output(task, batch))
    assert set(masks) == {"ground truth", "clean prediction", "adversarial prediction"}
    truth = masks["ground truth"]
    assert truth.shape == (len(batch["image"]), SIZE, SIZE) and truth.sum() > 0
    assert (masks["clean prediction"] == truth).float().mean() > 0.99


# ----------------------------------------------------------------------------------------- fitting
def test_a_tiny_fit_on_bright_squares_lowers_the_loss_and_finds_them(fitted):
    task, val, before = fitted
    with torch.no_grad():
        after = torch.cat([task.attack_loss(task(b["image"]), b) for b in val]).mean()
    assert after < 0.5 * before
    metrics = metric_collection(task.clean_metrics())
    with torch.no_grad():
        for b in val:
            metrics.update(*task.metric_inputs(task(b["image"]), b))
    values = compute_metrics(metrics)
    assert values["cpm"] > 0.3


def test_3d_volumes_get_the_same_contract():
    torch.manual_seed(0)
    net = CenterNet(spatial_dims=3, in_channels=1, num_classes=1, features=(4, 8, 16), stride=4)
    task = DetectionTask(net, memory_format="contiguous").eval()
    boxes = torch.tensor([[[4.0, 6.0, 8.0, 12.0, 14.0, 18.0]], [[10.0, 2.0, 3.0, 18.0, 9.0, 11.0]]])
    valid = torch.ones(2, 1, dtype=torch.bool)
    batch = {"image": torch.rand(2, 1, 24, 24, 24), "boxes": boxes, "labels": torch.zeros(2, 1, dtype=torch.long),
             "box_valid": valid, "box_target": valid.clone()}
    with torch.no_grad():
        output = task(batch["image"])
        loss = task.attack_loss(output, batch)
        alone = task.attack_loss(task(batch["image"][1:]), sample(batch, 1))
        assert loss.shape == (2,) and torch.isfinite(loss).all()
        torch.testing.assert_close(alone[0], loss[1], rtol=1e-4, atol=1e-5)
        assert task.output_divergence(output, output, batch).abs().max() < 1e-6
    perfect = perfect_output(task, batch)
    metrics = metric_collection(task.clean_metrics())
    metrics.update(*task.metric_inputs(perfect, batch))
    values = compute_metrics(metrics)
    assert values["mean_iou"] > 0.999 and values["cpm"] == pytest.approx(1.0) and values["map_50"] == pytest.approx(1.0)
    truth = task.example_masks(perfect, batch, perfect)["ground truth"]
    # the first box spans 8 slices, each showing its 8 x 10 in-plane outline of 32 pixels
    assert truth.shape == (2, 24, 24, 24) and int(truth[0].sum()) == 8 * (2 * 8 + 2 * 10 - 4)


# ----------------------------------------------------------------------------------------- example masks
def test_box_outlines_draw_each_kept_box_border_with_its_label():
    boxes = torch.tensor([[[2.0, 3.0, 6.0, 8.0], [0.0, 0.0, 3.0, 3.0]]])  # rows 2-5, cols 3-7; a dropped box
    outline = box_outlines(boxes, torch.tensor([[1, 0]]), torch.tensor([[True, False]]), (10, 10))[0]
    expected = torch.zeros(10, 10, dtype=torch.long)
    expected[2:6, 3:8] = 2
    expected[3:5, 4:7] = 0  # the inside stays visible
    assert torch.equal(outline, expected)


def test_3d_box_outlines_appear_on_every_slice_the_box_spans():
    boxes = torch.tensor([[[1.0, 2.0, 2.0, 4.0, 6.0, 6.0]]])  # slices 1-3
    outline = box_outlines(boxes, torch.tensor([[0]]), torch.tensor([[True]]), (6, 8, 8))[0]
    assert [int(outline[z].sum()) for z in range(6)] == [0, 12, 12, 12, 0, 0]  # a 4 x 4 square's 12 border pixels


# ----------------------------------------------------------------------------------------- correct=match
def test_match_rule_wants_every_target_found_and_no_false_positive(batch):
    task = make_task(correct="match")
    has_target = task.target_mask(batch).any(dim=1)
    assert has_target.any() and (~has_target).any()  # slices with nodules and nodule-free ones
    perfect = perfect_output(task, batch)
    heatmap = perfect["heatmap"].clone().requires_grad_(True)
    margin = task.correct_margin({**perfect, "heatmap": heatmap}, batch)
    assert bool((margin > 0).all()) and torch.equal(task.is_correct(perfect, batch), margin >= 0)
    margin.sum().backward()
    assert heatmap.grad.abs().sum() > 0  # differentiable through the detections' scores

    blind = {**perfect, "heatmap": torch.full_like(perfect["heatmap"], -20.0)}
    assert torch.equal(task.is_correct(blind, batch), ~has_target)  # nothing found: only empty slices pass

    fabricated = perfect["heatmap"].clone()
    free = (~has_target).nonzero()[0, 0]
    fabricated[free, 0, 1, 1] = 5.0  # a sure detection on a slice without any finding
    verdict = task.is_correct({**perfect, "heatmap": fabricated}, batch)
    assert not verdict[free] and verdict.sum() == len(verdict) - 1


def test_the_evaluation_reads_each_cells_froc_where_it_reads_its_cpm(fitted):
    """RobustnessEvaluation keeps, per (attack, eps), the FROC of the very states its cpm row comes from: read at
    LUNA16's rates it gives that row's value, at the row's kind of points (PGD: worst-loss), clean once per attack."""
    from medrobust.attacks import PGD
    from medrobust.callbacks import RobustnessEvaluation

    task, val, _ = fitted
    evaluation = RobustnessEvaluation([PGD(steps=5)], eps=[0.0, 0.1, 0.3])
    with torch.inference_mode():  # as Lightning's validation and test loops call it
        result = evaluation.evaluate(task, val, split="val", epoch=0, max_batches=None)
    rows = {(row["attack"], row["eps"]): row for row in result.rows if row["metric"] == "cpm"}
    assert set(result.curves) == set(rows)
    for cell, curves in result.curves.items():
        curve, points = curves["cpm"]
        assert curve.summary == pytest.approx(rows[cell]["value"], abs=1e-6) and points == rows[cell]["points"]
        assert curve.summary == pytest.approx(sum(y for _, y in curve.marks) / 7)
    values = [rows[cell]["value"] for cell in sorted(rows)]
    assert values[0] > 0.3 and values[-1] < values[0]  # curves that differ, so a mixed-up cell would show
