"""Dual Cross-Attention (Ates, Mohan, Celik 2023) on a U-Net's skip connections.

Data flow for S encoder stages with channels C_1..C_S (C = sum C_i), token grid Ph x Pw (N = Ph*Pw):

    skips (B, C_i, H_i, W_i) --avg-pool--> tokens (B, N, C_i) --per-channel affine-->
    n x [channel cross-attention, then spatial cross-attention] -->
    1x1 projection on tokens --bilinear up to (H_i, W_i)--> + skip --> BatchNorm --> ReLU

The reference pools to a fixed P x P grid and upsamples by fixed factors, so it only runs at its
training size. Here the grid follows the input (first skip's size / patch stride, per axis), which
equals the reference's grid at the training size and keeps each token's footprint the same at any
other size; the upsampling targets each skip's actual size.

Speed notes (why the code looks like this):
- The reference's "depthwise 1x1 conv" projections are per-channel scale + bias: done directly on
  (B, N, C) tokens (TokenAffine) instead of reshaping to images and back around each conv.
- The output 1x1 conv commutes with bilinear upsampling (both linear, interpolation weights sum to
  one), so it runs on the N tokens rather than on the full-resolution skip.
- Attention uses torch's fused scaled_dot_product_attention (spatial attention with V padded to
  Q's head size, see `_attend`); the explicit softmax path runs only while attention maps are
  being captured (see `capture_attention`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import upsample_to


class TokenAffine(nn.Module):
    """Per-channel scale and bias on tokens (B, N, C) -> (B, N, C).

    Same function as the reference's depthwise 1x1 convolution (weight (C,1,1,1), bias (C,))."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        # Same initial distribution as a depthwise 1x1 Conv2d (fan_in = 1).
        nn.init.uniform_(self.weight, -1.0, 1.0)
        nn.init.uniform_(self.bias, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x, self.weight)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            capture: list | None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two axes; records the map when capturing.

    torch's fused (flash) kernels need V's head size equal to Q's. That holds for channel attention
    but not for spatial attention (Q, K: C/h per head; V: C_i/h), where torch would fall back to an
    unfused path with extra passes over the N x N map. Zero-padding V to Q's head size keeps the
    fused kernel (the pad columns come out zero and are dropped): faster on CPU for training and
    inference, and no N x N map is stored, so large tiles stay cheap in memory."""
    if capture is None:
        dq, dv = q.shape[-1], v.shape[-1]
        if dv < dq:
            return F.scaled_dot_product_attention(q, k, F.pad(v, (0, dq - dv)), scale=scale)[..., :dv]
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    att = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    capture.append(att.detach())
    return att @ v


class ChannelCrossAttention(nn.Module):
    """One stage's channels attend to the channels of all stages.

    q: (B, N, C_i), kv: (B, N, C) -> (B, N, C_i). The map is (C_i/h) x (C/h) per head, scaled by
    C^-1/2 (the full concatenated width, as in the reference), softmax over the C axis."""

    def __init__(self, stage_channels: int, total_channels: int, heads: int = 1):
        super().__init__()
        self.heads = heads
        self.q = TokenAffine(stage_channels)
        self.k = TokenAffine(total_channels)
        self.v = TokenAffine(total_channels)
        self.out = TokenAffine(stage_channels)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, capture: list | None = None) -> torch.Tensor:
        b, n, c_q = q.shape
        c = kv.shape[2]
        h = self.heads
        # Channels become the sequence axis and tokens the embedding axis: (B, h, C/h, N).
        q_ = self.q(q).view(b, n, h, c_q // h).permute(0, 2, 3, 1)
        k_ = self.k(kv).view(b, n, h, c // h).permute(0, 2, 3, 1)
        v_ = self.v(kv).view(b, n, h, c // h).permute(0, 2, 3, 1)
        out = _attend(q_, k_, v_, c ** -0.5, capture)          # (B, h, C_i/h, N)
        return self.out(out.permute(0, 3, 1, 2).reshape(b, n, c_q))


class SpatialCrossAttention(nn.Module):
    """Tokens attend to tokens: Q and K from all stages' channels, V from this stage.

    qk: (B, N, C), v: (B, N, C_i) -> (B, N, C_i). The map is N x N per head, scaled by (C/h)^-1/2."""

    def __init__(self, stage_channels: int, total_channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q = TokenAffine(total_channels)
        self.k = TokenAffine(total_channels)
        self.v = TokenAffine(stage_channels)
        self.out = TokenAffine(stage_channels)

    def forward(self, qk: torch.Tensor, v: torch.Tensor, capture: list | None = None) -> torch.Tensor:
        b, n, c = qk.shape
        c_v = v.shape[2]
        h = self.heads
        q_ = self.q(qk).view(b, n, h, c // h).transpose(1, 2)
        k_ = self.k(qk).view(b, n, h, c // h).transpose(1, 2)
        v_ = self.v(v).view(b, n, h, c_v // h).transpose(1, 2)
        out = _attend(q_, k_, v_, (c // h) ** -0.5, capture)   # (B, h, N, C_i/h)
        return self.out(out.transpose(1, 2).reshape(b, n, c_v))


class DCABlock(nn.Module):
    """Channel cross-attention then spatial cross-attention, each with LayerNorm and a residual."""

    def __init__(self, features: Sequence[int], channel_heads: Sequence[int],
                 spatial_heads: Sequence[int], channel_att: bool = True, spatial_att: bool = True):
        super().__init__()
        total = sum(features)
        self.channel_att = channel_att
        self.spatial_att = spatial_att
        if channel_att:
            self.channel_norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in features)
            self.channel_attn = nn.ModuleList(ChannelCrossAttention(c, total, h)
                                              for c, h in zip(features, channel_heads))
        if spatial_att:
            self.spatial_norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in features)
            self.spatial_attn = nn.ModuleList(SpatialCrossAttention(c, total, h)
                                              for c, h in zip(features, spatial_heads))

    def forward(self, tokens: list[torch.Tensor], capture: "DCAAttention | None" = None
                ) -> list[torch.Tensor]:
        if self.channel_att:
            normed = [norm(t) for norm, t in zip(self.channel_norms, tokens)]
            cat = torch.cat(normed, dim=2)
            maps = [] if capture is not None else None
            tokens = [t + attn(q, cat, maps)
                      for t, q, attn in zip(tokens, normed, self.channel_attn)]
            if capture is not None:
                capture.cca.append(maps)
        if self.spatial_att:
            normed = [norm(t) for norm, t in zip(self.spatial_norms, tokens)]
            cat = torch.cat(normed, dim=2)
            maps = [] if capture is not None else None
            tokens = [t + attn(cat, v, maps)
                      for t, v, attn in zip(tokens, normed, self.spatial_attn)]
            if capture is not None:
                capture.sca.append(maps)
        return tokens


@dataclass
class DCAAttention:
    """Attention captured from one DCA forward pass.

    cca[block][stage]: (B, heads, C_i/heads, C/heads), rows sum to one.
    sca[block][stage]: (B, heads, N, N) with N = grid[0] * grid[1], rows sum to one; token t is
    grid cell (t // grid[1], t % grid[1]).
    """
    grid: tuple[int, int] = (0, 0)
    features: tuple[int, ...] = ()
    input_size: tuple[int, int] = (0, 0)
    cca: list[list[torch.Tensor]] = field(default_factory=list)
    sca: list[list[torch.Tensor]] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)


class DCA(nn.Module):
    """Refines a list of skip features with dual cross-attention; returns the same shapes.

    features: channels per stage; strides: each stage's downsampling relative to the token grid of
    the first (the reference's [patch, patch/2, patch/4, patch/8]); the token grid is the first
    skip's size divided by strides[0].
    """

    def __init__(self, features: Sequence[int], strides: Sequence[int], n_blocks: int = 1,
                 channel_heads: Sequence[int] = (1, 1, 1, 1), spatial_heads: Sequence[int] = (4, 4, 4, 4),
                 channel_att: bool = True, spatial_att: bool = True):
        super().__init__()
        self.features = tuple(int(c) for c in features)
        self.strides = tuple(int(s) for s in strides)
        self.embed = nn.ModuleList(TokenAffine(c) for c in self.features)
        self.blocks = nn.ModuleList(DCABlock(self.features, channel_heads, spatial_heads,
                                             channel_att, spatial_att) for _ in range(n_blocks))
        self.out_proj = nn.ModuleList(nn.Linear(c, c) for c in self.features)
        self.out_norm = nn.ModuleList(nn.BatchNorm2d(c) for c in self.features)
        self._capture: DCAAttention | None = None
        self._capture_active = False

    def token_grid(self, skips: Sequence[torch.Tensor]) -> tuple[int, int]:
        h, w = skips[0].shape[-2:]
        s = self.strides[0]
        return max(1, round(h / s)), max(1, round(w / s))

    def forward(self, skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        grid = self.token_grid(skips)
        capture = None
        if self._capture_active:
            capture = DCAAttention(grid=grid, features=self.features,
                                   input_size=tuple(skips[0].shape[-2:]))
            self._capture = capture
        tokens = [embed(F.adaptive_avg_pool2d(s, grid).flatten(2).transpose(1, 2))
                  for s, embed in zip(skips, self.embed)]
        for block in self.blocks:
            tokens = block(tokens, capture)
        if capture is not None:
            capture.tokens = [t.detach() for t in tokens]
        out = []
        for t, skip, proj, norm in zip(tokens, skips, self.out_proj, self.out_norm):
            b, _, c = t.shape
            refined = proj(t).transpose(1, 2).reshape(b, c, *grid)
            refined = upsample_to(refined, tuple(skip.shape[-2:]))
            out.append(F.relu(norm(refined + skip)))
        return out


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[DCAAttention]]:
    """Within the block, every forward pass of the model's DCA modules records its attention maps.

    Yields a list that fills with one DCAAttention per DCA module per forward pass. Outside the
    block the fused attention kernels run and nothing is stored.
    """
    modules = [m for m in model.modules() if isinstance(m, DCA)]
    if not modules:
        raise ValueError("this model has no DCA module: build it with dca=True to see attention")
    records: list[DCAAttention] = []

    def hook(module, _inputs, _output):
        records.append(module._capture)

    handles = [m.register_forward_hook(hook) for m in modules]
    for m in modules:
        m._capture_active = True
    try:
        yield records
    finally:
        for m in modules:
            m._capture_active = False
            m._capture = None
        for h in handles:
            h.remove()


def official_dca_key(key: str) -> str | None:
    """Maps a reference DCA parameter name (after its 'DCA.' prefix) to ours, or None if unknown."""
    import re
    rules = [
        (r"^avg_map\.(\d+)\.proj\.depthwise\.(weight|bias)$", r"embed.\1.\2"),
        (r"^attention\.(\d+)\.channel_norm\.(\d+)\.(weight|bias)$", r"blocks.\1.channel_norms.\2.\3"),
        (r"^attention\.(\d+)\.spatial_norm\.(\d+)\.(weight|bias)$", r"blocks.\1.spatial_norms.\2.\3"),
        (r"^attention\.(\d+)\.c_attention\.(\d+)\.(q|k|v)_map\.proj\.depthwise\.(weight|bias)$",
         r"blocks.\1.channel_attn.\2.\3.\4"),
        (r"^attention\.(\d+)\.c_attention\.(\d+)\.projection\.proj\.depthwise\.(weight|bias)$",
         r"blocks.\1.channel_attn.\2.out.\3"),
        (r"^attention\.(\d+)\.s_attention\.(\d+)\.(q|k|v)_map\.proj\.depthwise\.(weight|bias)$",
         r"blocks.\1.spatial_attn.\2.\3.\4"),
        (r"^attention\.(\d+)\.s_attention\.(\d+)\.projection\.proj\.depthwise\.(weight|bias)$",
         r"blocks.\1.spatial_attn.\2.out.\3"),
        (r"^upconvs\.(\d+)\.conv\.conv\.(weight|bias)$", r"out_proj.\1.\2"),
        (r"^bn_relu\.(\d+)\.0\.(weight|bias|running_mean|running_var|num_batches_tracked)$",
         r"out_norm.\1.\2"),
    ]
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None
