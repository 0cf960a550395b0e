"""MONAI's RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection"), 2-D or 3-D, without torchvision.

MONAI's :class:`~monai.apps.detection.networks.retinanet_network.RetinaNet` network (the classification and box
heads, shared over the pyramid levels) and its anchor generator are torch-only; two of its usual parts are not:
``resnet_fpn_feature_extractor`` wraps the backbone in torchvision's ``IntermediateLayerGetter``, and the detector
(``RetinaNetDetector``) imports torchvision's ``Matcher`` and sampler. Here the feature extractor is
:class:`ResNetFPN` (MONAI's ResNet layers called in order, then MONAI's ``FeaturePyramidNetwork``), and matching,
loss and decoding live in :mod:`medrobust.losses.retinanet` and :mod:`medrobust.tasks.detection_formats` (MONAI's
ATSS matcher and box coder; NMS keeping what MONAI's keeps).

The output is channel-first over the anchors of every level, concatenated (``A`` anchors in all), so the detection
task and the detector attacks read it as they read a CenterNet's maps (one "cell" per anchor):
``{"heatmap": (B, num_classes, A) class logits, "box": (B, 2d, A) box deltas (MONAI's BoxCoder, weights 1),
"anchors": (B, 2d, A) the anchors, StandardMode input pixels}``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from monai.apps.detection.networks.retinanet_network import RetinaNet as MonaiRetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from monai.networks.nets.resnet import ResNet, ResNetBlock
from torch import Tensor, nn

from medrobust.models.centernet import ACTIVATION, check_spatial_dims

# anchor sides at the finest level, in pixels: x1, x2, x4 on the coarser levels cover 4 to 36 pixels, the nodules
# of a 128-pixel slice or a 32-voxel cube
BASE_ANCHOR_SIDES = (4, 6, 9)


class Subsample(nn.Module):
    """Every ``step``-th pixel / voxel along each spatial axis: with a 1x1 convolution after it, a strided 1x1
    convolution, which torch 2.13's CPU backward crashes on in channels-last (a segfault, e.g. 8 -> 16 channels on
    64 x 64 maps: the ResNet's downsampling shortcut)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def forward(self, x: Tensor) -> Tensor:
        return x[(slice(None), slice(None)) + (slice(None, None, self.step),) * (x.dim() - 2)]


def split_strided_pointwise(module: nn.Module) -> None:
    """Replaces, in place, every strided 1x1 convolution without padding in ``module`` by :class:`Subsample` and the
    same convolution at stride 1 (the same function and weights; see :class:`Subsample` for why)."""
    for name, child in module.named_children():
        if (isinstance(child, (nn.Conv2d, nn.Conv3d)) and set(child.kernel_size) == {1}
                and len(set(child.stride)) == 1 and child.stride[0] > 1 and set(child.padding) == {0}):
            step = child.stride[0]
            child.stride = (1,) * len(child.stride)
            setattr(module, name, nn.Sequential(Subsample(step), child))
        else:
            split_strided_pointwise(child)


def leaky_relus(module: nn.Module) -> None:
    """Every ``ReLU`` in ``module`` made leaky (slope 0.1), in place, as the CenterNet's: dead units give zero input
    gradients, which the robustness evaluation flags as gradient masking."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.LeakyReLU(0.1, inplace=child.inplace))
        else:
            leaky_relus(child)


class ResNetFPN(nn.Module):
    """MONAI's ResNet (stem, ``layers`` blocks per level, no max-pool) and a feature pyramid on levels 2 to 4:
    feature maps at strides 4, 8 and 16, ``fpn_channels`` wide. Replaces MONAI's ``resnet_fpn_feature_extractor``,
    whose ``BackboneWithFPN`` needs torchvision."""

    strides = (4, 8, 16)

    def __init__(self, spatial_dims: int, in_channels: int, widths: Sequence[int], layers: Sequence[int],
                 fpn_channels: int) -> None:
        super().__init__()
        resnet = ResNet(ResNetBlock, list(layers), list(widths), spatial_dims=spatial_dims,
                        n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=2, no_max_pool=True,
                        act=ACTIVATION, num_classes=1)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.act)
        self.levels = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
        self.fpn = FeaturePyramidNetwork(spatial_dims, list(widths[1:]), fpn_channels, extra_blocks=None)
        self.out_channels = fpn_channels  # MONAI's RetinaNet reads it

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.stem(x)
        features = OrderedDict()
        for index, level in enumerate(self.levels):
            x = level(x)
            if index:
                features[f"level{index + 1}"] = x
        return self.fpn(features)


class RetinaNet(nn.Module):
    """Image ``(B, C, *spatial)`` -> ``{"heatmap": (B, K, A), "box": (B, 2d, A), "anchors": (B, 2d, A)}`` (module
    docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels, num_classes: input channels; classes (sigmoid logits, no background class).
        widths: the four ResNet levels' widths (the stem has the first).
        layers: residual blocks per level.
        fpn_channels: width of the pyramid and of the heads.
        anchor_sides: anchor sides at the finest level (stride 4), doubled per coarser level; cubes / squares.
        image_size: the input size(s) the data gives, if known: checked against the divisor (16) at build time.
    """

    output_format = "retinanet"  # how DetectionTask reads the output (medrobust.tasks.detection_formats)
    divisor = 16

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 1,
                 widths: Sequence[int] = (8, 16, 32, 64), layers: Sequence[int] = (1, 1, 1, 1),
                 fpn_channels: int = 32, anchor_sides: Sequence[float] = BASE_ANCHOR_SIDES,
                 image_size: int | Sequence[int] | None = None) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if len(widths) != 4 or len(layers) != 4 or min(widths) < 1 or min(layers) < 1:
            raise ValueError(f"RetinaNet's ResNet has 4 levels: widths and layers must list 4 positive integers "
                             f"each, got widths={list(widths)!r}, layers={list(layers)!r}")
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if not anchor_sides or min(anchor_sides) <= 0:
            raise ValueError(f"anchor_sides must list positive anchor sides in pixels, got {anchor_sides!r}")
        self.spatial_dims, self.num_classes = spatial_dims, num_classes
        self.anchor_sides = tuple(float(side) for side in anchor_sides)
        shapes = tuple((float(side),) * spatial_dims for side in anchor_sides)
        self.anchor_generator = AnchorGeneratorWithAnchorShape(
            feature_map_scales=tuple(s // ResNetFPN.strides[0] for s in ResNetFPN.strides), base_anchor_shapes=shapes)
        self.anchors_per_cell = len(shapes)
        extractor = ResNetFPN(spatial_dims, in_channels, widths, layers, fpn_channels)
        self.network = MonaiRetinaNet(spatial_dims, num_classes, self.anchors_per_cell, extractor,
                                      size_divisible=self.divisor)
        split_strided_pointwise(self.network)
        leaky_relus(self.network)
        self._anchors: dict[tuple, Tensor] = {}
        if image_size is not None:
            self.check_size([image_size] * spatial_dims if isinstance(image_size, int) else list(image_size))

    def check_size(self, sizes: Sequence[int]) -> None:
        bad = [s for s in sizes if s % self.divisor]
        if bad or len(sizes) != self.spatial_dims:
            raise ValueError(f"RetinaNet({self.spatial_dims}-D) needs {self.spatial_dims} spatial sizes, each "
                             f"divisible by {self.divisor} (its coarsest level has stride 16), got {tuple(sizes)}")

    def anchors(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        """``(2d, A)`` anchors for an input shaped as ``x`` (cached per shape and device: they depend on nothing
        else), in the order of :meth:`flatten`."""
        key = (tuple(x.shape[2:]), x.device)
        if key not in self._anchors:
            anchors = self.anchor_generator(x[:1].detach(), [m[:1].detach() for m in maps])[0]  # (A, 2d)
            self._anchors[key] = anchors.float().t().contiguous()
        return self._anchors[key]

    def flatten(self, maps: list[Tensor], per_anchor: int) -> Tensor:
        """Per-level maps ``(B, anchors_per_cell * per_anchor, *spatial)`` -> ``(B, per_anchor, A)``, anchor order
        = MONAI's (level, then cell row-major, then the anchor shapes at the cell)."""
        flat = []
        for m in maps:
            batch = m.shape[0]
            m = m.reshape(batch, self.anchors_per_cell, per_anchor, -1)  # (B, a, c, cells)
            flat.append(m.permute(0, 2, 3, 1).reshape(batch, per_anchor, -1))
        return torch.cat(flat, dim=2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"RetinaNet({self.spatial_dims}-D) takes (B, C, *spatial) with {self.spatial_dims} "
                             f"spatial axes, got shape {tuple(x.shape)}")
        self.check_size(x.shape[2:])
        heads = self.network(x)
        logits, deltas = heads[self.network.cls_key], heads[self.network.box_reg_key]
        anchors = self.anchors(x, logits)
        return {"heatmap": self.flatten(logits, self.num_classes),
                "box": self.flatten(deltas, 2 * self.spatial_dims),
                "anchors": anchors.to(x.dtype if x.is_floating_point() else torch.float32).expand(len(x), -1, -1)}

