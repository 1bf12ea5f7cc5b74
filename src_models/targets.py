"""Instance labels -> the per-pixel training target of a model head (shared by train and finetune).

A checkpoint's `card.head` says what its output channels mean:

    binary       1 channel, sigmoid: foreground. Cards written before heads existed mean this.
    three_class  3 channels, softmax: 0 background, 1 object interior, 2 object boundary. The
                 boundary is each object's inner rim (`boundary_width` pixels, also where two
                 objects touch) plus the background pixels of the thin gaps between two objects,
                 as in DCAN (Chen et al. 2016) and the original U-Net's border handling: the
                 interior of touching objects is then disconnected by construction.
    distance     1 + DISTANCE_LEVELS channels, softmax: 0 background, k = 1..L the pixel's distance
                 to its object's border, normalised by that object's largest distance and
                 quantised into L levels (level L = the object's core). This is the energy target
                 of the Deep Watershed Transform (Bai & Urtasun 2017): a distance map learnt as
                 classes, so every output is a softmax like the others and the inference path
                 (tiling, blending, flips, exported runtimes) is the same for every head.

All targets are (H, W) int64 class ids for `losses.dice_ce_loss`; every function here is a few
array filters, cheap enough to run on each augmented crop.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

HEADS = ("binary", "three_class", "distance")
DISTANCE_LEVELS = 4
BOUNDARY_WIDTH = 2      # pixels of inner rim labelled boundary (three_class)
GAP_RADIUS = 2          # background pixels with two objects this close are boundary (three_class)


def head_of(card) -> str:
    """The head a card declares; "binary" for cards without the field (written before heads)."""
    if card is None:
        return "binary"
    head = card.get("head") if isinstance(card, dict) else getattr(card, "head", None)
    return head or "binary"


def check_head(head: str) -> str:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    return head


def head_channels(head: str) -> int:
    """Output channels (the model's num_classes) a head needs."""
    return {"binary": 1, "three_class": 3, "distance": 1 + DISTANCE_LEVELS}[check_head(head)]


def object_rim(labels: np.ndarray, width: int = BOUNDARY_WIDTH) -> np.ndarray:
    """(H, W) bool: object pixels with a pixel of another label (background or another object)
    within `width` pixels (Chebyshev). Image borders do not count as object borders."""
    lab = np.asarray(labels)
    size = 2 * max(1, int(width)) + 1
    hi = ndi.maximum_filter(lab, size=size, mode="nearest")
    lo = ndi.minimum_filter(lab, size=size, mode="nearest")
    return (lab > 0) & ((hi != lab) | (lo != lab))


def touching_gaps(labels: np.ndarray, radius: int = GAP_RADIUS) -> np.ndarray:
    """(H, W) bool: background pixels with two different objects within `radius` pixels."""
    lab = np.asarray(labels)
    size = 2 * max(1, int(radius)) + 1
    highest = ndi.maximum_filter(lab, size=size, mode="nearest")
    above = int(lab.max()) + 1  # background counts as "above every id" so only ids compete
    lowest = ndi.minimum_filter(np.where(lab > 0, lab, above), size=size, mode="nearest")
    return (lab == 0) & (lowest != above) & (highest != lowest)


def normalised_distance(labels: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1]: each object pixel's distance to the nearest pixel outside its own
    object, divided by the object's largest such distance (1 at its core); 0 on background."""
    lab = np.asarray(labels)
    if not lab.any():
        return np.zeros(lab.shape, np.float32)
    # Contacts between two touching objects count as borders: take them out before the transform.
    big = int(lab.max()) + 1
    hi = ndi.maximum_filter(lab, size=3, mode="nearest")
    lo = ndi.minimum_filter(np.where(lab > 0, lab, big), size=3, mode="nearest")
    edge = (lab > 0) & ((hi > lab) | (lo < lab))
    inside = (lab > 0) & ~edge
    dist = ndi.distance_transform_edt(inside).astype(np.float32)
    dist[edge] = 0.5
    ids = np.arange(int(lab.max()) + 1)
    peak = np.asarray(ndi.maximum(dist, lab, ids), np.float32)
    peak[0] = 1.0
    return np.where(lab > 0, dist / np.maximum(peak[lab], 1e-6), 0.0).astype(np.float32)


def instance_target(labels: np.ndarray, head: str = "binary", *,
                    boundary_width: int = BOUNDARY_WIDTH, gap_radius: int = GAP_RADIUS,
                    levels: int = DISTANCE_LEVELS) -> np.ndarray:
    """(H, W) instance ids (0 = background, one id per object) -> (H, W) int64 class target of
    `head` (see the module docstring). Corrected labels from a user work the same: a stroke that
    separates two glands gives two ids, so their contact becomes boundary."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"instance labels must be (H, W), got shape {lab.shape}")
    head = check_head(head)
    if head == "binary":
        return (lab > 0).astype(np.int64)
    if not np.issubdtype(lab.dtype, np.integer):
        lab = lab.astype(np.int64)
    if head == "three_class":
        out = (lab > 0).astype(np.int64)
        out[object_rim(lab, boundary_width) | touching_gaps(lab, gap_radius)] = 2
        return out
    d = normalised_distance(lab)
    level = 1 + np.minimum(levels - 1, np.floor(d * levels)).astype(np.int64)
    return np.where(lab > 0, level, 0).astype(np.int64)


def interior_score(prob: np.ndarray, head: str) -> np.ndarray:
    """(K, H, W) softmax output -> (H, W) float32 in [0, 1], high at object cores and low on their
    borders: the interior probability (three_class) or the expected normalised distance level
    (distance). Markers for the watershed are where it is high."""
    prob = np.asarray(prob, np.float32)
    head = check_head(head)
    if head == "three_class":
        return prob[1]
    k = prob.shape[0] - 1
    centres = (np.arange(1, k + 1, dtype=np.float32) - 0.5) / k
    fg = np.clip(prob[1:].sum(0), 1e-6, None)  # the level expected given that it is an object
    return (np.tensordot(centres, prob[1:], axes=1) / fg).astype(np.float32)


def target_settings(card) -> dict:
    """The target's keyword settings (boundary_width, gap_radius, levels) a checkpoint was trained
    with, from `card.training["target"]` (defaults where absent), for `instance_target`."""
    training = (card.get("training") if isinstance(card, dict) else getattr(card, "training", None)) or {}
    recorded = training.get("target") or {}
    return {k: int(recorded[k]) for k in ("boundary_width", "gap_radius", "levels") if k in recorded}


def card_target(labels: np.ndarray, card) -> np.ndarray:
    """`instance_target` for the head and target settings recorded in a checkpoint's card: what
    fine-tuning that checkpoint on corrected labels must learn."""
    return instance_target(labels, head_of(card), **target_settings(card))
