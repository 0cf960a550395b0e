"""model=retinanet: MONAI's RetinaNet without torchvision, checked against MONAI's own RetinaNetDetector where it
runs here (output layout, anchors, ATSS matching, NMS), the losses' known answers, and DetectionTask on it."""

from __future__ import annotations

import sys

import pytest
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.data.box_utils import batched_nms

from medrobust.losses.retinanet import box_coder, match_anchors
from medrobust.models.retinanet import RetinaNet, split_strided_pointwise
from medrobust.tasks.detection import DetectionTask
from medrobust.tasks.detection_formats import RetinaNetFormat, greedy_nms

SIZES = {2: 64, 3: 32}


def net_and_input(dims: int, batch: int = 2) -> tuple[RetinaNet, torch.Tensor]:
    torch.manual_seed(0)
    return RetinaNet(spatial_dims=dims).eval(), torch.rand(batch, 1, *[SIZES[dims]] * dims)


def monai_detector(net: RetinaNet) -> RetinaNetDetector:
    detector = RetinaNetDetector(net.network, net.anchor_generator)
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    return detector


def one_box_batch(dims: int, boxes: list[list[float]], keep: list[bool] | None = None) -> dict:
    keep = [True] * len(boxes) if keep is None else keep
    valid = torch.ones(1, len(boxes), dtype=torch.bool)
    return {"boxes": torch.tensor([boxes], dtype=torch.float32), "labels": torch.zeros(1, len(boxes), dtype=torch.long),
            "box_valid": valid, "box_target": torch.tensor([keep])}


@pytest.mark.parametrize("dims", [2, 3])
def test_output_and_anchors_are_monais_in_its_order_and_no_torchvision_is_imported(dims):
    net, x = net_and_input(dims)
    with torch.no_grad():
        out = net(x)
        heads = net.network(x)
    detector = monai_detector(net)
    detector.generate_anchors(x, heads)
    anchors = out["anchors"].shape[2]
    assert out["heatmap"].shape == (2, 1, anchors) and out["box"].shape == (2, 2 * dims, anchors)
    torch.testing.assert_close(out["heatmap"].transpose(1, 2), detector._reshape_maps(heads[detector.cls_key]))
    torch.testing.assert_close(out["box"].transpose(1, 2), detector._reshape_maps(heads[detector.box_reg_key]))
    torch.testing.assert_close(out["anchors"][0].t(), detector.anchors[0].float())
    locations = [m.shape[2:].numel() for m in heads[detector.cls_key]]
    assert RetinaNetFormat(net.anchor_sides, 1, 1.0).locations_per_level(out["anchors"][0]) == locations
    assert "torchvision" not in sys.modules


@pytest.mark.parametrize("dims", [2, 3])
def test_anchor_matching_is_monais_atss(dims):
    net, x = net_and_input(dims)
    with torch.no_grad():
        out, heads = net(x), net.network(x)
    detector = monai_detector(net)
    detector.generate_anchors(x, heads)
    locations = [m.shape[2:].numel() for m in heads[detector.cls_key]]
    side = SIZES[dims]
    for boxes in ([[5.0] * dims + [9.0] * dims], [[10.0] * dims + [22.0] * dims, [2.0] * dims + [6.0] * dims],
                  [[side - 12.0] * dims + [side - 1.0] * dims]):
        gt = torch.tensor(boxes)
        ours = match_anchors(RetinaNetFormat(net.anchor_sides, 1, 1.0).matcher, gt, out["anchors"][0].t(), locations,
                             net.anchors_per_cell)
        # what RetinaNetDetector.compute_anchor_matched_idxs passes its ATSS matcher (the method itself reaches for
        # torchvision's Matcher class, which is not installed)
        _, theirs = detector.proposal_matcher(gt, detector.anchors[0], locations, detector.num_anchors_per_loc)
        assert torch.equal(ours, theirs) and (ours >= 0).any()
        assert set(ours[ours >= 0].tolist()) == set(range(len(gt)))  # every box has anchors


def test_greedy_nms_keeps_what_monais_batched_nms_keeps():
    torch.manual_seed(1)
    for _ in range(50):
        n = int(torch.randint(0, 80, ()))
        lo = torch.rand(n, 2) * 30
        boxes = torch.cat([lo, lo + 1 + torch.rand(n, 2) * 10], 1)
        scores, labels = torch.rand(n).round(decimals=1), torch.randint(0, 3, (n,))  # rounded: ties happen
        assert greedy_nms(boxes, scores, labels, 0.5, 10_000).tolist() == batched_nms(boxes, scores, labels,
                                                                                     0.5).tolist()
        first_three = batched_nms(boxes, scores, labels, 0.5)[:3].tolist()
        assert greedy_nms(boxes, scores, labels, 0.5, 3).tolist() == first_three


def perfect_output(task: DetectionTask, net: RetinaNet, x: torch.Tensor, batch: dict, margin: float = 30.0) -> dict:
    """An output whose classification is sure and right at the matched anchors (and sure of background elsewhere)
    and whose deltas are the matched boxes' exact encoding."""
    with torch.no_grad():
        out = net(x)
    fmt = task.format
    anchors = out["anchors"][0].t()
    keep = task.target_mask(batch)[0]
    gt = batch["boxes"][0][keep]
    matched = match_anchors(fmt.matcher, gt, anchors, fmt.locations_per_level(out["anchors"][0]), net.anchors_per_cell)
    positive = matched >= 0
    heatmap = torch.full_like(out["heatmap"], -margin)
    heatmap[0, 0, positive] = margin
    box = torch.zeros_like(out["box"])
    box[0][:, positive] = box_coder(x.ndim - 2).encode_single(gt[matched[positive]], anchors[positive]).t().float()
    return {"heatmap": heatmap, "box": box, "anchors": out["anchors"]}


@pytest.mark.parametrize("dims", [2, 3])
def test_losses_vanish_on_the_perfect_output_and_grow_away_from_it(dims):
    net, x = net_and_input(dims, batch=1)
    task = DetectionTask(net, memory_format="contiguous")
    batch = one_box_batch(dims, [[6.0] * dims + [14.0] * dims])
    perfect = perfect_output(task, net, x, batch)
    terms = task.loss_terms(perfect, batch)[0]
    assert task.terms == ("classification", "box") and terms.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    shifted = {**perfect, "box": perfect["box"] + 0.5}
    wrong = {**perfect, "heatmap": -perfect["heatmap"]}
    assert task.loss_terms(shifted, batch)[0, 1] > 0.1 and task.loss_terms(wrong, batch)[0, 0] > 10
    found = task.detections(perfect)  # the decoder finds the box, once (NMS drops the other matched anchors)
    assert int(found["valid"][0].sum()) == 1
    torch.testing.assert_close(found["boxes"][0, 0], batch["boxes"][0, 0], atol=1e-3, rtol=0)


def test_irrelevant_findings_are_background_and_an_empty_image_has_no_box_term():
    net, x = net_and_input(2, batch=1)
    task = DetectionTask(net, memory_format="contiguous")
    target_only = one_box_batch(2, [[6.0, 6.0, 14.0, 14.0]])
    with_irrelevant = one_box_batch(2, [[6.0, 6.0, 14.0, 14.0], [30.0, 30.0, 40.0, 40.0]], keep=[True, False])
    perfect = perfect_output(task, net, x, target_only)
    torch.testing.assert_close(task.loss_terms(perfect, with_irrelevant), task.loss_terms(perfect, target_only))
    empty = {**target_only, "box_valid": torch.zeros(1, 1, dtype=torch.bool),
             "box_target": torch.zeros(1, 1, dtype=torch.bool)}
    xr = x.clone().requires_grad_(True)
    terms = task.loss_terms(task(xr), empty)
    assert terms[0, 1].item() == 0.0 and terms[0, 0].item() > 0
    (grad,) = torch.autograd.grad(task.attack_loss(task(xr), empty).sum(), xr)
    assert grad.abs().sum() > 0  # the focal term still pushes every anchor towards background


def test_retinanet_task_taus_and_errors_name_its_terms():
    net, x = net_and_input(2)
    task = DetectionTask(net, memory_format="contiguous")
    assert task.tau_metrics == ("tau_classification", "tau_box") and task.validation_tau.shape == (2,)
    assert task.tau.tolist() == [1.0, 1.0]  # the placeholders until a clean validation
    with pytest.raises(ValueError, match=r"\['classification', 'box'\] \(retinanet's loss terms\)"):
        DetectionTask(net, tau={"heatmap": 1.0, "size": 1.0, "offset": 1.0})
    fixed = DetectionTask(net, tau={"classification": 0.5, "box": 0.2})
    assert fixed.tau.tolist() == pytest.approx([0.5, 0.2])
    with pytest.raises(ValueError, match="box_weight must be a number >= 0"):
        DetectionTask(net, box_weight=-1)


def test_trades_divergence_is_zero_on_equal_outputs_and_positive_otherwise():
    net, x = net_and_input(2)
    task = DetectionTask(net, memory_format="contiguous")
    batch = {**one_box_batch(2, [[6.0, 6.0, 14.0, 14.0]]), "image": x}
    batch = {key: value.expand(2, *value.shape[1:]) if key != "image" else value for key, value in batch.items()}
    with torch.no_grad():
        clean, moved = task(x), task(x + 0.05 * torch.randn_like(x))
    assert task.output_divergence(clean, clean, batch).abs().max() < 1e-6
    assert (task.output_divergence(clean, moved, batch) > 0).all()


def test_remembered_anchor_targets_follow_the_batch():
    """The format remembers the last batch's targets (an attack's steps share them); a changed batch, in place or
    new, gets its own."""
    net, x = net_and_input(2, batch=1)
    task = DetectionTask(net, memory_format="contiguous")
    with torch.no_grad():
        out = net(x)

    def fresh(batch: dict) -> torch.Tensor:  # a task with nothing remembered
        return DetectionTask(net, memory_format="contiguous").loss_terms(out, {k: v.clone() for k, v in batch.items()})

    batch = one_box_batch(2, [[6.0, 6.0, 14.0, 14.0]])
    first = task.loss_terms(out, batch)
    torch.testing.assert_close(task.loss_terms(out, batch), first)
    batch["boxes"][0, 0] += 20.0  # moved in place
    moved = task.loss_terms(out, batch)
    assert not torch.allclose(moved, first)
    torch.testing.assert_close(moved, fresh(batch))
    other = one_box_batch(2, [[30.0, 30.0, 50.0, 50.0]])
    torch.testing.assert_close(task.loss_terms(out, other), fresh(other))
    batch["box_target"][0, 0] = False  # the same boxes, now an irrelevant finding: no positive anchor
    assert task.loss_terms(out, batch)[0, 1].item() == 0.0


@pytest.mark.parametrize("dims", [2, 3])
def test_strided_pointwise_convolutions_are_split_without_changing_the_function(dims):
    conv_type = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    torch.manual_seed(0)
    original = conv_type(8, 16, 1, stride=2)
    holder = torch.nn.Sequential(conv_type(8, 16, 1, stride=2))
    holder[0].load_state_dict(original.state_dict())
    split_strided_pointwise(holder)
    assert isinstance(holder[0], torch.nn.Sequential) and holder[0][1].stride == (1,) * dims
    x = torch.randn(2, 8, *[9] * dims)  # odd: the strided output keeps the first and every other pixel
    torch.testing.assert_close(holder(x), original(x))


def test_a_channels_last_training_step_runs():
    """The ResNet shortcut (1x1, stride 2, 8 -> 16 channels on 64 x 64 maps) crashed torch 2.13's CPU backward in
    channels-last; task=luna trains channels-last by default."""
    torch.manual_seed(0)
    net = RetinaNet(spatial_dims=2).to(memory_format=torch.channels_last)
    out = net(torch.rand(16, 1, 128, 128).contiguous(memory_format=torch.channels_last))
    (out["heatmap"].sum() + out["box"].sum()).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.modules())  # leaky everywhere, as the CenterNet


def test_fabrication_candidates_are_the_nms_survivors():
    """Two anchors decoded to one box: only the higher is a candidate; a far one is too; nothing else scores."""
    net, x = net_and_input(2, batch=1)
    task = DetectionTask(net, memory_format="contiguous")
    with torch.no_grad():
        out = net(x)
    anchors = out["anchors"][0].t()
    first, same, far = 0, 1, 3 * 20  # cell 0 (the padding rows' index, which must not hide it), its next anchor
    box = torch.zeros_like(out["box"])  # shape, and the first anchor of a cell further along
    box[0, :, same] = box_coder(2).encode_single(anchors[first:first + 1], anchors[same:same + 1])[0]  # first's box
    heatmap = torch.full_like(out["heatmap"], -1e4)
    heatmap[0, 0, [first, same, far]] = torch.tensor([0.0, -1.0, -0.5])
    output = {"heatmap": heatmap, "box": box, "anchors": out["anchors"]}
    assert task.candidate_mask(output)[0, 0].nonzero()[:, 0].tolist() == [first, far]
    heatmap[0, 0, same] = 1.0  # now the other anchor wins the box
    assert task.candidate_mask(output)[0, 0].nonzero()[:, 0].tolist() == [same, far]


def test_model_retinanet_brings_its_training_recipe_and_the_command_line_wins(tmp_path):
    """conf/model/retinanet.yaml sets its lr, clean epochs before adversarial training and epochs over the
    detection task's (which stay the CenterNet's); a value given on the command line wins over them."""
    from medrobust.config import compose_config

    def settings(*overrides):
        cfg = compose_config("train", ["task=luna", *overrides], tmp_path)
        return cfg.module.optimizer.lr, cfg.adv.clean_epochs, cfg.trainer.max_epochs

    assert settings("adv=pgd") == (0.003, 0, 5)
    assert settings("adv=pgd", "model=retinanet") == (0.001, 3, 10)
    assert settings("adv=trades", "model=retinanet", "data.spatial_dims=3") == (0.001, 3, 10)
    assert settings("adv=pgd", "model=retinanet", "module.optimizer.lr=0.01", "adv.clean_epochs=0",
                    "trainer.max_epochs=4") == (0.01, 0, 4)
    assert settings("adv=pgd", "model=retinanet", "task=bccd")[2] == 12  # a task's own epochs stay its own
