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


# --- Blocks added for the ResUNet++, R2U-Net, MultiResUNet and DoubleU-Net backbones ---------------


class RecurrentConv(nn.Module):
    """One 3x3 ConvNormAct applied 1 + steps times with shared weights, re-adding the input each
    step: y = f(x); y = f(x + y) (steps times). (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, steps: int = 2, norm: bool = True, act: bool = True):
        super().__init__()
        self.steps = steps
        self.conv = ConvNormAct(channels, channels, norm=norm, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for _ in range(self.steps):
            y = self.conv(x + y)
        return y


class RecurrentResidualBlock(nn.Module):
    """R2U-Net's unit: 1x1 projection, then two recurrent convolutions on its BN-ReLU'd output,
    added back to the projection. (B, Cin, H, W) -> sum (B, C, H, W) (before the final BatchNorm;
    the reference feeds this to DCA) and activated (B, C, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, steps: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)
        self.pre = BNReLU(out_channels)
        # The second recurrent conv is linear: the block's own BatchNorm + ReLU come after the sum.
        self.body = nn.Sequential(RecurrentConv(out_channels, steps),
                                  RecurrentConv(out_channels, steps, norm=False, act=False))
        self.post = BNReLU(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.proj(x)
        total = x + self.body(self.pre(x))
        return total, self.post(total)


class PreActResidual(nn.Module):
    """Pre-activation residual unit (BN-ReLU-conv twice) with a 1x1 projection shortcut; the first
    conv and the shortcut carry the stride. (B, Cin, H, W) -> (B, Cout, H/stride, W/stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(BNReLU(in_channels),
                                  nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                                  BNReLU(out_channels),
                                  nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ASPP(nn.Module):
    """Atrous spatial pyramid: parallel dilated 3x3 ConvNormAct branches (optionally a 1x1 branch
    first), merged by sum or concatenation, then a 1x1 ConvNormAct. (B, Cin, H, W) -> (B, Cout, H, W).

    merge="sum", pointwise_branch=False: ResUNet++'s form. merge="concat", pointwise_branch=True,
    bias=False: DoubleU-Net's (DeepLab-like) form, whose 1x1 branch alone keeps its bias."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...] = (1, 6, 12, 18),
                 merge: str = "sum", pointwise_branch: bool = False, act: bool = True,
                 bias: bool = True):
        super().__init__()
        if merge not in ("sum", "concat"):
            raise ValueError(f"merge must be 'sum' or 'concat', not {merge!r}")
        self.merge = merge
        branches = [ConvNormAct(in_channels, out_channels, 1, act=act)] if pointwise_branch else []
        branches += [ConvNormAct(in_channels, out_channels, 3, dilation=r, act=act, bias=bias)
                     for r in rates]
        self.branches = nn.ModuleList(branches)
        merged = out_channels * len(branches) if merge == "concat" else out_channels
        self.project = ConvNormAct(merged, out_channels, 1, act=act, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        if self.merge == "concat":
            y = torch.cat(outs, dim=1)
        else:
            y = outs[0]
            for o in outs[1:]:
                y = y + o
        return self.project(y)


class AttentionGate(nn.Module):
    """ResUNet++'s attention: the skip (pooled to the decoder's size) and the decoder features each
    go through BN-ReLU-conv3x3; their sum through BN-ReLU-conv1x1 gives one unbounded (no sigmoid,
    as in the reference) map that scales the decoder features.
    skip (B, Cs, 2h, 2w), x (B, Cx, h, w) -> (B, Cx, h, w)."""

    def __init__(self, skip_channels: int, channels: int, hidden: int):
        super().__init__()
        self.skip_path = nn.Sequential(nn.BatchNorm2d(skip_channels), nn.ReLU(),
                                       nn.Conv2d(skip_channels, hidden, 3, padding=1), nn.MaxPool2d(2))
        self.x_path = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(),
                                    nn.Conv2d(channels, hidden, 3, padding=1))
        self.score = nn.Sequential(nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.skip_path(skip) + self.x_path(x)) * x


def multires_widths(filters: int, alpha: float = 1.67) -> tuple[int, int, int]:
    """MultiResUNet's three chained-conv widths for a nominal width (the reference's rounding)."""
    return tuple(int(alpha * filters * r) for r in (0.167, 0.333, 0.5))


class MultiResBlock(nn.Module):
    """Three chained 3x3 ConvNormAct (a cheap 3x3/5x5/7x7 receptive-field mix) concatenated,
    BatchNorm, plus a 1x1 conv+BN shortcut, ReLU. (B, Cin, H, W) -> (B, out_channels, H, W) with
    out_channels = sum(multires_widths(filters))."""

    def __init__(self, in_channels: int, filters: int, alpha: float = 1.67):
        super().__init__()
        w = multires_widths(filters, alpha)
        self.out_channels = sum(w)
        self.shortcut = ConvNormAct(in_channels, self.out_channels, 1, act=False)
        self.convs = nn.ModuleList(ConvNormAct(cin, cout) for cin, cout in zip((in_channels,) + w[:2], w))
        self.norm = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        y = x
        for conv in self.convs:
            y = conv(y)
            outs.append(y)
        return F.relu(self.norm(torch.cat(outs, dim=1)) + self.shortcut(x))


class ResPath(nn.Module):
    """MultiResUNet's skip path: `length` residual units (3x3 conv + 1x1 conv shortcut, BN, ReLU).
    (B, Cin, H, W) -> last sum before its BatchNorm (what the reference feeds DCA) and the
    activated output, both (B, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, length: int):
        super().__init__()
        cins = [in_channels] + [out_channels] * (length - 1)
        self.convs = nn.ModuleList(nn.Conv2d(c, out_channels, 3, padding=1) for c in cins)
        self.shortcuts = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in cins)
        self.norms = nn.ModuleList(nn.BatchNorm2d(out_channels) for _ in cins)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = x
        for conv, shortcut, norm in zip(self.convs, self.shortcuts, self.norms):
            total = conv(x) + shortcut(x)
            x = F.relu(norm(total))
        return total, x


# VGG-19 "features": conv widths per stage; a max-pool precedes every stage but the first.
_VGG19_STAGES = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))


class VGG19Features(nn.Module):
    """VGG-19's convolutional trunk, randomly initialised, laid out exactly as torchvision's
    `vgg19().features` (so `features.<i>.weight` keys of ImageNet weights load unchanged), minus the
    last ReLU and max-pool.

    (B, Cin, H, W) -> five stage outputs taken before their last ReLU:
    (B, 64, H, W), (B, 128, H/2, W/2), (B, 256, H/4, W/4), (B, 512, H/8, W/8), (B, 512, H/16, W/16).
    """

    def __init__(self, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        self.taps: list[int] = []   # index of each stage's last conv in `features`
        cin = in_channels
        for s, widths in enumerate(_VGG19_STAGES):
            if s > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for i, cout in enumerate(widths):
                if i > 0:
                    layers.append(nn.ReLU(inplace=True))
                layers.append(nn.Conv2d(cin, cout, 3, padding=1))
                cin = cout
            self.taps.append(len(layers) - 1)
            if s < len(_VGG19_STAGES) - 1:
                layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        start = 0
        for tap in self.taps:
            if start:
                x = F.relu(x)   # not in place: the pre-activation output is kept as a skip
            for layer in self.features[start:tap + 1]:
                x = layer(x)
            outs.append(x)
            start = tap + 2     # skip the ReLU after the tap (applied out of place above)
        return outs
