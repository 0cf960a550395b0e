"""A CenterNet-style detector ("Objects as Points", Zhou et al. 2019), 2-D or 3-D, pure torch + MONAI blocks.

An object is the peak of a per-class centre heatmap; its box comes from a size and a sub-cell offset regressed at
that peak. The backbone is a small U-Net made of MONAI's ``BasicUNet`` blocks (``TwoConv``, ``Down``, ``UpCat``;
no torchvision), whose decoder stops at the output stride ``s``: the heads see a map ``s`` times smaller than the
input.

Conventions (shared by :func:`encode_targets`, :func:`decode` and ``medrobust.losses.centernet``):

* Boxes follow MONAI's StandardMode: ``(lo_0, .., lo_{d-1}, hi_0, .., hi_{d-1})`` in the image array's spatial-axis
  order, in input pixels / voxels (continuous coordinates; the box centre is ``(lo + hi) / 2``).
* A batch carries a variable number of boxes per image as padded tensors: ``boxes (B, N, 2d)``, ``labels (B, N)``
  long in ``[0, num_classes)``, ``box_valid (B, N)`` bool (padding rows are ignored, whatever they hold).
* Output cell ``j`` along an axis holds the centres ``c`` with ``floor(c / s) == j``; ``offset = c / s - j`` in
  ``[0, 1)``; ``size = (hi - lo) / s``, in output cells (the paper's units, so its size-loss weight 0.1 fits).
* ``forward`` gives logits, ``size`` and ``offset`` maps; :func:`decode` maps them back to input pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import Tensor, nn

HEATMAP_PRIOR = 0.1  # the paper's initial foreground probability: heatmap bias -log((1 - 0.1) / 0.1) = -2.197
# leaky, not plain ReLU: dead units give zero input gradients, which the robustness evaluation flags as masking
ACTIVATION = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
# batch norm: attacks run it on its running statistics, a per-channel affine map (attacks/core/frozen_norm.py)
NORM = ("batch", {"affine": True})
GAUSSIAN_ALPHA = 0.54  # TTFNet's sigma = alpha * box size / 6 per axis (Liu et al. 2020, "Training-Time-Friendly")
MIN_SIGMA = 1 / 6  # CenterNet's smallest Gaussian (radius 0: diameter 1 = 6 sigma): a one-cell peak


def check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"CenterNet is 2-D or 3-D: spatial_dims must be 2 or 3, got {spatial_dims!r}")


class CenterNet(nn.Module):
    """Image ``(B, C, *spatial)`` -> ``{"heatmap": (B, num_classes, *out) logits, "size": (B, d, *out),
    "offset": (B, d, *out)}`` with ``out = spatial / stride`` (module docstring for the units).

    Args:
        spatial_dims: 2 or 3, else ``ValueError``.
        in_channels: input channels ``C``.
        num_classes: heatmap channels, one per object class.
        features: width of each U-Net level; level ``k`` is ``2**k`` times smaller than the input, so every input
            size must be divisible by ``2**(len(features) - 1)`` (else ``ValueError`` in ``forward``). The default
            (8, 16, 32, 64) has 138k parameters in 2-D and 403k in 3-D (stride 4): measured on one CPU thread, a
            training step of 8 slices of 128 x 128 takes 0.33 s and one of 2 volumes of 64^3 1.1 s; the widths
            (16, 32, 64, 128) have 4x the parameters and take about twice as long.
        stride: output stride, a power of two up to ``2**(len(features) - 1)``: the decoder climbs back from the
            deepest level to the level at this stride, and the heads run there.
        head_channels: width of the 3x3 conv in each head (the paper's 256 shrunk to CPU size); default the
            width of the level the heads run at.
        image_size: the input size(s) the data gives, if known: checked against the divisor at build time, so a
            bad size fails before the first batch.
    """

    output_format = "centernet"  # how DetectionTask reads the output (medrobust.tasks.detection_formats)

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 1,
                 features: Sequence[int] = (8, 16, 32, 64), stride: int = 4, head_channels: int | None = None,
                 image_size: int | Sequence[int] | None = None) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        features = [int(f) for f in features]
        if len(features) < 2 or min(features) < 1:
            raise ValueError(f"features must list >= 2 positive widths (one per U-Net level), got {features!r}")
        levels = len(features) - 1
        if not (isinstance(stride, int) and stride >= 1 and stride & (stride - 1) == 0 and stride <= 2**levels):
            raise ValueError(f"stride must be a power of two from 1 to 2**(len(features) - 1) = {2**levels} "
                             f"(the U-Net level the heads run at), got {stride!r}")
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.spatial_dims, self.num_classes, self.stride = spatial_dims, num_classes, stride
        self.divisor = 2**levels
        head_level = int(math.log2(stride))
        self.encoder = nn.ModuleList([TwoConv(spatial_dims, in_channels, features[0], ACTIVATION, NORM, False)])
        self.encoder.extend(Down(spatial_dims, a, b, ACTIVATION, NORM, False) for a, b in zip(features, features[1:]))
        # UpCat halves the deeper map's channels when upsampling, then merges it with the skip of the level above
        self.decoder = nn.ModuleList(UpCat(spatial_dims, features[k], features[k - 1], features[k - 1], ACTIVATION,
                                           NORM, False) for k in range(levels, head_level, -1))
        width = features[head_level]
        head_channels = head_channels or width
        self.heads = nn.ModuleDict({"heatmap": self._head(width, head_channels, num_classes),
                                    "size": self._head(width, head_channels, spatial_dims),
                                    "offset": self._head(width, head_channels, spatial_dims)})
        nn.init.constant_(self.heads["heatmap"][-1].bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        if image_size is not None:
            self.check_size([image_size] * spatial_dims if isinstance(image_size, int) else list(image_size))

    def _head(self, in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
        """The paper's head: 3x3 conv, ReLU (leaky here), 1x1 conv."""
        conv = Conv[Conv.CONV, self.spatial_dims]
        return nn.Sequential(conv(in_channels, hidden, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
                             conv(hidden, out_channels, 1))

    def check_size(self, sizes: Sequence[int]) -> None:
        """``ValueError`` unless every spatial size is divisible by the U-Net's divisor (a multiple of the stride)."""
        bad = [s for s in sizes if s % self.divisor]
        if bad or len(sizes) != self.spatial_dims:
            raise ValueError(f"CenterNet({self.spatial_dims}-D, {len(self.encoder)} feature levels, stride "
                             f"{self.stride}) needs {self.spatial_dims} spatial sizes, each divisible by "
                             f"{self.divisor} (the deepest level halves the input {len(self.encoder) - 1} times), "
                             f"got {tuple(sizes)}; crop or pad the input, or use fewer feature levels")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"CenterNet({self.spatial_dims}-D) takes (B, C, *spatial) with {self.spatial_dims} "
                             f"spatial axes, got shape {tuple(x.shape)}")
        self.check_size(x.shape[2:])
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        return {name: head(x).contiguous() for name, head in self.heads.items()}


# -- targets ------------------------------------------------------------------------------------------------------
def encode_targets(boxes: Tensor, labels: Tensor, box_valid: Tensor, out_shape: Sequence[int], stride: int,
                   num_classes: int, alpha: float = GAUSSIAN_ALPHA) -> dict[str, Tensor]:
    """Training targets of padded boxes ``(B, N, 2d)``, labels ``(B, N)``, ``box_valid`` ``(B, N)``.

    Returns (float32 unless noted):

    * ``heatmap`` ``(B, num_classes, *out_shape)``: per class, the maximum over its objects of a Gaussian that is
      exactly 1 at the object's centre cell. The radius rule is TTFNet's elliptical one: ``sigma_k =
      alpha * size_k / 6`` per axis (``size_k`` in output cells, at least CenterNet's one-cell ``1 / 6``), the
      same in 2-D and 3-D and fitted to elongated boxes (CenterNet's IoU-based radius is 2-D only).
    * ``size`` ``(B, N, d)``: box extent ``(hi - lo) / stride``; ``offset`` ``(B, N, d)``: ``c / stride - cell``.
    * ``index`` ``(B, N)`` long: the centre cell, flattened (row-major) over ``out_shape`` (0 where masked).
    * ``mask`` ``(B, N)`` bool: the objects that count: valid, with the centre inside the input
      ``[0, out_shape * stride)`` (a centre outside has no cell to sit in; such objects are dropped).

    Images without objects get all-zero heatmaps and an all-false mask. Two objects of one class whose centres share
    a cell make one peak; both keep their size / offset rows (the L1 loss then averages them there).
    """
    dims = len(out_shape)
    if boxes.shape[-1] != 2 * dims:
        raise ValueError(f"boxes (B, N, 2d) must have 2 * {dims} = {2 * dims} coordinates for a {dims}-D output "
                         f"shape {tuple(out_shape)}, got shape {tuple(boxes.shape)}")
    boxes = boxes.float()
    grid = boxes.new_tensor(list(out_shape))
    centre = (boxes[..., :dims] + boxes[..., dims:]) / 2 / stride  # (B, N, d) in output cells
    size = (boxes[..., dims:] - boxes[..., :dims]) / stride
    inside = ((centre >= 0) & (centre < grid)).all(-1)
    mask = box_valid.bool() & inside & (labels >= 0) & (labels < num_classes)
    cell = centre.floor().clamp(min=0).minimum(grid - 1)  # clamped only so masked rows index something
    index = flat_index(cell.long(), out_shape).masked_fill(~mask, 0)
    sigma = (alpha * size.abs() / 6).clamp(min=MIN_SIGMA)
    heatmap = _class_heatmaps(cell, sigma, labels.long(), mask, out_shape, num_classes)
    return {"heatmap": heatmap, "size": size * mask[..., None], "offset": (centre - cell) * mask[..., None],
            "index": index, "mask": mask}


def _class_heatmaps(cell: Tensor, sigma: Tensor, labels: Tensor, mask: Tensor, out_shape: Sequence[int],
                    num_classes: int) -> Tensor:
    """``(B, num_classes, *out_shape)``: per class, the max over objects of separable Gaussians around ``cell``."""
    batch, count, dims = cell.shape
    gaussian = cell.new_ones((batch, count, *out_shape))
    for axis, length in enumerate(out_shape):  # separable: one 1-D Gaussian per axis, broadcast together
        position = torch.arange(length, dtype=cell.dtype, device=cell.device)
        profile = torch.exp(-(position - cell[..., axis, None]) ** 2 / (2 * sigma[..., axis, None] ** 2))
        view = [batch, count] + [1] * dims
        view[2 + axis] = length
        gaussian = gaussian * profile.view(view)
    heatmap = cell.new_zeros((batch, num_classes, *out_shape))
    if count == 0:
        return heatmap
    for k in range(num_classes):  # a loop over classes keeps memory at (B, N, *out), not (B, N, K, *out)
        of_class = (mask & (labels == k)).view(batch, count, *[1] * dims)
        heatmap[:, k] = (gaussian * of_class).amax(dim=1)
    return heatmap


def flat_index(cell: Tensor, shape: Sequence[int]) -> Tensor:
    """Row-major flat index ``(...)`` of integer coordinates ``(..., d)`` in a grid of ``shape``."""
    index = torch.zeros_like(cell[..., 0])
    for axis, length in enumerate(shape):
        index = index * length + cell[..., axis]
    return index


def gather_at(maps: Tensor, index: Tensor) -> Tensor:
    """Values of dense maps ``(B, C, *spatial)`` at flat cell indices ``(B, N)`` -> ``(B, N, C)``."""
    flat = maps.flatten(2)
    return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)


# -- decoding -----------------------------------------------------------------------------------------------------
def peak_mask(heat: Tensor) -> Tensor:
    """Where ``heat`` ``(B, K, *spatial)``, 2-D or 3-D, equals the max of its 3 x 3 (x 3) neighbourhood in its class
    (a flat plateau is all peaks): CenterNet's NMS-free peaks."""
    pool = F.max_pool2d if heat.dim() == 4 else F.max_pool3d
    return heat == pool(heat, 3, stride=1, padding=1)


@torch.no_grad()
def decode_padded(output: dict[str, Tensor], stride: int, score_threshold: float = 0.1,
                  max_detections: int = 100) -> dict[str, Tensor]:
    """Detections of a CenterNet output as padded tensors, best first per image:
    ``{"boxes": (B, K, 2d), "labels": (B, K) long, "scores": (B, K), "valid": (B, K) bool, "index": (B, K) long}``
    (``index``: the flat heatmap index ``label * cells + cell``, to read a score with its gradient), ``K`` =
    ``min(max_detections, cells * classes)``; ``valid`` marks scores above ``score_threshold``.

    Peaks are cells equal to the max of their 3 x 3 (x 3) neighbourhood in the sigmoid heatmap (the paper's
    NMS-free decoding); the best ``K`` peaks over all classes are kept. Boxes are in input pixels:
    ``centre = (cell + offset) * stride``, extent ``size * stride`` (negative sizes clamped to 0).
    """
    heat = torch.sigmoid(output["heatmap"].float())
    heat = heat * peak_mask(heat)
    out_shape = heat.shape[2:]
    cells = math.prod(out_shape)
    scores, flat = heat.flatten(1).topk(min(max_detections, heat[0].numel()), dim=1)
    labels, index = flat // cells, flat % cells
    cell = torch.stack(torch.unravel_index(index, tuple(out_shape)), dim=-1).float()
    centre = (cell + gather_at(output["offset"].float(), index)) * stride
    extent = gather_at(output["size"].float(), index).clamp(min=0) * stride
    boxes = torch.cat([centre - extent / 2, centre + extent / 2], dim=-1)
    return {"boxes": boxes, "labels": labels, "scores": scores, "valid": scores > score_threshold, "index": flat}


def decode(output: dict[str, Tensor], stride: int, score_threshold: float = 0.1,
           max_detections: int = 100) -> list[dict[str, Tensor]]:
    """Per-image detections ``[{"boxes": (n, 2d), "labels": (n,), "scores": (n,)}]``, best first, in input pixels
    (:func:`decode_padded` without its padding)."""
    padded = decode_padded(output, stride, score_threshold, max_detections)
    return [{key: padded[key][b][keep] for key in ("boxes", "labels", "scores")}
            for b, keep in enumerate(padded["valid"])]
