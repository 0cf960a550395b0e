"""The anatomy-informed hybrid regressor: image features from a CNN, fused with anatomical features.

As in Li et al. (Neurocomputing 2020), the anatomical context (regional volumes from a segmentation) enters
next to the CNN's image features, and an attacker perturbs the image only. The split is what makes that
true by construction: :meth:`HybridRegressor.forward` maps the image to an embedding, and
:meth:`HybridRegressor.fuse` combines the embedding with the features the *batch* carries. The task module
calls ``fuse`` with ``batch["features"]`` (see :meth:`medrobust.tasks.RegressionTask.prediction`); attacks
perturb images and pass the batch through untouched, so the features stay at their clean values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medrobust.models.small_cnn import SmallCNN


class HybridRegressor(nn.Module):
    """CNN image embedding + anatomical features -> one regression output.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels ``C``.
        num_features: anatomical features ``F``; ``None`` takes the datamodule's count when the task is set
            up (:meth:`bind_features`).
        channels: widths of the image CNN's stages.
        embed_dim: size of the image embedding.
        hidden: width of the fusion head's hidden layer.
        dropout: dropout in the image CNN's head and in the fusion head.
        strided_stem: see :class:`~medrobust.models.SmallCNN`.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_features: int | None = None,
        channels: Sequence[int] = (8, 16, 32, 64),
        embed_dim: int = 16,
        hidden: int = 32,
        dropout: float = 0.0,
        strided_stem: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim < 1 or hidden < 1:
            raise ValueError(f"embed_dim and hidden must be >= 1, got {embed_dim!r} and {hidden!r}")
        self.image_net = SmallCNN(spatial_dims, in_channels, embed_dim, tuple(channels), dropout, strided_stem)
        self.embed_dim, self.hidden, self.dropout = embed_dim, hidden, dropout
        self.num_features: int | None = None
        self.head: nn.Module | None = None
        if num_features is not None:
            self.bind_features(num_features)

    def bind_features(self, num_features: int) -> None:
        """Build the fusion head for ``num_features`` features (once; a different count is an error)."""
        if isinstance(num_features, bool) or int(num_features) != num_features or num_features < 1:
            raise ValueError("the hybrid model needs anatomical features (regional volumes), "
                             f"got num_features={num_features!r}; give the data source feature columns")
        if self.num_features is not None:
            if num_features != self.num_features:
                raise ValueError(f"model.num_features={self.num_features} but the data gives {num_features} "
                                 "anatomical features")
            return
        self.num_features = int(num_features)
        self.head = nn.Sequential(
            nn.Linear(self.embed_dim + self.num_features, self.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(self.dropout),
            nn.Linear(self.hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, *spatial)`` -> embeddings ``(B, embed_dim)``."""
        return self.image_net(x)

    def fuse(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, embed_dim)`` and features ``(B, F)`` -> outputs ``(B, 1)``."""
        if self.head is None:
            raise RuntimeError("the hybrid model's fusion head is not built: call bind_features(F) or set "
                               "model.num_features")
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"the hybrid model expects features (B, {self.num_features}), "
                             f"got {tuple(features.shape)}")
        return self.head(torch.cat([embedding, features.to(embedding.dtype)], dim=1))
