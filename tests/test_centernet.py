"""CenterNet (src/medrobust/models/centernet.py, src/medrobust/losses/centernet.py): output shapes, the target
encoding and decoding round trip (2-D, 3-D, an empty image, nearby boxes), the focal loss on hand-computed values,
per-sample losses and their input gradients, a tiny overfit, and the errors for bad dimensions and sizes."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from medrobust.losses.centernet import CenterNetLoss, centernet_loss, centernet_loss_terms, heatmap_focal_loss
from medrobust.models.centernet import CenterNet, decode, decode_padded, encode_targets
from medrobust.tasks.detection_metrics import box_iou

SMALL = (8, 16, 32)  # divisor 4: tiny inputs work


def padded(per_image: list[list[tuple[list[float], int]]], dims: int) -> tuple[torch.Tensor, ...]:
    """``[[(box, label), ...] per image]`` -> padded ``boxes (B, N, 2d)``, ``labels (B, N)``, ``box_valid (B, N)``;
    padding rows hold garbage (a box at the image centre, label 0) that must be ignored."""
    count = max(1, max(len(objects) for objects in per_image))
    boxes = torch.full((len(per_image), count, 2 * dims), 16.0)
    labels = torch.zeros(len(per_image), count, dtype=torch.long)
    valid = torch.zeros(len(per_image), count, dtype=torch.bool)
    for b, objects in enumerate(per_image):
        for n, (box, label) in enumerate(objects):
            boxes[b, n], labels[b, n], valid[b, n] = torch.tensor(box), label, True
    return boxes, labels, valid


def targets_as_output(targets: dict[str, torch.Tensor], eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """A network output that reproduces ``targets``: heatmap logits ``logit(clamp(target))``, the size and offset
    targets written into dense maps at the centre cells."""
    dims = targets["size"].shape[-1]
    out_shape = targets["heatmap"].shape[2:]
    output = {"heatmap": torch.logit(targets["heatmap"].clamp(eps, 1 - eps))}
    for key in ("size", "offset"):
        dense = torch.zeros(len(targets[key]), dims, math.prod(out_shape))
        for b, n in targets["mask"].nonzero().tolist():
            dense[b, :, targets["index"][b, n]] = targets[key][b, n]
        output[key] = dense.view(-1, dims, *out_shape)
    return output


# 2-D: image 0 two boxes of two classes, image 1 none, image 2 two boxes 5 px apart (neighbouring cells at stride 4)
BOXES_2D = [[([3.2, 5.0, 20.6, 13.0], 0), ([40.0, 30.5, 52.0, 61.5], 1)],
            [],
            [([20.0, 20.0, 30.0, 28.0], 1), ([25.0, 22.5, 35.0, 31.5], 1)]]
BOXES_3D = [[([2.5, 3.0, 4.0, 12.5, 9.0, 20.0], 0), ([18.0, 20.0, 16.0, 30.0, 31.0, 22.0], 1)],
            [],
            [([10.0, 10.0, 10.0, 16.0, 16.0, 16.0], 0), ([14.0, 15.0, 10.0, 20.0, 21.0, 16.0], 0)]]


@pytest.mark.parametrize("dims,size,stride", [(2, 64, 4), (2, 32, 2), (3, 32, 4), (3, 16, 2)])
def test_forward_shapes_and_heatmap_prior(dims, size, stride):
    torch.manual_seed(0)
    net = CenterNet(dims, in_channels=2, num_classes=3, features=SMALL, stride=stride).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 2, *[size] * dims))
    spatial = (size // stride,) * dims
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "heatmap": (2, 3, *spatial), "size": (2, dims, *spatial), "offset": (2, dims, *spatial)}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert net.heads["heatmap"][-1].bias.detach().tolist() == pytest.approx([math.log(0.1 / 0.9)] * 3)


@pytest.mark.parametrize("dims,per_image,stride", [(2, BOXES_2D, 4), (2, BOXES_2D, 2), (3, BOXES_3D, 4)])
def test_encode_decode_round_trip(dims, per_image, stride):
    size = 64 if dims == 2 else 32
    out_shape = (size // stride,) * dims
    boxes, labels, valid = padded(per_image, dims)
    targets = encode_targets(boxes, labels, valid, out_shape, stride, num_classes=2)
    assert targets["heatmap"].shape == (3, 2, *out_shape)
    assert targets["heatmap"][1].eq(0).all()  # the image without boxes (its padding row is ignored)
    assert targets["mask"].sum(1).tolist() == [len(objects) for objects in per_image]
    # one peak of exactly 1 per object, at its centre cell; values in [0, 1]
    assert targets["heatmap"].eq(1).sum().item() == sum(len(objects) for objects in per_image)
    assert targets["heatmap"].min() >= 0 and targets["heatmap"].max() <= 1
    assert ((targets["offset"] >= 0) & (targets["offset"] < 1)).all()

    detections = decode(targets_as_output(targets), stride)
    for found, objects in zip(detections, per_image):
        assert len(found["boxes"]) == len(objects)
        if not objects:
            continue
        truth = torch.tensor([box for box, _ in objects])
        iou = box_iou(found["boxes"], truth)
        match = iou.argmax(0)  # each true box's detection
        assert sorted(match.tolist()) == list(range(len(objects)))
        assert torch.allclose(found["boxes"][match], truth, atol=1.0)
        assert found["labels"][match].tolist() == [label for _, label in objects]
        assert (found["scores"] > 0.99).all()


def test_decode_padded_form_limits_and_orders():
    boxes, labels, valid = padded(BOXES_2D, 2)
    output = targets_as_output(encode_targets(boxes, labels, valid, (16, 16), 4, num_classes=2))
    result = decode_padded(output, 4, max_detections=5)
    assert result["boxes"].shape == (3, 5, 4) and result["labels"].shape == (3, 5)
    assert result["valid"].sum(1).tolist() == [2, 0, 2]
    assert (result["scores"][:, :-1] >= result["scores"][:, 1:]).all()
    assert [len(d["boxes"]) for d in decode(output, 4, max_detections=1)] == [1, 0, 1]


def test_boxes_centred_outside_the_image_are_dropped():
    boxes, labels, valid = padded([[([-20.0, 4.0, -2.0, 10.0], 0), ([4.0, 4.0, 10.0, 10.0], 0)]], 2)
    targets = encode_targets(boxes, labels, valid, (8, 8), 4, num_classes=1)
    assert targets["mask"].tolist() == [[False, True]] and targets["heatmap"].eq(1).sum() == 1


def test_focal_loss_hand_computed():
    target = torch.tensor([0.5, 1.0, 0.0]).view(1, 1, 1, 3)
    prob = torch.tensor([0.2, 0.7, 0.1])
    logits = torch.logit(prob).view(1, 1, 1, 3)
    # cell 1 is the peak: (1 - p)^2 log p; cells 0 and 2: (1 - y)^4 p^2 log(1 - p); one object
    expected = -((0.3**2) * math.log(0.7) + (0.5**4) * (0.2**2) * math.log(0.8) + (0.1**2) * math.log(0.9))
    assert heatmap_focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    assert heatmap_focal_loss(logits, target, num_objects=torch.tensor([2])).item() == pytest.approx(expected / 2,
                                                                                                     rel=1e-5)
    # a sample without objects: its negatives' sum, divided by 1, not 0
    empty = heatmap_focal_loss(logits, torch.zeros_like(target)).item()
    assert empty == pytest.approx(-sum(p**2 * math.log(1 - p) for p in (0.2, 0.7, 0.1)), rel=1e-5)


def test_loss_is_near_zero_for_a_perfect_output_and_not_otherwise():
    boxes, labels, valid = padded(BOXES_2D, 2)
    targets = encode_targets(boxes, labels, valid, (16, 16), 4, num_classes=2)
    perfect = targets_as_output(targets)
    # the focal loss is minimal for p = 1 at peaks and p = 0 elsewhere (the Gaussian only reduces the penalty)
    perfect["heatmap"] = torch.where(targets["heatmap"].eq(1), 20.0, -20.0)
    terms = centernet_loss_terms(perfect, targets)
    for name, value in terms.items():
        assert value.abs().max() < 1e-6, name
    shifted = dict(perfect, size=perfect["size"] + 0.5, offset=perfect["offset"] - 0.25)
    terms = centernet_loss_terms(shifted, targets)
    assert terms["size"].tolist() == pytest.approx([0.5, 0.0, 0.5])  # the empty image has no centres to judge
    assert terms["offset"].tolist() == pytest.approx([0.25, 0.0, 0.25])
    wrong = dict(perfect, heatmap=-perfect["heatmap"])
    assert (centernet_loss_terms(wrong, targets)["heatmap"] > 1).all()


def _batch(dims: int = 2, size: int = 32):
    boxes, labels, valid = padded(BOXES_2D if dims == 2 else BOXES_3D, dims)
    scale = size / (64 if dims == 2 else 32)
    return torch.randn(3, 1, *[size] * dims), boxes * scale, labels, valid


@pytest.mark.parametrize("dims", [2, 3])
def test_per_sample_loss_equals_each_sample_alone(dims):
    torch.manual_seed(0)
    net = CenterNet(dims, 1, 2, features=SMALL, stride=4).eval()  # eval: batch norm on its running statistics
    x, boxes, labels, valid = _batch(dims, 32 if dims == 2 else 16)
    targets = encode_targets(boxes, labels, valid, [s // 4 for s in x.shape[2:]], 4, num_classes=2)
    with torch.no_grad():
        together = centernet_loss(net(x), targets)
        terms = centernet_loss_terms(net(x), targets)
        alone = [centernet_loss(net(x[i:i + 1]), {k: v[i:i + 1] for k, v in targets.items()}) for i in range(3)]
        assert CenterNetLoss()(net(x), targets).item() == pytest.approx(together.mean().item())
    assert together.shape == (3,)
    assert torch.allclose(together, torch.cat(alone), rtol=1e-5, atol=1e-6)
    assert set(terms) == {"heatmap", "size", "offset"} and all(v.shape == (3,) for v in terms.values())
    total = terms["heatmap"] + 0.1 * terms["size"] + terms["offset"]
    assert torch.allclose(together, total)


def test_gradient_of_one_sample_loss_reaches_only_its_input():
    torch.manual_seed(0)
    net = CenterNet(2, 1, 2, features=SMALL, stride=4).eval()
    x, boxes, labels, valid = _batch()
    x.requires_grad_(True)
    targets = encode_targets(boxes, labels, valid, (8, 8), 4, num_classes=2)
    centernet_loss(net(x), targets)[0].backward()
    assert x.grad[0].abs().sum() > 0
    assert x.grad[1:].eq(0).all()  # per-sample: the attack on one image does not leak into the others
    x.grad = None
    centernet_loss(net(x), targets).sum().backward()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()  # the empty image too (its negatives)


def _squares(count: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[list[float]]]:
    """``count`` noisy images, each with one bright square of side 10..16 px; their boxes."""
    images = 0.1 * torch.randn(count, 1, size, size, generator=generator)
    boxes = []
    for image in images:
        side = int(torch.randint(10, 17, (1,), generator=generator))
        row, col = (int(v) for v in torch.randint(2, size - side - 2, (2,), generator=generator))
        image[0, row:row + side, col:col + side] += 1.0
        boxes.append([row, col, row + side, col + side])
    return images, boxes


def test_tiny_overfit_finds_the_squares():
    start = time.perf_counter()
    torch.manual_seed(0)
    images, boxes = _squares(4, 48, torch.Generator().manual_seed(1))
    net = CenterNet(2, 1, 1, features=SMALL, stride=4)
    targets = encode_targets(torch.tensor(boxes, dtype=torch.float32)[:, None], torch.zeros(4, 1, dtype=torch.long),
                             torch.ones(4, 1, dtype=torch.bool), (12, 12), 4, num_classes=1)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        optimiser.zero_grad()
        loss = CenterNetLoss()(net(images), targets)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
    net.eval()
    with torch.no_grad():
        found = decode(net(images), 4, score_threshold=0.3)
    for detections, box in zip(found, boxes):
        assert len(detections["boxes"]) >= 1
        assert box_iou(detections["boxes"][:1], np.array([box], float))[0, 0] > 0.5, (detections, box)
    assert time.perf_counter() - start < 30


def test_bad_dimensions_strides_and_sizes_raise_clearly():
    for dims in (1, 4):
        with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
            CenterNet(dims, 1, 1)
    with pytest.raises(ValueError, match="stride must be a power of two"):
        CenterNet(2, 1, 1, features=SMALL, stride=3)
    with pytest.raises(ValueError, match="stride must be a power of two"):
        CenterNet(2, 1, 1, features=SMALL, stride=8)  # deeper than the U-Net
    with pytest.raises(ValueError, match="divisible by 8"):
        CenterNet(2, 1, 1, features=(8, 16, 32, 64), image_size=(128, 100))
    net = CenterNet(3, 1, 1, features=SMALL, stride=2)
    with pytest.raises(ValueError, match=r"divisible by 4 .*got \(16, 16, 18\)"):
        net(torch.zeros(1, 1, 16, 16, 18))
    with pytest.raises(ValueError, match="3 spatial axes"):
        net(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="2 \\* 2 = 4 coordinates"):
        encode_targets(torch.zeros(1, 1, 6), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                       (8, 8), 4, num_classes=1)
