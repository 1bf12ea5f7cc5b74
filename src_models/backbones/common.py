"""Pieces several backbones share: the U-Net decoder stage and reference-name conversion helpers."""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn

from ..blocks import DoubleConv, UpConv
from ..dca import DCA, official_dca_key


class DecoderStage(nn.Module):
    """Upsample to the skip's size, concatenate the skip, two convolutions.
    (B, Cin, h, w), skip (B, Cskip, H, W) -> (B, Cout, H, W)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = UpConv(in_channels, out_channels)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x, tuple(skip.shape[-2:]))
        return self.conv(torch.cat((x, skip), dim=1))


def skip_dca(features: list[int], patch_size: int, **dca_kwargs) -> DCA:
    """DCA over skips whose resolution halves from one stage to the next: the token patch is
    patch_size pixels at the first skip, patch_size / 2 at the second, ... (the reference's strides)."""
    return DCA(features, strides=[patch_size // 2 ** i for i in range(len(features))], **dca_kwargs)


# Reference conv_block children -> index in our ConvNormAct (Sequential: conv, norm, act).
CONV_BLOCK_PART = {"conv": "0", "norm": "1"}


def aspp_key_rules(ref: str, ours: str, branches: int) -> list[tuple[str, Callable[[re.Match], str]]]:
    """Reference ASPP (`block1..N` + `out`, each a conv_block) -> our ASPP (`branches.i` + `project`)."""
    part = CONV_BLOCK_PART
    return [
        (ref + rf"\.block([1-{branches}])\.(conv|norm)\.(.+)",
         lambda m: f"{ours}.branches.{int(m[1]) - 1}.{part[m[2]]}.{m[3]}"),
        (ref + r"\.out\.(conv|norm)\.(.+)", lambda m: f"{ours}.project.{part[m[1]]}.{m[2]}"),
    ]


def key_mapper(rules: list[tuple[str, Callable[[re.Match], str]]]) -> Callable[[str], str | None]:
    """Build a name converter from (regex, match -> our name) rules; reference DCA keys are shared."""
    compiled = [(re.compile(p), f) for p, f in rules]

    def convert(key: str) -> str | None:
        if key.startswith("DCA."):
            inner = official_dca_key(key[4:])
            return None if inner is None else "dca." + inner
        for pattern, fn in compiled:
            m = pattern.fullmatch(key)
            if m:
                return fn(m)
        return None

    return convert
