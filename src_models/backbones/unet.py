"""U-Net (Ronneberger et al. 2015) as the DCA paper configures it, with optional DCA on the skips.

Reference quirk kept for fidelity: each encoder stage's skip is taken after its second convolution
but before that stage's BatchNorm + ReLU (which only feed the next stage's pooling).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import SegmentationNet
from ..blocks import BNReLU, DoubleConv
from ..registry import register
from .common import CONV_BLOCK_PART, DecoderStage, key_mapper, skip_dca


class UNetEncoderStage(nn.Module):
    """(B, Cin, H, W) -> skip (B, C, H, W) (pre-norm) and activated (B, C, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels, out_channels, last_norm=False, last_act=False)
        self.norm = BNReLU(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.conv(x)
        return skip, self.norm(skip)


def _official_unet_rules():
    part = CONV_BLOCK_PART
    return key_mapper([
        (r"conv([1-4])\.conv([12])\.(conv|norm)\.(.+)",
         lambda m: f"encoder.{int(m[1]) - 1}.conv.{int(m[2]) - 1}.{part[m[3]]}.{m[4]}"),
        (r"norm([1-4])\.(.+)", lambda m: f"encoder.{int(m[1]) - 1}.norm.0.{m[2]}"),
        (r"conv5\.conv([12])\.(conv|norm)\.(.+)",
         lambda m: f"bottleneck.{int(m[1]) - 1}.{part[m[2]]}.{m[3]}"),
        (r"up([1-4])\.conv\.(conv|norm)\.(.+)",
         lambda m: f"decoder.{int(m[1]) - 1}.up.conv.{part[m[2]]}.{m[3]}"),
        (r"upconv([1-4])\.conv([12])\.(conv|norm)\.(.+)",
         lambda m: f"decoder.{int(m[1]) - 1}.conv.{int(m[2]) - 1}.{part[m[3]]}.{m[4]}"),
        (r"out\.conv\.(.+)", lambda m: f"head.{m[1]}"),
    ])


@register("unet", official_key_map=_official_unet_rules())
class UNet(SegmentationNet):
    """(B, in_channels, H, W) -> (B, num_classes, H, W). Widths int(64*width) ... int(1024*width)."""

    size_multiple = 16

    def __init__(self, dca: bool = True, in_channels: int = 3, num_classes: int = 1, width: float = 0.5,
                 patch_size: int = 8, n_blocks: int = 1, channel_heads: Sequence[int] = (1, 1, 1, 1),
                 spatial_heads: Sequence[int] = (4, 4, 4, 4), channel_att: bool = True,
                 spatial_att: bool = True):
        super().__init__()
        c = [int(f * width) for f in (64, 128, 256, 512, 1024)]
        self.encoder = nn.ModuleList(UNetEncoderStage(cin, cout)
                                     for cin, cout in zip([in_channels] + c[:3], c[:4]))
        self.bottleneck = DoubleConv(c[3], c[4], c[4])
        self.dca = skip_dca(c[:4], patch_size, n_blocks=n_blocks, channel_heads=channel_heads,
                            spatial_heads=spatial_heads, channel_att=channel_att,
                            spatial_att=spatial_att) if dca else None
        self.decoder = nn.ModuleList(DecoderStage(cin, cskip, cout) for cin, cskip, cout in
                                     zip(c[:0:-1], c[3::-1], c[3::-1]))
        self.head = nn.Conv2d(c[0], num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.encoder):
            skip, x = stage(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(skip)
        x = self.bottleneck(F.max_pool2d(x, 2))
        if self.dca is not None:
            skips = self.dca(skips)
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, skip)
        return self.head(x)
