"""Swin Transformer backbone with an FPN, the paper's teacher family (Swin-T/S/B).

Built from torchvision's ``SwinTransformer`` blocks; each stage's output gets a LayerNorm
(``norms``, MMDetection's ``norm0..norm3``) and is turned channels-first for the FPN.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

# name -> (embed_dim, depths, num_heads); "tiny" variants shrink widths and depths of the same builder.
SWIN_SIZES = {
    "swin": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
TINY_SWIN = (24, (1, 1, 2, 1), (1, 2, 4, 8))


class SwinBackbone(nn.Module):
    """Swin stages 1..4; forward (N, 3, H, W) -> {"0".."3": (N, C_i, H/4/2^i, W/4/2^i)}, strides 4..32 px."""

    def __init__(self, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...],
                 window_size: int = 7, drop_path: float = 0.2) -> None:
        super().__init__()
        swin = SwinTransformer(patch_size=[4, 4], embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
                               window_size=[window_size, window_size], stochastic_depth_prob=drop_path)
        self.features = swin.features  # [patch_embed, stage1, merge, stage2, merge, stage3, merge, stage4]
        self.out_channels = [embed_dim * 2**i for i in range(len(depths))]
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.out_channels)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        outputs: OrderedDict[str, Tensor] = OrderedDict()
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 2 == 1:
                stage = i // 2
                outputs[str(stage)] = self.norms[stage](x).permute(0, 3, 1, 2).contiguous()
        return outputs


class SwinFPN(nn.Module):
    """Swin backbone + FPN: (N, 3, H, W) -> {"0","1","2","3","pool"} maps of ``out_channels``, strides 4..64 px."""

    def __init__(self, name: str, *, tiny: bool, fpn_channels: int) -> None:
        super().__init__()
        embed_dim, depths, num_heads = TINY_SWIN if tiny else SWIN_SIZES[name]
        self.body = SwinBackbone(embed_dim, depths, num_heads, drop_path=0.0 if tiny else 0.2)
        self.fpn = FeaturePyramidNetwork(self.body.out_channels, fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(x))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":  # pragma: no cover - quick shape check
    model = SwinFPN("swin", tiny=True, fpn_channels=64)
    print({k: tuple(v.shape) for k, v in model(torch.zeros(1, 3, 256, 192)).items()}, count_parameters(model))
