"""A small, fast CNN for CPU defaults, 2-D or 3-D."""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Conv-BN-ReLU, then halving: by max-pooling, or by the conv's own stride 2 (cheaper, no pooling)."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size=3, padding=1, stride=stride, bias=False),
        norm(out_channels),
        nn.ReLU(inplace=True),
        pool(2) if stride == 1 else nn.Identity(),
    )


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-pool stages, global average pooling and a linear head.

    Args:
        spatial_dims: 2 for images ``(B, C, H, W)``, 3 for volumes ``(B, C, D, H, W)``.
        in_channels: input channels ``C``.
        out_channels: number of outputs (classes, or 1 for regression).
        channels: width of each stage; the input is halved once per stage.
        dropout: dropout before the head.
        strided_stem: the first stage halves the input with a stride-2 conv instead of a conv at full
            resolution and max-pooling: about 4x less compute on 3-D volumes, where the first stage dominates.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: tuple[int, ...] = (16, 32, 64),
        dropout: float = 0.0,
        strided_stem: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if not channels:
            raise ValueError("channels must name at least one stage width")
        widths = [in_channels, *channels]
        self.features = nn.Sequential(*[
            _conv_block(spatial_dims, c_in, c_out, stride=2 if strided_stem and i == 0 else 1)
            for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:]))
        ])
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(widths[-1], out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, out_channels)``."""
        return self.head(self.pool(self.features(x)))
