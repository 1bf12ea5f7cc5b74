"""What every segmentation network here shares: any input size, and its own config for checkpoints."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pads bottom/right so H and W are multiples; reflect where possible, else replicate."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class SegmentationNet(nn.Module):
    """Base class: subclasses implement `forward_features` on inputs whose H and W are multiples of
    `size_multiple`; `forward` pads any (B, C, H, W) input to that and crops the logits back."""

    size_multiple = 16
    registry_name = "?"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Record constructor arguments (with defaults filled in) so checkpoints can rebuild the model.
        init = cls.__init__
        sig = inspect.signature(init)

        def wrapped(self, *args, **kw):
            bound = sig.bind(self, *args, **kw)
            bound.apply_defaults()
            cfg = {k: v for k, v in bound.arguments.items() if k != "self"}
            init(self, *args, **kw)
            if type(self) is cls:
                self.config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}

        wrapped.__signature__ = sig
        wrapped.__doc__ = init.__doc__
        cls.__init__ = wrapped

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = self.forward_features(pad_to_multiple(x, self.size_multiple))
        return y[..., :h, :w]

    @property
    def dca_module(self):
        return getattr(self, "dca", None)
