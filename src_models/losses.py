"""Dice + cross-entropy, optionally restricted to valid pixels (a pathologist's reviewed region)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def labels_to_target(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Instance ids -> foreground (0/1) for binary models; class ids kept for multi-class models."""
    return (labels > 0).astype(np.int64) if num_classes == 1 else labels.astype(np.int64)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None,
                 smooth: float = 1.0, dice_weight: float = 1.0, ce_weight: float = 1.0) -> torch.Tensor:
    """logits (B, K, H, W); target (B, H, W) class ids (binary: 0/1 with K = 1); valid_mask (B, H, W)
    bool or None. Pixels outside valid_mask contribute nothing to either term."""
    valid = torch.ones_like(target, dtype=logits.dtype) if valid_mask is None else valid_mask.to(logits.dtype)
    n_valid = valid.sum().clamp_min(1.0)
    if logits.shape[1] == 1:
        t = target.to(logits.dtype)
        logit = logits[:, 0]
        ce = (F.binary_cross_entropy_with_logits(logit, t, reduction="none") * valid).sum() / n_valid
        prob = torch.sigmoid(logit) * valid
        inter = (prob * t).sum()
        denom = prob.sum() + (t * valid).sum()
    else:
        ce = (F.cross_entropy(logits, target.long(), reduction="none") * valid).sum() / n_valid
        prob = torch.softmax(logits, dim=1) * valid[:, None]
        onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype) * valid[:, None]
        # Foreground classes only: background Dice would swamp the signal.
        inter = (prob[:, 1:] * onehot[:, 1:]).sum()
        denom = prob[:, 1:].sum() + onehot[:, 1:].sum()
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return dice_weight * dice + ce_weight * ce
