"""ShapeNet (src/medrobust/models/shape_net.py): outputs, the initial outline, gradients, autocast, its configs."""

from __future__ import annotations

import math

import pytest
import torch

from medrobust.models.shape_net import ShapeNet
from medrobust.runner import build_net
from conftest import compose_config

BACKBONES = ["small", "resnet18"]


@pytest.fixture(scope="module", params=BACKBONES)
def net(request) -> ShapeNet:
    torch.manual_seed(0)
    return ShapeNet(backbone=request.param, num_points=16).eval()


def _signed_area(points: torch.Tensor) -> torch.Tensor:
    """Shoelace area of ``(..., K, 2)`` (row, col) outlines with ``x = col``, ``y = -row``: > 0 counter-clockwise on
    screen."""
    x, y = points[..., 1], -points[..., 0]
    return 0.5 * (x * y.roll(-1, -1) - x.roll(-1, -1) * y).sum(-1)


@pytest.mark.parametrize("size", [48, 64])
def test_outputs_have_the_documented_shapes(net, size):
    with torch.no_grad():
        out = net(torch.rand(2, 1, size, size))
    assert set(out) == {"points", "mask"}
    assert out["points"].shape == (2, 16, 2) and out["points"].dtype == torch.float32
    assert out["mask"].shape == (2, 1, size, size)


def test_resnet18_pads_sizes_not_divisible_by_32_and_small_refuses_them():
    with torch.no_grad():
        assert ShapeNet(backbone="resnet18", num_points=8).eval()(torch.rand(1, 1, 40, 56))["mask"].shape == \
            (1, 1, 40, 56)
    with pytest.raises(ValueError, match=r"divisible by 8, got size \(44, 44\)"):
        ShapeNet(patch_size=44)
    with pytest.raises(ValueError, match=r"divisible by 8, got size \(44, 48\)"):
        ShapeNet(num_points=8)(torch.rand(1, 1, 44, 48))


@pytest.mark.parametrize("size", [48, 64])
def test_initial_points_are_the_documented_circle(net, size):
    """Radius H / 8 around the centre, first point topmost, counter-clockwise on screen, the same for any image."""
    with torch.no_grad():
        points = net(torch.rand(3, 1, size, size))["points"]
    k, c, r = 16, (size - 1) / 2, size / 8
    t = 2 * math.pi * torch.arange(k) / k
    circle = torch.stack([c - r * torch.cos(t), c - r * torch.sin(t)], dim=1)
    assert torch.allclose(points, circle.expand_as(points), atol=0.5)  # small, not zero, last-layer weights
    assert (points[:, 0, 0] < points[:, 1:, 0].min(dim=1).values).all()  # starts at the top
    assert (_signed_area(points) > 0).all()
    assert _signed_area(points)[0].item() == pytest.approx(k / 2 * r * r * math.sin(2 * math.pi / k), rel=0.05)


@pytest.mark.parametrize("key", ["points", "mask"])
def test_gradient_reaches_the_input_from_each_head(net, key):
    x = torch.rand(2, 1, 48, 48, requires_grad=True)
    net(x)[key].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_autocast_and_channels_last(net):
    x = torch.rand(2, 1, 48, 48).to(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out["points"].dtype == torch.float32 and torch.isfinite(out["points"]).all()
    assert out["mask"].shape == (2, 1, 48, 48) and torch.isfinite(out["mask"].float()).all()
    (out["points"].sum() + out["mask"].float().sum()).backward()
    assert x.grad.abs().sum() > 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="shape reconstruction is 2-D"):
        ShapeNet(spatial_dims=3)
    with pytest.raises(ValueError, match=r"backbone must be one of \['small', 'resnet18'\]"):
        ShapeNet(backbone="vit")
    with pytest.raises(ValueError, match="num_points"):
        ShapeNet(num_points=2)


def test_a_few_steps_fit_fixed_outlines():
    """20 Adam steps on 4 fixed images (disks) toward their outlines cut the point MSE by a clear factor."""
    torch.manual_seed(0)
    size, k = 32, 16
    centres = torch.tensor([[12.0, 14.0], [18.0, 16.0], [15.5, 12.0], [14.0, 19.0]])
    radii = torch.tensor([5.0, 8.0, 6.0, 4.0])
    t = 2 * math.pi * torch.arange(k) / k
    target = centres[:, None] + radii[:, None, None] * torch.stack([-torch.cos(t), -torch.sin(t)], dim=1)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    distance = ((rows - centres[:, :1, None]) ** 2 + (cols - centres[:, 1:, None]) ** 2).sqrt()
    images = (distance <= radii[:, None, None]).float()[:, None]
    net = ShapeNet(num_points=k, features=(8, 16, 32))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = ((net(images)["points"] - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = ((net(images)["points"] - target) ** 2).mean().item()
    assert final < losses[0] / 10, (losses[0], final)  # ~100x here


@pytest.mark.parametrize("model,backbone", [("shape_net", "small"), ("shape_resnet18", "resnet18")])
def test_the_model_configs_build(model, backbone, tmp_path):
    """conf/model/shape_*.yaml through the runner's build_net: K from data.num_points, the patch size from data."""
    cfg = compose_config("train", [f"model={model}", "+data.num_points=24", "data.patch_size=48"], tmp_path)
    assert "weights" in cfg.model
    net = build_net(cfg).eval()
    assert isinstance(net, ShapeNet) and net.backbone == backbone and net.num_points == 24
    with torch.no_grad():
        out = net(torch.rand(2, 1, 48, 48))
    assert out["points"].shape == (2, 24, 2) and out["mask"].shape == (2, 1, 48, 48)
