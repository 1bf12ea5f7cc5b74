"""MultiResUNet (Ibtehaz & Rahman 2020) as the DCA paper configures it, with optional DCA on the
skips.

MultiRes blocks replace the double convolutions; each skip passes a ResPath (4, 3, 2, 1 residual
units from the top stage down); the decoder upsamples with stride-2 transposed convolutions.
Reference details kept: DCA refines each ResPath's last residual sum (before its BatchNorm + ReLU),
and the reference class ignores its filter coefficient (always the width-0.5 network), which
`from_official` reproduces; ours honours `width`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import SegmentationNet
from ..blocks import BNReLU, MultiResBlock, ResPath
from ..registry import register
from .common import CONV_BLOCK_PART, key_mapper, skip_dca


class TransposedUpStage(nn.Module):
    """Stride-2 transposed conv + BN + ReLU, concatenate the skip, MultiRes block.
    (B, Cin, h, w), skip (B, Cskip, 2h, 2w) -> (B, block.out_channels, 2h, 2w)."""

    def __init__(self, in_channels: int, skip_channels: int, filters: int):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(in_channels, filters, 2, stride=2), BNReLU(filters))
        self.block = MultiResBlock(filters + skip_channels, filters)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat((self.up(x), skip), dim=1))


def _block_rules(ref: str, ours):
    """Reference MultiResBlock names -> ours; `ref` has one group, ours(match) gives our prefix."""
    part = CONV_BLOCK_PART
    return [
        (ref + r"\.skip\.(conv|norm)\.(.+)", lambda m: f"{ours(m)}.shortcut.{part[m[2]]}.{m[3]}"),
        (ref + r"\.c([1-3])\.(conv|norm)\.(.+)",
         lambda m: f"{ours(m)}.convs.{int(m[2]) - 1}.{part[m[3]]}.{m[4]}"),
        (ref + r"\.bn1\.(.+)", lambda m: f"{ours(m)}.norm.{m[2]}"),
    ]


_RESPATH_PARTS = {"bns": "norms", "skips": "shortcuts", "convs": "convs"}


def _official_multiresunet_rules():
    return key_mapper(
        _block_rules(r"mr([1-4])", lambda m: f"encoder.{int(m[1]) - 1}")
        + _block_rules(r"mr(5)", lambda m: "bottleneck")
        + _block_rules(r"mr([6-9])", lambda m: f"decoder.{int(m[1]) - 6}.block")
        + [(r"respath([1-4])\.(bns|skips|convs)\.(\d+)\.(?:conv\.)?(.+)",
            lambda m: f"respaths.{int(m[1]) - 1}.{_RESPATH_PARTS[m[2]]}.{m[3]}.{m[4]}"),
           (r"up([1-4])\.0\.(.+)", lambda m: f"decoder.{int(m[1]) - 1}.up.0.{m[2]}"),
           (r"up([1-4])\.1\.(.+)", lambda m: f"decoder.{int(m[1]) - 1}.up.1.0.{m[2]}"),
           (r"out\.(.+)", lambda m: f"head.{m[1]}")])


@register("multiresunet", official_key_map=_official_multiresunet_rules())
class MultiResUNet(SegmentationNet):
    """(B, in_channels, H, W) -> (B, num_classes, H, W). Nominal widths int(64*width) ...
    int(1024*width) (MultiRes blocks output about 1.67x that); ResPaths and DCA work at the
    nominal widths."""

    size_multiple = 16

    def __init__(self, dca: bool = True, in_channels: int = 3, num_classes: int = 1, width: float = 0.5,
                 patch_size: int = 8, n_blocks: int = 1, channel_heads: Sequence[int] = (1, 1, 1, 1),
                 spatial_heads: Sequence[int] = (4, 4, 4, 4), channel_att: bool = True,
                 spatial_att: bool = True):
        super().__init__()
        c = [int(f * width) for f in (64, 128, 256, 512, 1024)]
        self.encoder = nn.ModuleList()
        cin = in_channels
        for f in c[:4]:
            self.encoder.append(MultiResBlock(cin, f))
            cin = self.encoder[-1].out_channels
        self.bottleneck = MultiResBlock(cin, c[4])
        # Longer residual paths for shallower skips: they have the largest semantic gap to bridge.
        self.respaths = nn.ModuleList(ResPath(block.out_channels, f, length)
                                      for block, f, length in zip(self.encoder, c[:4], (4, 3, 2, 1)))
        self.dca = skip_dca(c[:4], patch_size, n_blocks=n_blocks, channel_heads=channel_heads,
                            spatial_heads=spatial_heads, channel_att=channel_att,
                            spatial_att=spatial_att) if dca else None
        self.decoder = nn.ModuleList()
        cin = self.bottleneck.out_channels
        for f in c[3::-1]:
            self.decoder.append(TransposedUpStage(cin, f, f))
            cin = self.decoder[-1].block.out_channels
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        sums, skips = [], []
        for i, (block, path) in enumerate(zip(self.encoder, self.respaths)):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            total, skip = path(x)
            sums.append(total)
            skips.append(skip)
        x = self.bottleneck(F.max_pool2d(x, 2))
        if self.dca is not None:
            skips = self.dca(sums)
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, skip)
        return self.head(x)
