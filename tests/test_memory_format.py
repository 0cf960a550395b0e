"""Channels-last convolution weights (medrobust.models.memory_format): same outputs and gradients as PyTorch's
default layout, contiguous outputs, checkpoints that load either way, and every task's config applies it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from monai.networks.nets import BasicUNet
from torch import nn

from conftest import compose_config
from medrobust.models import SmallCNN
from medrobust.models.memory_format import apply_memory_format
from medrobust.runner import build_data_and_module


def _conv_weights(net: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)]


def _layout_shows(weight: torch.Tensor) -> bool:
    """Whether the weight's layout is visible in its strides (one input channel or a 1 x 1 kernel: both layouts
    are the same memory)."""
    return weight.shape[1] > 1 and weight.shape[2:].numel() > 1


@pytest.mark.parametrize("dims, layout", [(2, torch.channels_last), (3, torch.channels_last_3d)])
def test_channels_last_gives_the_default_layouts_outputs_and_input_gradients(dims, layout):
    torch.manual_seed(0)
    reference = BasicUNet(spatial_dims=dims, in_channels=1, out_channels=3, features=(4, 4, 8, 8, 16, 4), norm="batch")
    reference.eval()
    net = apply_memory_format(copy.deepcopy(reference), "channels_last")
    assert all(w.is_contiguous(memory_format=layout) and not w.is_contiguous()
               for w in _conv_weights(net) if _layout_shows(w))

    x = torch.rand(2, 1, *([16] * dims))
    grads = []
    for model in (reference, net):
        z = x.clone().requires_grad_(True)
        out = model(z)
        assert out.is_contiguous()  # the tasks' losses flatten and gather over it
        (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), z)
        grads.append((out.detach(), grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5)


def test_contiguous_and_networks_without_convolutions_are_left_as_they_are():
    cnn = apply_memory_format(SmallCNN(spatial_dims=2), "contiguous")
    assert all(w.is_contiguous() for w in _conv_weights(cnn)) and not cnn._forward_hooks
    mlp = apply_memory_format(nn.Sequential(nn.Linear(4, 2)), "channels_last")
    assert not mlp._forward_hooks


def test_an_unknown_layout_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"module.memory_format must be one of \['channels_last', 'contiguous'\], "
                                         r"got 'nhwc'"):
        apply_memory_format(SmallCNN(spatial_dims=2), "nhwc")


def test_a_channels_last_checkpoint_loads_into_a_contiguous_model_and_the_net_pickles(tmp_path):
    torch.manual_seed(0)
    net = apply_memory_format(SmallCNN(spatial_dims=3), "channels_last")
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    plain = SmallCNN(spatial_dims=3)
    plain.load_state_dict(torch.load(path, weights_only=True))
    x = torch.rand(2, 1, 16, 16, 16)
    net.eval(), plain.eval()
    torch.testing.assert_close(net(x), plain(x), rtol=1e-4, atol=1e-5)
    clone = pickle.loads(pickle.dumps(net))  # ddp_spawn pickles the module, hook included
    torch.testing.assert_close(clone(x), net(x))


@pytest.mark.parametrize("task, dims", [("lidc", 2), ("brainage", 3), ("brainseg", 2), ("afids", 3)])
def test_every_task_config_builds_its_network_channels_last_and_can_opt_out(task, dims, tiny_for, tmp_path):
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    extra = ["data.spatial_dims=3"] if task == "afids" else []
    for memory_format, expected in (("channels_last", True), ("contiguous", False)):
        cfg = compose_config("train", [*tiny_for(task), *extra, f"module.memory_format={memory_format}"],
                             tmp_path / memory_format)
        _, module = build_data_and_module(cfg)
        weights = _conv_weights(module.net)
        assert weights and all(w.dim() == dims + 2 for w in weights)
        assert all(w.is_contiguous(memory_format=layout) == expected for w in weights if _layout_shows(w))
