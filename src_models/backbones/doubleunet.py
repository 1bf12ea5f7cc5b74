"""DoubleU-Net (Jha et al. 2020) as the DCA paper configures it, with optional DCA.

Network 1: a VGG-19 encoder (random init; torchvision's `features` layout, so ImageNet weights
load into `encoder1.features`), an ASPP bridge and a decoder whose output is a sigmoid mask that
multiplies the (ImageNet-normalised) input. Network 2: its own encoder on that product, an ASPP
bridge and a decoder that concatenates the skips of both encoders.

With DCA (as the reference builds it): one DCA refines VGG's skips for decoder 1, a second DCA
refines those refined skips again for decoder 2, and a third refines encoder 2's skips.
Reference details kept: skips are taken before each stage's last ReLU / BatchNorm; the VGG trunk
keeps its fixed widths (64 ... 512) while the rest scales with `width` (0.5: the reference's).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import SegmentationNet
from ..blocks import ASPP, BNReLU, DoubleConv, SqueezeExcite, VGG19Features, upsample_to
from ..dca import official_dca_key
from ..registry import register
from .common import CONV_BLOCK_PART, aspp_key_rules, key_mapper, skip_dca

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_VGG_SKIPS = (64, 128, 256, 512)


class SEConvStage(nn.Module):
    """Two 3x3 convs, BN + ReLU, squeeze-excite (reduction 8).
    (B, Cin, H, W) -> skip (B, C, H, W) (before the BatchNorm) and output (B, C, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels, out_channels, last_norm=False, last_act=False)
        self.post = BNReLU(out_channels)
        self.se = SqueezeExcite(out_channels, reduction=8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.conv(x)
        return skip, self.se(self.post(skip))


class ConcatDecoderStage(nn.Module):
    """Bilinear upsample to the skips' size, concatenate skips then x, SEConvStage.
    (B, Cin, h, w), skips [(B, Cs_j, H, W)] -> (B, Cout, H, W)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.block = SEConvStage(skip_channels + in_channels, out_channels)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = upsample_to(x, tuple(skips[0].shape[-2:]))
        return self.block(torch.cat((*skips, x), dim=1))[1]


def _dca(features, patch_size, n_blocks, channel_heads, spatial_heads, channel_att, spatial_att):
    return skip_dca(features, patch_size, n_blocks=n_blocks, channel_heads=channel_heads,
                    spatial_heads=spatial_heads, channel_att=channel_att, spatial_att=spatial_att)


# Reference VGG slices (vgg1 = features[:3], vgg2 = [4:8], vgg3 = [9:17], vgg4 = [18:26],
# vgg5 = [27:35]) -> offset of each slice in torchvision's features.
_VGG_SLICE_START = {1: 0, 2: 4, 3: 9, 4: 18, 5: 27}


def _stage_rules(ref: str, ours):
    part = CONV_BLOCK_PART
    return [
        (ref + r"\.conv1\.(conv|norm)\.(.+)", lambda m: f"{ours(m)}.conv.0.{part[m[2]]}.{m[3]}"),
        (ref + r"\.conv2\.conv\.(.+)", lambda m: f"{ours(m)}.conv.1.0.{m[2]}"),
        (ref + r"\.bn\.(.+)", lambda m: f"{ours(m)}.post.0.{m[2]}"),
        (ref + r"\.se\.(.+)", lambda m: f"{ours(m)}.se.{m[2]}"),
    ]


def _official_doubleunet_rules():
    base = key_mapper(
        [(r"vgg([1-5])\.(\d+)\.(.+)",
          lambda m: f"encoder1.features.{_VGG_SLICE_START[int(m[1])] + int(m[2])}.{m[3]}"),
         (r"out1\.0\.(.+)", lambda m: f"mask_head.{m[1]}"),
         (r"out\.(.+)", lambda m: f"head.{m[1]}")]
        + _stage_rules(r"decode([1-4])", lambda m: f"decoder1.{int(m[1]) - 1}.block")
        + _stage_rules(r"encode2_([1-4])", lambda m: f"encoder2.{int(m[1]) - 1}")
        + _stage_rules(r"decode2_([1-4])", lambda m: f"decoder2.{int(m[1]) - 1}.block")
        + aspp_key_rules(r"aspp_1", "bridge1", 5) + aspp_key_rules(r"aspp_2", "bridge2", 5))

    def convert(key: str) -> str | None:
        for prefix, ours in (("DCA_vgg1.", "dca_encoder1.0."), ("DCA_vgg2.", "dca_encoder1.1.")):
            if key.startswith(prefix):
                inner = official_dca_key(key[len(prefix):])
                return None if inner is None else ours + inner
        return base(key)

    return convert


@register("doubleunet", official_key_map=_official_doubleunet_rules())
class DoubleUNet(SegmentationNet):
    """(B, in_channels, H, W) -> (B, num_classes, H, W) logits of network 2 (network 1's mask is
    internal). VGG-19 widths fixed; decoder widths int(512*width) ... int(64*width)."""

    size_multiple = 16

    def __init__(self, dca: bool = True, in_channels: int = 3, num_classes: int = 1, width: float = 0.5,
                 patch_size: int = 8, n_blocks: int = 1, channel_heads: Sequence[int] = (1, 1, 1, 1),
                 spatial_heads: Sequence[int] = (4, 4, 4, 4), channel_att: bool = True,
                 spatial_att: bool = True):
        super().__init__()
        c = [int(f * width) for f in (64, 128, 256, 512)]       # encoder 2 / decoder widths
        bridge = int(128 * width)
        # VGG expects ImageNet-normalised RGB (as the reference normalises inside the model).
        mean, std = (_IMAGENET_MEAN, _IMAGENET_STD) if in_channels == 3 else ((0.0,), (1.0,))
        self.register_buffer("input_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

        dca_args = (patch_size, n_blocks, channel_heads, spatial_heads, channel_att, spatial_att)
        self.encoder1 = VGG19Features(in_channels)
        self.bridge1 = ASPP(512, bridge, merge="concat", pointwise_branch=True, bias=False)
        self.dca_encoder1 = nn.ModuleList(_dca(_VGG_SKIPS, *dca_args) for _ in range(2)) if dca else None
        outs = c[::-1]
        self.decoder1 = nn.ModuleList(ConcatDecoderStage(cin, skip, cout) for cin, skip, cout in
                                      zip([bridge] + outs[:3], _VGG_SKIPS[::-1], outs))
        self.mask_head = nn.Conv2d(c[0], in_channels, 1)

        self.encoder2 = nn.ModuleList(SEConvStage(cin, cout)
                                      for cin, cout in zip([in_channels] + c[:3], c))
        self.bridge2 = ASPP(c[3], bridge, merge="concat", pointwise_branch=True, bias=False)
        self.dca = _dca(c, *dca_args) if dca else None
        self.decoder2 = nn.ModuleList(ConcatDecoderStage(cin, s1 + s2, cout) for cin, s1, s2, cout in
                                      zip([bridge] + outs[:3], _VGG_SKIPS[::-1], c[::-1], outs))
        self.head = nn.Conv2d(c[0], num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std
        *skips1, deepest = self.encoder1(x)
        y = self.bridge1(F.relu(deepest))
        skips1b = skips1
        if self.dca_encoder1 is not None:
            skips1 = self.dca_encoder1[0](skips1)
            skips1b = self.dca_encoder1[1](skips1)
        for stage, skip in zip(self.decoder1, reversed(skips1)):
            y = stage(y, [skip])
        y = torch.sigmoid(self.mask_head(y)) * x

        skips2 = []
        for i, stage in enumerate(self.encoder2):
            skip, y = stage(y if i == 0 else F.max_pool2d(y, 2))
            skips2.append(skip)
        y = self.bridge2(F.max_pool2d(y, 2))
        if self.dca is not None:
            skips2 = self.dca(skips2)
        for stage, s1, s2 in zip(self.decoder2, reversed(skips1b), reversed(skips2)):
            y = stage(y, [s1, s2])
        return self.head(y)
