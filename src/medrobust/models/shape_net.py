"""A 2-D shape-reconstruction network: a nodule patch -> an outline of ``K`` points and a mask.

Output conventions (``ShapeNet.forward``):

* ``points`` ``(B, K, 2)`` float32: absolute pixel coordinates in ``(row, col)`` index order, pixel centres at
  integers. The head predicts offsets from the patch centre ``((H - 1) / 2, (W - 1) / 2)`` in units of a quarter
  patch (``offset = raw * (H / 4, W / 4)``), so its raw outputs are O(1) whatever the patch size; the centre is
  added here. Computed in float32 even under autocast (bf16 has ~0.25 px resolution at 48 px).
* ``mask`` ``(B, 1, H, W)``: logits of the nodule mask, the input's size (bf16 under bf16 autocast).

At initialisation every image gets the same outline: a circle of radius ``H / 8`` (rows) and ``W / 8`` (cols)
around the centre, point ``i`` at ``t = 2 pi i / K``, ``row = c_r - r cos t``, ``col = c_c - r sin t``: it
starts at the top (smallest row) and runs counter-clockwise on screen (positive signed area with ``x = col``,
``y = -row``), the data's start / orientation convention. Training thus starts from a plausible outline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("small", "resnet18")
RESNET_DIVISOR = 32  # resnet18 halves the input 5 times


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """(Conv3x3-BN-ReLU) x 2, size kept."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    """A U-Net: double-conv blocks, max-pool down, transposed-conv up + concatenated skip, 1x1 conv mask head.

    ``forward(x)``: ``(B, C, H, W)`` -> ``(bottleneck (B, features[-1], H / 2**L, W / 2**L), mask logits
    (B, 1, H, W))`` with ``L = len(features) - 1``; ``H`` and ``W`` must be divisible by ``2**L``.
    """

    def __init__(self, in_channels: int, features: Sequence[int]) -> None:
        super().__init__()
        widths = [in_channels, *features]
        self.down = nn.ModuleList(_double_conv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(features[:-1], features[1:]))
        self.merge = nn.ModuleList(_double_conv(2 * a, a) for a in features[:-1])
        self.mask_head = nn.Conv2d(features[0], 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        bottleneck = skips.pop()
        x = bottleneck
        for up, merge in zip(reversed(self.up), reversed(self.merge)):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return bottleneck, self.mask_head(x)


class PointHead(nn.Module):
    """Bottleneck features ``(B, C, h, w)`` -> raw offsets ``(B, K, 2)`` (row, col; quarter-patch units).

    Average-pooled to a ``grid`` x ``grid`` map, not to one value per channel: where a feature sits is what
    outline points need. The last layer starts with small weights and the circle as its bias (module docstring);
    the weights are not zero, so the points' gradient reaches the input from the first step (attacks need it).
    LayerNorm + GELU, not ReLU: a ReLU head died in clean training (after 5 epochs of task=lidc_shape 2.75 of its
    256 units were active on average, and a quarter of the test patches had none: one constant outline and a zero
    input gradient, which the evaluation flagged as gradient masking); with LayerNorm + GELU ~190 are active and
    the clean test MRSE fell from 1.51 to 0.97 px.
    """

    def __init__(self, in_channels: int, num_points: int, grid: int, hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_points = num_points
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels * grid * grid, hidden),
                                 nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 2 * num_points))
        last = self.mlp[-1]
        nn.init.normal_(last.weight, std=1e-3)
        with torch.no_grad():
            last.bias.copy_(circle_offsets(num_points).flatten())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(features)).view(-1, self.num_points, 2)


def circle_offsets(num_points: int, radius: float = 0.5) -> torch.Tensor:
    """``(K, 2)`` (row, col) offsets of ``K`` points evenly on a circle: first at the top, counter-clockwise on
    screen. ``radius`` 0.5 in quarter-patch units is ``H / 8`` pixels."""
    t = 2 * math.pi * torch.arange(num_points, dtype=torch.float64) / num_points
    return torch.stack([-radius * torch.cos(t), -radius * torch.sin(t)], dim=1).float()


class ShapeNet(nn.Module):
    """Nodule patch ``(B, C, H, W)`` -> ``{"points": (B, K, 2), "mask": (B, 1, H, W)}`` (module docstring).

    Args:
        spatial_dims: must be 2 (shape reconstruction is 2-D).
        in_channels: input channels ``C``.
        num_points: outline points ``K`` (>= 3).
        features: ``backbone="small"``: width of each U-Net level; the input is halved ``len(features) - 1``
            times, so ``H`` and ``W`` must be divisible by ``2**(len(features) - 1)`` (8 by default: 48 and 64
            work), else ``ValueError``. Unused by ``resnet18``.
        backbone: ``"small"`` (this file's U-Net, the point head on its bottleneck) or ``"resnet18"`` (MONAI's
            ``FlexibleUNet`` with a ResNet-18 encoder, no pretrained weights, no torchvision; the point head on
            the encoder's deepest map). ``resnet18`` halves the input 5 times: inputs not divisible by 32 are
            padded (replicate, split evenly, so the centre stays the centre) and the mask cropped back.
        patch_size: the patch side(s) the data gives, if known: checked against the divisor at construction, so a
            bad size fails at build time rather than at the first batch. Points scale with the input's own size.
        dropout: before the point head's first linear layer (and in FlexibleUNet's decoder for ``resnet18``).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_points: int = 64,
                 features: Sequence[int] = (16, 32, 64, 128), backbone: str = "small",
                 patch_size: int | Sequence[int] | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"shape reconstruction is 2-D: ShapeNet needs spatial_dims=2, got {spatial_dims!r} "
                             f"(run 3-D data slice by slice)")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}")
        if not (isinstance(num_points, int) and num_points >= 3):
            raise ValueError(f"num_points must be an integer >= 3 (an outline), got {num_points!r}")
        self.backbone = backbone
        self.num_points = num_points
        if backbone == "small":
            features = [int(f) for f in features]
            if len(features) < 2 or min(features) < 1:
                raise ValueError(f"features must list >= 2 positive widths, got {features!r}")
            self.divisor = 2 ** (len(features) - 1)
            self.unet = SmallUNet(in_channels, features)
            self.point_head = PointHead(features[-1], num_points, grid=4, dropout=dropout)
        else:
            from monai.networks.nets import FlexibleUNet

            self.divisor = RESNET_DIVISOR
            self.unet = FlexibleUNet(in_channels, out_channels=1, backbone="resnet18", pretrained=False,
                                     spatial_dims=2, dropout=dropout)
            # the deepest map is 2 x 2 for a (padded) 64 patch: a finer grid would only repeat its cells
            self.point_head = PointHead(512, num_points, grid=2, dropout=dropout)
        if patch_size is not None and backbone == "small":  # resnet18 pads any size
            self._check_size([patch_size] * 2 if isinstance(patch_size, int) else list(patch_size))

    def _check_size(self, sizes: Sequence[int]) -> None:
        bad = [s for s in sizes if s % self.divisor]
        if bad:
            raise ValueError(f"ShapeNet(backbone='small', {len(self.unet.down)} feature levels) needs H and W "
                             f"divisible by {self.divisor}, got size {tuple(sizes)}; crop or pad the patches, or "
                             f"use fewer feature levels")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C, H, W)`` -> ``{"points": (B, K, 2) float32 (row, col) pixels, "mask": (B, 1, H, W) logits}``."""
        if x.dim() != 4:
            raise ValueError(f"ShapeNet takes (B, C, H, W) images, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if self.backbone == "small":
            self._check_size((height, width))
            bottleneck, mask = self.unet(x)
        else:
            bottleneck, mask = self._resnet_forward(x)
        raw = self.point_head(bottleneck).float()  # float32: bf16 would quantise pixels to ~0.25 at this scale
        scale = raw.new_tensor([height / 4, width / 4])
        centre = raw.new_tensor([(height - 1) / 2, (width - 1) / 2])
        return {"points": centre + raw * scale, "mask": mask.contiguous()}

    def _resnet_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FlexibleUNet's own forward, split open so the point head sees the encoder's deepest map (one encoder
        pass): padded to a multiple of 32, mask cropped back to ``(H, W)``."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.divisor, -width % self.divisor
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            x = F.pad(x, (left, pad_w - left, top, pad_h - top), mode="replicate")
        features = self.unet.encoder(x)
        mask = self.unet.segmentation_head(self.unet.decoder(features, self.unet.skip_connect))
        return features[-1], mask[..., top:top + height, left:left + width]
