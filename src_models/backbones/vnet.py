"""V-Net (Milletari et al. 2016) in 2D, as the DCA paper's code builds it, with optional DCA on
the skips.

5x5 convolutions with BatchNorm + PReLU; strided 2x2 convolutions down and transposed 2x2
convolutions up; every stage is residual (its input added to its convolutions' output). Reference
details kept for fidelity: DCA refines each encoder stage's residual sum (before its BatchNorm +
PReLU); the first stage normalises its 5x5 convolution's output, so its 1x1 shortcut only feeds DCA
(without DCA it receives no gradient); the reference ignores the filter coefficient (always the
width-0.5 network, 32 ... 512 channels), which `from_official` reproduces; ours honours `width`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..base import SegmentationNet
from ..registry import register
from .common import key_mapper, skip_dca


def conv5(in_channels: int, out_channels: int, norm_act: bool = True) -> nn.Sequential:
    """5x5 conv (padding 2), then BatchNorm + PReLU unless norm_act is False."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 5, padding=2)]
    if norm_act:
        layers += [nn.BatchNorm2d(out_channels), nn.PReLU()]
    return nn.Sequential(*layers)


def conv5_stack(in_channels: int, out_channels: int, depth: int) -> nn.Sequential:
    """`depth` conv5 layers; the last is linear (the stage's residual sum is normalised instead)."""
    return nn.Sequential(*(conv5(in_channels if i == 0 else out_channels, out_channels,
                                 norm_act=i < depth - 1) for i in range(depth)))


class InputStage(nn.Module):
    """(B, Cin, H, W) -> residual sum (B, C, H, W) and activated conv output (B, C, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 5, padding=2)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y + self.shortcut(x), self.act(self.norm(y))


class DownStage(nn.Module):
    """Strided 2x2 conv, `depth` 5x5 convs, residual sum, BN + PReLU.
    (B, Cin, H, W) -> residual sum (B, Cout, H/2, W/2) and activated (B, Cout, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int):
        super().__init__()
        self.down = nn.Conv2d(in_channels, out_channels, 2, stride=2)
        self.convs = conv5_stack(out_channels, out_channels, depth)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.down(x)
        total = self.convs(x) + x
        return total, self.act(self.norm(total))


class UpStage(nn.Module):
    """Transposed 2x2 conv (+ BN + PReLU), skip concatenated in front, `depth` 5x5 convs, plus the
    transposed conv's raw output, BN + PReLU. (B, Cin, h, w), skip (B, Cskip, 2h, 2w) ->
    (B, Cout, 2h, 2w)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, depth: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.up_act = nn.Sequential(nn.BatchNorm2d(out_channels), nn.PReLU())
        self.convs = conv5_stack(out_channels + skip_channels, out_channels, depth)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        y = self.convs(torch.cat((skip, self.up_act(up)), dim=1))
        return self.act(self.norm(y + up))


_STAGE_PARTS = {"bn": "norm", "prelu": "act", "down": "down", "up": "up", "conv_skip": "shortcut",
                "bn_in": "up_act.0", "prelu_in": "up_act.1"}
_LAYER_PARTS = {"conv": "0", "bn": "1", "prelu": "2"}


def _official_vnet_rules():
    def stage(ref: str) -> str:
        i = int(ref[-1])
        if ref.startswith("conv"):
            return "bottleneck" if i == 5 else f"encoder.{i - 1}"
        return f"decoder.{i - 1}"

    return key_mapper([
        (r"(conv[1-5]|up[1-3])\.conv\.(\d+)\.(conv|bn|prelu)\.(.+)",
         lambda m: f"{stage(m[1])}.convs.{m[2]}.{_LAYER_PARTS[m[3]]}.{m[4]}"),
        (r"conv1\.conv\.(.+)", lambda m: f"encoder.0.conv.{m[1]}"),
        (r"up4\.conv\.(.+)", lambda m: f"decoder.3.convs.0.0.{m[1]}"),
        (r"(conv[1-5]|up[1-4])\.(bn|prelu|down|up|conv_skip|bn_in|prelu_in)\.(.+)",
         lambda m: f"{stage(m[1])}.{_STAGE_PARTS[m[2]]}.{m[3]}"),
        (r"out\.(.+)", lambda m: f"head.{m[1]}"),
    ])


@register("vnet", official_key_map=_official_vnet_rules())
class VNet(SegmentationNet):
    """(B, in_channels, H, W) -> (B, num_classes, H, W). Widths int(64*width) ... int(1024*width)
    (32 ... 512 at the paper's 0.5); 5x5 convolutions per stage: 1, 2, 3, 3, 3 down, 3, 3, 2, 1 up."""

    size_multiple = 16

    def __init__(self, dca: bool = True, in_channels: int = 3, num_classes: int = 1, width: float = 0.5,
                 patch_size: int = 8, n_blocks: int = 1, channel_heads: Sequence[int] = (1, 1, 1, 1),
                 spatial_heads: Sequence[int] = (4, 4, 4, 4), channel_att: bool = True,
                 spatial_att: bool = True):
        super().__init__()
        c = [int(f * width) for f in (64, 128, 256, 512, 1024)]
        self.encoder = nn.ModuleList([InputStage(in_channels, c[0])])
        self.encoder.extend(DownStage(cin, cout, depth)
                            for cin, cout, depth in zip(c[:3], c[1:4], (2, 3, 3)))
        self.bottleneck = DownStage(c[3], c[4], 3)
        self.dca = skip_dca(c[:4], patch_size, n_blocks=n_blocks, channel_heads=channel_heads,
                            spatial_heads=spatial_heads, channel_att=channel_att,
                            spatial_att=spatial_att) if dca else None
        self.decoder = nn.ModuleList(UpStage(cin, cout, cout, depth) for cin, cout, depth in
                                     zip(c[:0:-1], c[3::-1], (3, 3, 2, 1)))
        self.head = nn.Conv2d(c[0], num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        sums, skips = [], []
        for stage in self.encoder:
            total, x = stage(x)
            sums.append(total)
            skips.append(x)
        x = self.bottleneck(x)[1]
        if self.dca is not None:
            skips = self.dca(sums)
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, skip)
        return self.head(x)
