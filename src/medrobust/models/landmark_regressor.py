"""A small CNN that regresses landmark coordinates directly, 2-D or 3-D."""

from __future__ import annotations

from torch import nn

from medrobust.models.small_cnn import SmallCNN


class LandmarkRegressor(SmallCNN):
    """:class:`SmallCNN`'s stages, then average pooling to a ``grid`` cells a side (not to one value per channel:
    where a feature sits is what a coordinate regressor needs) and a linear head.

    Args:
        out_channels: outputs, ``K * D`` for ``K`` landmarks in ``D`` dimensions (``LandmarkTask`` reads them as
            normalised coordinates, -1 / +1 at the centres of each axis's first / last voxel).
        grid: cells a side of the pooled feature map that the head sees.
        spatial_dims, in_channels, channels, dropout, strided_stem: as :class:`SmallCNN`.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 20,
                 channels: tuple[int, ...] = (16, 32, 64), dropout: float = 0.0, strided_stem: bool = False,
                 grid: int = 4) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, channels, dropout, strided_stem)
        if not (isinstance(grid, int) and grid >= 1):
            raise ValueError(f"grid must be an integer >= 1, got {grid!r}")
        self.pool = nn.AdaptiveAvgPool2d(grid) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(grid)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(channels[-1] * grid**spatial_dims, out_channels))
