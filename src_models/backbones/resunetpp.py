"""ResUNet++ (Jha et al. 2019) as the DCA paper configures it, with optional DCA on the first three
skips (patch size 4).

Encoder: a residual stem, then three (squeeze-excite -> strided pre-activation residual unit)
stages; an ASPP bridge; each decoder stage gates the deeper features with the skip (attention
gate), upsamples them (nearest) to the skip's size, concatenates the skip and applies a residual
unit; an ASPP head. Reference details kept: the bridge ASPP has no ReLU, the attention gate has no
sigmoid, and squeeze-excite reductions scale with the width.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import SegmentationNet
from ..blocks import ASPP, AttentionGate, ConvNormAct, PreActResidual, SqueezeExcite
from ..registry import register
from .common import CONV_BLOCK_PART, aspp_key_rules, key_mapper, skip_dca


class SEResidualDown(nn.Module):
    """Squeeze-excite, then a stride-2 residual unit. (B, Cin, H, W) -> (B, Cout, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int):
        super().__init__()
        self.se = SqueezeExcite(in_channels, reduction)
        self.res = PreActResidual(in_channels, out_channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.se(x))


class GatedDecoderStage(nn.Module):
    """Attention-gate x with the skip, upsample (nearest) to the skip's size, concatenate, residual
    unit. (B, Cin, h, w), skip (B, Cskip, 2h, 2w) -> (B, Cout, 2h, 2w)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.gate = AttentionGate(skip_channels, in_channels, in_channels)
        self.res = PreActResidual(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.gate(skip, x), size=tuple(skip.shape[-2:]), mode="nearest")
        return self.res(torch.cat((x, skip), dim=1))


def _preact_rules(ref: str, ours):
    """Reference ResConv names -> our PreActResidual; `ref` has one group, ours(match) our prefix."""
    return [
        (ref + r"\.conv\.([02])\.bn\.(.+)", lambda m: f"{ours(m)}.body.{m[2]}.0.{m[3]}"),
        (ref + r"\.conv\.([13])\.(.+)", lambda m: f"{ours(m)}.body.{m[2]}.{m[3]}"),
        (ref + r"\.skip\.(.+)", lambda m: f"{ours(m)}.shortcut.{m[2]}"),
    ]


# Reference attention-block parts -> (our path, index). Its norms are registered twice (as normN
# and as the first module of each path), so both names map to the same tensor of ours.
_GATE_PARTS = {"norm1": ("skip_path", "0"), "norm2": ("x_path", "0"), "norm3": ("score", "0"),
               "conv_encoder.0": ("skip_path", "0"), "conv_encoder.2": ("skip_path", "2"),
               "conv_decoder.0": ("x_path", "0"), "conv_decoder.2": ("x_path", "2"),
               "conv_attn.0": ("score", "0"), "conv_attn.2": ("score", "2")}


def _official_resunetpp_rules():
    part = CONV_BLOCK_PART
    gate_parts = "|".join(p.replace(".", r"\.") for p in _GATE_PARTS)
    return key_mapper(
        [(r"input_layer\.0\.(conv|norm)\.(.+)", lambda m: f"stem.0.{part[m[1]]}.{m[2]}"),
         (r"input_layer\.1\.(.+)", lambda m: f"stem.1.{m[1]}"),
         (r"input_skip\.0\.(.+)", lambda m: f"stem_shortcut.{m[1]}"),
         (r"squeeze_excite([1-3])\.fc\.(.+)", lambda m: f"encoder.{int(m[1]) - 1}.se.fc.{m[2]}"),
         (r"attn([1-3])\.(" + gate_parts + r")\.(.+)",
          lambda m: f"decoder.{int(m[1]) - 1}.gate.{'.'.join(_GATE_PARTS[m[2]])}.{m[3]}")]
        + _preact_rules(r"residual_conv([1-3])", lambda m: f"encoder.{int(m[1]) - 1}.res")
        + _preact_rules(r"up_residual_conv([1-3])", lambda m: f"decoder.{int(m[1]) - 1}.res")
        + aspp_key_rules(r"aspp_bridge", "bridge", 4) + aspp_key_rules(r"aspp_out", "head_aspp", 4)
        + [(r"output_layer\.(.+)", lambda m: f"head.{m[1]}")])


@register("resunetpp", official_key_map=_official_resunetpp_rules())
class ResUNetPP(SegmentationNet):
    """(B, in_channels, H, W) -> (B, num_classes, H, W). Widths int(64*width) ... int(1024*width);
    three downsamplings, so DCA refines three skips (strides patch, patch/2, patch/4)."""

    size_multiple = 8

    def __init__(self, dca: bool = True, in_channels: int = 3, num_classes: int = 1, width: float = 0.5,
                 patch_size: int = 4, n_blocks: int = 1, channel_heads: Sequence[int] = (1, 1, 1),
                 spatial_heads: Sequence[int] = (4, 4, 4), channel_att: bool = True,
                 spatial_att: bool = True):
        super().__init__()
        c = [int(f * width) for f in (64, 128, 256, 512, 1024)]
        self.stem = nn.Sequential(ConvNormAct(in_channels, c[0]), nn.Conv2d(c[0], c[0], 3, padding=1))
        self.stem_shortcut = nn.Conv2d(in_channels, c[0], 3, padding=1)
        # The reference's squeeze-excite reductions are int(16k), int(32k), int(32k).
        reductions = [max(1, int(r * width)) for r in (16, 32, 32)]
        self.encoder = nn.ModuleList(SEResidualDown(cin, cout, r)
                                     for cin, cout, r in zip(c[:3], c[1:4], reductions))
        self.bridge = ASPP(c[3], c[4], act=False)
        self.dca = skip_dca(c[:3], patch_size, n_blocks=n_blocks, channel_heads=channel_heads,
                            spatial_heads=spatial_heads, channel_att=channel_att,
                            spatial_att=spatial_att) if dca else None
        self.decoder = nn.ModuleList(GatedDecoderStage(cin, cskip, cout) for cin, cskip, cout in
                                     zip((c[4], c[3], c[2]), (c[2], c[1], c[0]), (c[3], c[2], c[1])))
        self.head_aspp = ASPP(c[1], c[0])
        self.head = nn.Conv2d(c[0], num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) + self.stem_shortcut(x)
        skips = [x]
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = self.bridge(skips.pop())
        if self.dca is not None:
            skips = self.dca(skips)
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, skip)
        return self.head(self.head_aspp(x))
