"""Batch norm on running statistics inside an attack session: same outputs, same input gradient, cheaper backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medrobust.attacks import ClassifierObjective
from medrobust.attacks.core.session import attack_session, loss_and_grad
from medrobust.attacks.core.frozen_norm import frozen_norm_gradients


def bn_net(spatial_dims: int) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    net = nn.Sequential(conv(1, 4, 3, padding=1), norm(4), nn.ReLU(), conv(4, 6, 3, padding=1),
                        norm(6, affine=False), nn.ReLU(), nn.Flatten(1), nn.LazyLinear(8), nn.BatchNorm1d(8),
                        nn.ReLU(), nn.Linear(8, 3))
    net(torch.rand((4, 1) + (6,) * spatial_dims))  # materialize the lazy layer
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                if m.affine:
                    m.weight.uniform_(0.5, 2.0)
                    m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def native_loss_and_grad(net, x, batch):
    x = x.clone().requires_grad_(True)
    loss = ClassifierObjective().attack_loss(net(x), batch)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_same_outputs_and_input_gradient_as_native_batch_norm(spatial_dims):
    torch.manual_seed(0)
    net = bn_net(spatial_dims)
    x = torch.rand((5, 1) + (6,) * spatial_dims)
    batch = {"label": torch.randint(0, 3, (5,))}
    loss_ref, grad_ref = native_loss_and_grad(net, x, batch)
    with attack_session(net):
        loss, grad, _ = loss_and_grad(net, ClassifierObjective(), x, batch)
    assert torch.equal(loss, loss_ref)  # the layers' own forward: bit-identical
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_float64_models_keep_float64_gradients():
    torch.manual_seed(0)
    net = bn_net(3).double()
    x = torch.rand((3, 1) + (6,) * 3, dtype=torch.float64)
    batch = {"label": torch.randint(0, 3, (3,))}
    _, grad_ref = native_loss_and_grad(net, x, batch)
    with attack_session(net):
        _, grad, _ = loss_and_grad(net, ClassifierObjective(), x, batch)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-15)


def test_layers_get_their_forward_back_and_train_mode_layers_are_left_alone():
    net = bn_net(2)
    net[1].train()  # a layer on batch statistics: its gradient couples samples, not a per-channel scale
    own = lambda x: x  # noqa: E731 - a user's own instance-level forward
    net[4].forward = own
    patched = []
    with frozen_norm_gradients(net):
        patched = [i for i, m in enumerate(net) if "forward" in vars(m)]
        with frozen_norm_gradients(net):  # nested: nothing patched twice
            assert [i for i, m in enumerate(net) if "forward" in vars(m)] == patched
    assert patched == [4, 8]  # the user-patched layer keeps its forward; the eval BatchNorm1d is patched
    assert net[4].forward is own
    assert [i for i, m in enumerate(net) if "forward" in vars(m)] == [4]


def test_bn_eval_false_keeps_batch_statistics_and_their_gradient():
    torch.manual_seed(0)
    net = bn_net(2).train()
    x, batch = torch.rand(5, 1, 6, 6), {"label": torch.randint(0, 3, (5,))}
    _, grad_ref = native_loss_and_grad(net, x, batch)  # batch statistics: the samples' gradients couple
    with attack_session(net, bn_eval=False):
        assert not any("forward" in vars(m) for m in net.modules())
        _, grad, _ = loss_and_grad(net, ClassifierObjective(), x, batch)
    torch.testing.assert_close(grad, grad_ref)


def test_gradient_dtype_follows_the_input_under_bf16_autocast():
    torch.manual_seed(0)
    net = bn_net(2)
    x = torch.rand(4, 1, 6, 6)
    with attack_session(net), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = net[0](x.requires_grad_(True))
        assert hidden.dtype == torch.bfloat16
        hidden = hidden.detach().requires_grad_(True)
        out = net[1](hidden)
        (grad,) = torch.autograd.grad(out.float().sum(), hidden)
    assert grad.dtype == torch.bfloat16
    scale = net[1].weight / torch.sqrt(net[1].running_var + net[1].eps)
    torch.testing.assert_close(grad.float(), scale.view(1, -1, 1, 1).expand_as(grad).to(torch.bfloat16).float())
