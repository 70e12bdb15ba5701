"""CNN backbones with an FPN for the students (and ResNet-FPN teachers).

``full`` is torchvision's architecture; ``tiny`` is the same builder with fewer blocks (one per stage)
and a narrower FPN, for CPU runs and tests. Weights are never downloaded.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from pkd_offline.errors import PkdError

RESNET_LAYOUTS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}
BACKBONE_NAMES = ("resnet50", "resnet18", "mobilenet_v3")


def fpn_channels(variant: str) -> int:
    """FPN width: 256 (the paper's, teacher and student alike) or 64 for ``tiny``."""
    return 64 if variant == "tiny" else 256


def resnet_fpn(name: str, *, variant: str, first_stride: int, extra_blocks: ExtraFPNBlock | None) -> BackboneWithFPN:
    """ResNet + FPN returning C2..C5 (``first_stride`` 4) or C3..C5 (8) as FPN inputs."""
    block, layers = RESNET_LAYOUTS[name]
    if variant == "tiny":
        layers = (1, 1, 1, 1)
    body = ResNet(block, list(layers), norm_layer=nn.BatchNorm2d)
    stages = [1, 2, 3, 4][{4: 0, 8: 1}[first_stride]:]
    in_channels = [64 * 2 ** (s - 1) * block.expansion for s in stages]
    return BackboneWithFPN(body, {f"layer{s}": str(i) for i, s in enumerate(stages)}, in_channels,
                           fpn_channels(variant), extra_blocks=extra_blocks)


def mobilenet_fpn(*, variant: str, first_stride: int, extra_blocks: ExtraFPNBlock | None) -> BackboneWithFPN:
    """MobileNetV3 (large; small for ``tiny``) + FPN on its last block at each stride from ``first_stride`` to 32."""
    body = (mobilenet_v3_small if variant == "tiny" else mobilenet_v3_large)(weights=None).features
    strides, channels, x = {}, {}, torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        for i, layer in enumerate(body):
            x = layer(x)
            strides[64 // x.shape[-1]] = str(i)
            channels[64 // x.shape[-1]] = x.shape[1]
    wanted = [s for s in (4, 8, 16, 32) if s >= first_stride]
    return BackboneWithFPN(body, {strides[s]: str(i) for i, s in enumerate(wanted)}, [channels[s] for s in wanted],
                           fpn_channels(variant), extra_blocks=extra_blocks)


def cnn_fpn(backbone: str, *, variant: str, first_stride: int, extra_blocks: ExtraFPNBlock | None) -> BackboneWithFPN:
    if backbone in RESNET_LAYOUTS:
        return resnet_fpn(backbone, variant=variant, first_stride=first_stride, extra_blocks=extra_blocks)
    if backbone == "mobilenet_v3":
        return mobilenet_fpn(variant=variant, first_stride=first_stride, extra_blocks=extra_blocks)
    raise PkdError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONE_NAMES)}")
