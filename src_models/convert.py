"""Bring models trained with the official DCA code (gorkemcanates/Dual-Cross-Attention) into ours.

The reference names parameters after its class layout; each backbone registers a function that maps
one reference name to ours. Tensors whose layout differs only by singleton axes (a depthwise 1x1
conv's (C,1,1,1) weight vs our (C,) scale; a 1x1 conv's (C,C,1,1) vs our Linear's (C,C)) are reshaped.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from .registry import build_model, official_key_map

# Reference constructor argument -> ours.
_KWARG_NAMES = {
    "attention": "dca",
    "n": "n_blocks",
    "in_features": "in_channels",
    "out_features": "num_classes",
    "k": "width",
    "patch_size": "patch_size",
    "spatial_att": "spatial_att",
    "channel_att": "channel_att",
    "spatial_head_dim": "spatial_heads",
    "channel_head_dim": "channel_heads",
}
# Reference arguments that have no meaning here (our token grid follows the input).
_IGNORED_KWARGS = {"input_size", "device"}
# Reference classes that ignore their filter coefficient k and always build the network that
# width 0.5 gives here (MultiResUNet, V-Net; DoubleU-Net's widths are fixed too).
_REFERENCE_FIXED_KWARGS = {"multiresunet": {"width": 0.5}, "vnet": {"width": 0.5},
                           "doubleunet": {"width": 0.5}}


def official_kwargs_to_ours(official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    ours = {}
    for key, value in official_kwargs.items():
        if key in _IGNORED_KWARGS:
            continue
        if key not in _KWARG_NAMES:
            raise ValueError(f"unknown reference constructor argument {key!r}; "
                             f"known: {sorted(set(_KWARG_NAMES) | _IGNORED_KWARGS)}")
        if isinstance(value, (list, tuple)):
            value = list(value)
        ours[_KWARG_NAMES[key]] = value
    return ours


def convert_official_state_dict(name: str, state_dict: Mapping[str, torch.Tensor],
                                model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename (and reshape where only singleton axes differ) a reference state dict for `model`."""
    mapper = official_key_map(name)
    ours = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        new_key = mapper(key)
        if new_key is None or new_key not in ours:
            unknown.append(key if new_key is None else f"{key} -> {new_key}")
            continue
        target = ours[new_key]
        if tensor.shape != target.shape:
            if tensor.numel() != target.numel():
                raise ValueError(f"{key}: reference shape {tuple(tensor.shape)} does not fit "
                                 f"{new_key} {tuple(target.shape)}; was it built with other arguments?")
            tensor = tensor.reshape(target.shape)
        converted[new_key] = tensor
    missing = sorted(set(ours) - set(converted))
    if unknown or missing:
        raise ValueError(f"reference checkpoint does not match {name}: "
                         f"{len(unknown)} unrecognised keys {unknown[:5]}, "
                         f"{len(missing)} of our keys missing {missing[:5]}")
    return converted


def from_official(name: str, state_dict: Mapping[str, torch.Tensor],
                  official_kwargs: Mapping[str, Any]) -> nn.Module:
    """A ready model in eval mode that computes what the reference model computed.

    name: our registry name; state_dict: the reference's; official_kwargs: the reference
    constructor's arguments (as fixtures' manifest.json lists them)."""
    kwargs = {**official_kwargs_to_ours(official_kwargs), **_REFERENCE_FIXED_KWARGS.get(name, {})}
    model = build_model(name, **kwargs)
    model.load_state_dict(convert_official_state_dict(name, state_dict, model))
    return model.eval()
