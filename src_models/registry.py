"""Model registry: one name per backbone, one `build_model` for all of them.

Every backbone constructor takes the same keyword arguments, with defaults equal to the paper's
configuration (filter coefficient 0.5, 3 input channels, 1 output, patch size 8, one DCA block,
CCA heads 1, SCA heads 4).
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_OFFICIAL_KEY_MAPS: dict[str, Callable[[str], str | None]] = {}

PAPER_DEFAULTS = dict(dca=True, in_channels=3, num_classes=1, width=0.5, patch_size=8, n_blocks=1,
                      channel_att=True, spatial_att=True)


def register(name: str, official_key_map: Callable[[str], str | None] | None = None):
    """Class decorator: make a backbone buildable as `build_model(name, ...)`.

    official_key_map turns one reference-code parameter name into ours (None: not ours)."""

    def deco(cls):
        _REGISTRY[name] = cls
        cls.registry_name = name
        if official_key_map is not None:
            _OFFICIAL_KEY_MAPS[name] = official_key_map
        return cls

    return deco


def _ensure_backbones_imported() -> None:
    from . import backbones  # noqa: F401  (importing registers every architecture)


def list_models() -> list[str]:
    _ensure_backbones_imported()
    return sorted(_REGISTRY)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone, e.g. `build_model("unet", dca=True, width=0.125)`.

    (B, in_channels, H, W) -> (B, num_classes, H, W) logits, for any H, W and batch size.
    The constructor arguments are kept on the model as `model.config` (for checkpoints)."""
    _ensure_backbones_imported()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](**kwargs)
    return model


def official_key_map(name: str) -> Callable[[str], str | None]:
    _ensure_backbones_imported()
    if name not in _OFFICIAL_KEY_MAPS:
        raise ValueError(f"no converter for reference checkpoints of {name!r}")
    return _OFFICIAL_KEY_MAPS[name]
