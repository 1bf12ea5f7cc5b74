"""Building blocks shared by every backbone.

Each block is small and named for what it computes; backbones compose them. Shapes are given as
(B, C, H, W). Nothing here knows about DCA.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvNormAct(nn.Sequential):
    """Conv2d -> optional BatchNorm -> optional ReLU. (B, Cin, H, W) -> (B, Cout, H', W')."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, norm: bool = True, act: bool = True,
                 bias: bool = True):
        if padding is None:
            padding = dilation * (kernel_size // 2)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                             padding=padding, dilation=dilation, bias=bias)]
        if norm:
            layers.append(nn.BatchNorm2d(out_channels))
        if act:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two 3x3 ConvNormAct. The second may skip norm/activation (U-Net encoder skips are taken
    before their BatchNorm in the reference design)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 last_norm: bool = True, last_act: bool = True):
        super().__init__(ConvNormAct(in_channels, mid_channels),
                         ConvNormAct(mid_channels, out_channels, norm=last_norm, act=last_act))


class BNReLU(nn.Sequential):
    def __init__(self, channels: int):
        super().__init__(nn.BatchNorm2d(channels), nn.ReLU())


def upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True: equal to the reference's fixed-factor upsampling
    whenever size is an exact multiple, and defined for any other size too."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class UpConv(nn.Module):
    """Upsample (bilinear) to the skip's size, then ConvNormAct 3x3. (B, Cin, h, w) -> (B, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 norm: bool = True, act: bool = True):
        super().__init__()
        self.conv = ConvNormAct(in_channels, out_channels, kernel_size, norm=norm, act=act)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(upsample_to(x, size))


class SqueezeExcite(nn.Module):
    """Channel gating from global average pooling; two bias-free linear layers."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = int(channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(),
                                nn.Linear(hidden, channels, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]
