"""R2U-Net (Alom et al. 2018): a U-Net whose every stage is a recurrent residual unit, as the DCA
paper configures it, with optional DCA on the skips.

Reference detail kept for fidelity: DCA refines each encoder unit's residual sum (before that unit's
final BatchNorm + ReLU); without DCA the decoder receives the activated outputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import SegmentationNet
from ..blocks import RecurrentResidualBlock, UpConv
from ..registry import register
from .common import CONV_BLOCK_PART, key_mapper, skip_dca


class R2DecoderStage(nn.Module):
    """Upsample + conv to the skip's size, concatenate the skip, recurrent residual unit.
    (B, Cin, h, w), skip (B, Cskip, H, W) -> (B, Cout, H, W)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = UpConv(in_channels, out_channels)
        self.unit = RecurrentResidualBlock(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x, tuple(skip.shape[-2:]))
        return self.unit(torch.cat((x, skip), dim=1))[1]


def _unit_rules(ref: str, ours):
    """Reference rrcnn_block names -> our RecurrentResidualBlock. `ref` matches the unit's prefix
    with exactly one group; ours(match) gives our prefix."""
    part = CONV_BLOCK_PART
    return [
        (ref + r"\.conv\.conv\.(.+)", lambda m: f"{ours(m)}.proj.{m[2]}"),
        (ref + r"\.norm_c\.(.+)", lambda m: f"{ours(m)}.pre.0.{m[2]}"),
        (ref + r"\.norm\.(.+)", lambda m: f"{ours(m)}.post.0.{m[2]}"),
        (ref + r"\.block\.([01])\.conv\.(conv|norm)\.(.+)",
         lambda m: f"{ours(m)}.body.{m[2]}.conv.{part[m[3]]}.{m[4]}"),
    ]


def _official_r2unet_rules():
    part = CONV_BLOCK_PART
    return key_mapper(
        _unit_rules(r"rconv([1-4])", lambda m: f"encoder.{int(m[1]) - 1}")
        + _unit_rules(r"rconv(5)", lambda m: "bottleneck")
        + _unit_rules(r"rconv([6-9])", lambda m: f"decoder.{int(m[1]) - 6}.unit")
        + [(r"up([1-4])\.conv\.(conv|norm)\.(.+)",
            lambda m: f"decoder.{int(m[1]) - 1}.up.conv.{part[m[2]]}.{m[3]}"),
           (r"out\.(.+)", lambda m: f"head.{m[1]}")])


@register("r2unet", official_key_map=_official_r2unet_rules())
class R2UNet(SegmentationNet):
    """(B, in_channels, H, W) -> (B, num_classes, H, W). Widths int(64*width) ... int(1024*width),
    recurrence t = 2."""

    size_multiple = 16

    def __init__(self, dca: bool = True, in_channels: int = 3, num_classes: int = 1, width: float = 0.5,
                 patch_size: int = 8, n_blocks: int = 1, channel_heads: Sequence[int] = (1, 1, 1, 1),
                 spatial_heads: Sequence[int] = (4, 4, 4, 4), channel_att: bool = True,
                 spatial_att: bool = True):
        super().__init__()
        c = [int(f * width) for f in (64, 128, 256, 512, 1024)]
        self.encoder = nn.ModuleList(RecurrentResidualBlock(cin, cout)
                                     for cin, cout in zip([in_channels] + c[:3], c[:4]))
        self.bottleneck = RecurrentResidualBlock(c[3], c[4])
        self.dca = skip_dca(c[:4], patch_size, n_blocks=n_blocks, channel_heads=channel_heads,
                            spatial_heads=spatial_heads, channel_att=channel_att,
                            spatial_att=spatial_att) if dca else None
        self.decoder = nn.ModuleList(R2DecoderStage(cin, cskip, cout) for cin, cskip, cout in
                                     zip(c[:0:-1], c[3::-1], c[3::-1]))
        self.head = nn.Conv2d(c[0], num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        sums, skips = [], []
        for i, unit in enumerate(self.encoder):
            total, x = unit(x if i == 0 else F.max_pool2d(x, 2))
            sums.append(total)
            skips.append(x)
        x = self.bottleneck(F.max_pool2d(x, 2))[1]
        if self.dca is not None:
            skips = self.dca(sums)
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, skip)
        return self.head(x)
