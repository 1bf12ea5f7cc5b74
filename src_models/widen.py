"""Widen a trained U-Net + DCA to twice its width without changing what it computes (Net2WiderNet,
Chen, Goodfellow, Shlens 2016), so an "accurate" wider variant starts from the fast model's weights
instead of from scratch, which a CPU cannot afford.

Every channel j of the narrow model becomes the pair (2j, 2j+1) of the wide one:
- weights that produce channels (conv / linear outputs, per-channel affines, norms) are duplicated;
- weights that read channels (conv / linear inputs) are duplicated and halved, so a layer's output
  is the same sum as before;
- interleaving (rather than appending the new channels) keeps every contiguous block the same set of
  old channels: attention heads, the DCA concatenation of stages and the decoder's [up, skip]
  concatenation all split channels into contiguous blocks whose sizes double with the width;
- LayerNorm over a duplicated set has the same mean and variance, and channel attention over
  duplicated keys with duplicated values gives the same softmax-weighted sum;
- the attention scales depend on the width (channel: C^-1/2, spatial: (C/h)^-1/2), and a spatial
  dot product over duplicated channels doubles: the query affines are rescaled to cancel both.

Duplicated channels get identical gradients and would stay twins; `noise` perturbs each channel's
reading weights by a relative amount so they can diverge when training continues.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .dca import ChannelCrossAttention, SpatialCrossAttention

WIDEN_FACTOR = 2


def _widen_dims(old: torch.Tensor, new_shape: torch.Size) -> list[int]:
    dims = []
    for d, (o, n) in enumerate(zip(old.shape, new_shape)):
        if n == WIDEN_FACTOR * o:
            dims.append(d)
        elif n != o:
            raise ValueError(f"cannot widen a dimension of size {o} to {n}")
    return dims


def _duplicated(old: torch.Tensor, new_shape: torch.Size, input_dim: int | None) -> torch.Tensor:
    """Each channel repeated in place (j -> 2j, 2j+1); halved along the dimension that is read."""
    dims = _widen_dims(old, new_shape)
    out = old
    for d in dims:
        out = out.repeat_interleave(WIDEN_FACTOR, dim=d)
    if input_dim is not None and input_dim in dims:
        out = out / WIDEN_FACTOR
    return out


def widen_state(narrow: nn.Module, wide: nn.Module, noise: float = 0.0,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The wide model's state dict holding the narrow model's function (exactly when noise is 0).

    Both models must be the same architecture, the wide one built with twice the width."""
    old_state = narrow.state_dict()
    new_state = wide.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, module in wide.named_modules():
        for pname, tensor in list(module.named_parameters(recurse=False)) + \
                list(module.named_buffers(recurse=False)):
            key = f"{name}.{pname}" if name else pname
            old = old_state[key]
            if old.ndim == 0 or old.shape == tensor.shape:
                out[key] = old.clone()
                continue
            reads = 1 if isinstance(module, (nn.Conv2d, nn.Linear)) and pname == "weight" else None
            value = _duplicated(old, tensor.shape, reads)
            if reads is not None and noise > 0:
                value = value * (1 + noise * torch.randn(value.shape, generator=generator))
            out[key] = value
    for name, module in wide.named_modules():
        # query rescaling: see the module docstring
        if isinstance(module, ChannelCrossAttention):
            factor = math.sqrt(WIDEN_FACTOR)           # C^-1/2 shrank by sqrt(2)
        elif isinstance(module, SpatialCrossAttention):
            factor = 1 / math.sqrt(WIDEN_FACTOR)       # dot products x2, (C/h)^-1/2 / sqrt(2)
        else:
            continue
        for pname in ("weight", "bias"):
            out[f"{name}.q.{pname}"] = out[f"{name}.q.{pname}"] * factor
    missing = set(new_state) - set(out)
    if missing:
        raise ValueError(f"widening left weights unset: {sorted(missing)[:5]}")
    return out


__all__ = ["widen_state", "WIDEN_FACTOR"]
