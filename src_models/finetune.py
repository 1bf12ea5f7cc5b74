"""Fine-tune a model on a pathologist's corrections of one image (the plugin's "teach" round).

The pathologist looks at an image, corrects the predicted objects inside a region they reviewed, and
asks the model to learn from it. `finetune` trains a deep copy of the model (the original stays
untouched, so the round can be reverted) on random tile-sized crops of that image, with exact
flips / 90-degree rotations, Dice + cross-entropy counted only on reviewed pixels, AdamW at a low
learning rate. BatchNorm layers stay in eval mode: a handful of corrected tiles must not overwrite
running statistics gathered over a whole training set. Only the decoder side trains
(`train="decoder"`) by default when the corrections hold few objects (`DECODER_ONLY_BELOW`), and
tiles from the model's own training data are mixed in ("replay") so the model does not forget what
it knew.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .augment import flip_rot90
from .finetune_check import (DICE_MARGIN, REPLAY_TOLERANCE, RegionScore, choose_postprocessing,
                             crop_probabilities, informative_objects, judge_round,
                             region_probabilities, replay_crops, score_region, score_replay,
                             score_text, split_check, whole_objects_check,
                             crossing_objects, labels_in, object_changes, outside_part,
                             outside_snap, OUTSIDE_MARGIN, check_box)
from .inference import predict
from .losses import dice_ce_loss, labels_to_target, touching_gap_weights
from .targets import HEADS, card_target, head_channels, head_of
from .preprocess import DEFAULT_NORMALIZATION, as_float01, normalize, to_channels

# Parameter-name prefixes of each backbone's encoder (everything that sees the image before the DCA
# skips and the decoder). train="decoder" freezes exactly these.
ENCODER_PREFIXES: dict[str, tuple[str, ...]] = {
    "unet": ("encoder.", "bottleneck."),
    "r2unet": ("encoder.", "bottleneck."),
    "vnet": ("encoder.", "bottleneck."),
    "multiresunet": ("encoder.", "bottleneck."),
    "resunetpp": ("stem.", "stem_shortcut.", "encoder.", "bridge."),
    "doubleunet": ("encoder1.", "bridge1.", "encoder2.", "bridge2."),
}
_GENERIC_ENCODER_PREFIXES = ("encoder", "bottleneck", "bridge", "stem")
# Crop side of a round: a 512-tile glands model trains ~4x faster on 256-pixel crops, and on
# GlaS validation images they generalised better to the unseen half than 512-pixel crops
# (benchmarks/results/finetune_diagnosis.md); 224-pixel crops cost ~25% less again and did as
# well on the unseen half (benchmarks/results/finetune_speed.md).
DEFAULT_CROP = 224
# What a round trains by default (`finetune(train=None)`): the decoder side only (encoder frozen)
# when it learns from fewer than this many corrected objects, all layers from more. A few objects
# are little evidence, and a round that moves the encoder on them overfits them: over the GlaS
# validation images (2-10 glands on the trained-on part) decoder-only rounds gained +0.048 mean
# unseen-half object F1 with no kept round worse, all layers +0.023 with one kept round -0.076;
# over MoNuSeg's (150-740 nuclei) all layers gained +0.031, decoder-only +0.022
# (benchmarks/results/finetune_glands_decoder.md, finetune_nuclei_decoder.md). No image with
# between 10 and 150 corrected objects was measured: the line is drawn between the two.
DECODER_ONLY_BELOW = 50
# Replay crops of the model's own training data in every batch, beside batch_size crops of the
# corrections: one by default. `finetune(replay_per_batch=None)` gives as many as corrections (2)
# to a round on fewer than DECODER_ONLY_BELOW corrected objects and one to the others: a few
# objects are little evidence, and with one replay crop GlaS train_76's round (+0.333 on the unseen
# half) forgot enough of the training data to be rolled back; with two, GlaS gained +0.040 mean
# (against +0.0245), no kept round worse (benchmarks/results/finetune_glands_replay2.md), nuclei
# rounds lost with two (MoNuSeg +0.031 -> +0.028, finetune_nuclei_replay2.md). Not the default: a
# glands round then takes 1.3x as long, 25.9 against 19.8 s side by side (finetune_speed.md), past
# the 20 s a round may take; the cheaper ways to give it that replay lost (24 steps, 192-pixel crops,
# one correction crop per batch: finetune_glands_replay2_steps24.md, _crop192.md, _batch1.md).
REPLAY_PER_BATCH = 1
REPLAY_PER_BATCH_FEW = 2
REPLAY_PER_BATCH_MANY = REPLAY_PER_BATCH
# Steps of a round (`finetune(steps=None)`): DEFAULT_STEPS on fewer than DECODER_ONLY_BELOW
# corrected objects, DEFAULT_STEPS_MANY from there on. Many objects are much evidence: over the
# MoNuSeg validation images 45 steps gained +0.0346 mean unseen-half AJI over three seeds (each
# >= +0.031), 30 steps +0.0249 (+0.021 to +0.031), every round kept and none worse
# (benchmarks/results/finetune_nuclei_steps_s13.md). A glands round stays at 30: at 30 it already
# takes about the 20 s a round may take on a GlaS image (finetune_speed.md).
DEFAULT_STEPS = 30
DEFAULT_STEPS_MANY = 45


def _encoder_known(model: nn.Module) -> bool:
    try:
        encoder_prefixes(model)
    except ValueError:
        return False
    return True


def encoder_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes that make up `model`'s encoder, by its registry name; for an unknown
    architecture, its top-level modules whose names start with encoder/bottleneck/bridge/stem."""
    name = getattr(model, "registry_name", None)
    if name in ENCODER_PREFIXES:
        return ENCODER_PREFIXES[name]
    found = tuple(f"{child}." for child, _ in model.named_children()
                  if child.startswith(_GENERIC_ENCODER_PREFIXES))
    if not found:
        raise ValueError(f"cannot tell the encoder of {type(model).__name__}: add its parameter-name "
                         f"prefixes to src_models.finetune.ENCODER_PREFIXES")
    return found


def is_encoder_param(name: str, prefixes: Sequence[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


@dataclass
class FinetuneResult:
    """What one fine-tuning round produced.

    `model` is the model to use from now on (eval mode): the new weights when the round was `kept`,
    otherwise the model passed in (unchanged either way). `trained` is the new weights whatever the
    decision. `reason` says in one line why the round was kept or rolled back, `summary` tells the
    user what it did in their terms ("objects matching your held-back corrections: 12 of 20 before,
    18 of 20 after"). `check_before` / `check_after` score the old and new model on the held-back
    part of the corrections, `replay_before` / `replay_after` on crops of the model's training data
    (None without replay data). `instance_params` are the post-processing settings to use with
    `model` (re-chosen on the trained-on corrections when kept). When the new weights fail the
    check but the previous weights with settings re-chosen on the trained-on corrections pass the
    same check, the round is `kept` with `weights_kept` False: `model` is the previous model,
    `instance_params` its new settings, `check_after` their scores. `corrections` is the round's
    record for the checkpoint card (`card()` adds it)."""
    model: nn.Module
    loss_history: list[float]
    steps_done: int
    steps_requested: int
    cancelled: bool
    corrections: dict[str, Any]
    seconds: float = 0.0
    stopped: str = "steps"          # "steps" | "cancelled" | "time budget" | "non-finite loss"
    kept: bool = True
    reason: str = ""
    summary: str = ""
    trained: nn.Module | None = None
    check_before: RegionScore | None = None
    check_after: RegionScore | None = None
    replay_before: RegionScore | None = None
    replay_after: RegionScore | None = None
    check_source: str = "held back"   # "held back" | "trained on" (too few objects to hold back)
    instance_params: dict[str, Any] | None = None
    weights_kept: bool = True       # the new weights are in use (False: rolled back, or only settings kept)

    def card(self, parent_card, parent: str | None = None):
        """A copy of the parent's ModelCard for `model`: `parent` names the checkpoint that was
        fine-tuned (bundled name or path); None (an unsaved model was fine-tuned) keeps the parent
        card's own `parent`, its last saved ancestor. This round (numbered, with its check scores and
        whether it was kept) is appended to `corrections["rounds"]`, so consecutive unsaved rounds
        all stay on record; a kept round's re-chosen post-processing becomes the card's
        `instance_params`."""
        from .checkpoints import ModelCard
        d = parent_card.to_dict() if hasattr(parent_card, "to_dict") else dict(parent_card)
        d.pop("created", None)
        d["parent"] = str(parent) if parent else d.get("parent")
        previous = d.get("corrections") or {}
        rounds = list(previous.get("rounds", [])) if isinstance(previous, dict) else []
        d["corrections"] = {"rounds": rounds + [{"round": len(rounds) + 1, **self.corrections}]}
        if self.kept and self.instance_params:
            d["instance_params"] = dict(self.instance_params)
        return ModelCard.from_dict(d)


# --------------------------------------------------------------------------- inputs
def region_mask(region, shape: tuple[int, int]) -> np.ndarray:
    """None -> the whole image; (y0, y1, x0, x1) box (end exclusive, clipped) or an (H, W) boolean
    mask -> (H, W) bool of pixels whose labels count as ground truth."""
    h, w = shape
    if region is None:
        return np.ones((h, w), bool)
    if isinstance(region, np.ndarray) and region.ndim == 2:
        if region.shape != (h, w):
            raise ValueError(f"region mask has shape {region.shape}, the image is {(h, w)}")
        return region.astype(bool)
    try:
        y0, y1, x0, x1 = (int(v) for v in region)
    except (TypeError, ValueError):
        raise ValueError("region must be None, an (H, W) boolean mask or a (y0, y1, x0, x1) box") from None
    mask = np.zeros((h, w), bool)
    mask[max(0, y0):max(0, min(h, y1)), max(0, x0):max(0, min(w, x1))] = True
    return mask


def describe_corrections(image: np.ndarray, labels: np.ndarray, valid: np.ndarray, region) -> dict:
    """A JSON-able summary of what the pathologist corrected, for the model card."""
    inside = np.where(valid, labels, 0)
    objects = np.unique(inside)
    if region is None:
        reg: dict[str, Any] = {"type": "whole image"}
    elif isinstance(region, np.ndarray) and region.ndim == 2:
        ys, xs = np.nonzero(valid)
        bbox = [int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1] if ys.size else None
        reg = {"type": "mask", "pixels": int(valid.sum()), "bbox_y0_y1_x0_x1": bbox}
    else:
        reg = {"type": "box", "y0_y1_x0_x1": [int(v) for v in region]}
    return {"image_shape": [int(s) for s in image.shape], "region": reg,
            "reviewed_pixels": int(valid.sum()), "labelled_pixels": int(np.count_nonzero(inside)),
            "objects": int(np.count_nonzero(objects))}


EDGES = ("boundary", "open", "ignore")


def continue_labels(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W) labels with every pixel outside `valid` given the label of its nearest pixel inside:
    what lies beyond the edge of a reviewed region is unknown, so an object cut there is taken to
    go on (as `targets.object_rim` treats image borders)."""
    from scipy import ndimage as ndi
    if valid.all() or not valid.any():
        return labels
    iy, ix = ndi.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    return labels[iy, ix]


class CorrectionSampler:
    """Random crops (crop_h, crop_w) of the corrected image that contain reviewed pixels, with random
    flips and 90-degree rotations applied to image, target and valid mask alike. The crop positions
    depend only on the seed and the region, never on the labels.

    batch(rng, n) -> x (n, C, h, w) float32, target (n, h, w) int64, valid (n, h, w) bool,
    weight (n, h, w) float32: the loss weight of each pixel (`touching_gap_weights`; all ones when
    gap_weight is 1)."""

    def __init__(self, image: np.ndarray, labels: np.ndarray, valid: np.ndarray, tile_size: int,
                 in_channels: int, num_classes: int, normalization=None, gap_weight: float = 1.0,
                 gap_radius: int = 6, card=None, edge: str = "boundary"):
        x = normalize(as_float01(to_channels(image, in_channels)), normalization or DEFAULT_NORMALIZATION)
        self.x = x                                   # (C, H, W) float32
        # An instance head (card.head) learns its own target: a separating stroke becomes boundary.
        self.target = (card_target(labels, card) if head_of(card) != "binary"
                       else labels_to_target(labels, num_classes))   # (H, W)
        if edge != "boundary" and head_of(card) != "binary" and not valid.all():
            # The edge of the reviewed part is no object border: an object it cuts goes on beyond it.
            # Its target is made as at an image border (labels continued outward); "ignore" instead
            # leaves out of the loss the pixels whose class the cut alone decides.
            open_target = card_target(continue_labels(labels, valid), card)
            if edge == "open":
                self.target = open_target
            else:
                valid = valid & (open_target == self.target)
        # Only reviewed labels may shape the loss, weights included.
        self.weight = (touching_gap_weights(np.where(valid, labels, 0), gap_radius, gap_weight)
                       if gap_weight != 1.0 else np.ones(labels.shape, np.float32))
        self.valid = valid
        h, w = valid.shape
        self.crop = (min(tile_size, h), min(tile_size, w))
        self.valid_idx = np.flatnonzero(valid)

    def _window(self, rng: np.random.Generator) -> tuple[int, int]:
        h, w = self.valid.shape
        ch, cw = self.crop
        y, x = np.unravel_index(self.valid_idx[rng.integers(self.valid_idx.size)], (h, w))
        # a window containing that reviewed pixel, uniformly among such windows inside the image
        y0 = rng.integers(max(0, y - ch + 1), min(y, h - ch) + 1)
        x0 = rng.integers(max(0, x - cw + 1), min(x, w - cw) + 1)
        return int(y0), int(x0)

    def batch(self, rng: np.random.Generator, n: int):
        crops = []
        ch, cw = self.crop
        for _ in range(n):
            y0, x0 = self._window(rng)
            sl = (slice(y0, y0 + ch), slice(x0, x0 + cw))
            arrays = (self.x[(slice(None),) + sl], self.target[sl], self.valid[sl], self.weight[sl])
            # Non-square crops are not rotated: they would change shape within a batch.
            crops.append([np.ascontiguousarray(a) for a in
                          flip_rot90(rng, arrays, ((1, 2), (0, 1), (0, 1), (0, 1)), rot90=ch == cw)])
        return tuple(torch.from_numpy(np.stack(parts)) for parts in zip(*crops))


class ReplaySampler:
    """Crops of the model's own training data (Sample objects or (image, mask) pairs), all pixels
    valid, cut at the same crop size as the corrections so both stack into one batch."""

    def __init__(self, samples, crop: tuple[int, int], in_channels: int, num_classes: int,
                 normalization=None, gap_weight: float = 1.0, gap_radius: int = 6, card=None):
        self.items = []
        for s in samples:
            image, mask = (s.image, s.mask) if hasattr(s, "image") else s
            h, w = mask.shape
            if h < crop[0] or w < crop[1]:
                continue
            self.items.append(CorrectionSampler(image, mask, np.ones((h, w), bool), max(crop),
                                                in_channels, num_classes, normalization, gap_weight,
                                                gap_radius, card))
            self.items[-1].crop = crop
        if not self.items:
            raise ValueError(f"no replay image is at least {crop} pixels")

    def batch(self, rng: np.random.Generator, n: int):
        picks = [self.items[rng.integers(len(self.items))].batch(rng, 1) for _ in range(n)]
        return tuple(torch.cat(parts) for parts in zip(*picks))


def replay_from_card(card, data_root, max_images: int = 4, seed: int = 0) -> list:
    """Up to max_images training images of the checkpoint, by the names its card lists in
    data_split["train"], loaded from data_root (a folder with images/ and masks/)."""
    from .data import list_pairs, load_samples
    names = list((card.data_split or {}).get("train", []))
    available = set(list_pairs(data_root))
    names = [n for n in names if n in available]
    if not names:
        raise ValueError(f"none of the card's training images are under {data_root}")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(names, size=min(max_images, len(names)), replace=False).tolist())
    return load_samples(data_root, pick)


REPLAY_CROPS_DIR = Path(__file__).parent / "replay_crops"


def bundled_replay(card) -> list[tuple[np.ndarray, np.ndarray]]:
    """The shipped crops (src_models/replay_crops/, `scripts/make_replay_crops.py`) of this card's
    own training images: those of its task whose image name its data_split["train"] lists. A model
    trained on other data gets none (replaying someone else's data would check the wrong thing)."""
    from .data import read_image
    task = getattr(card, "task", None)
    train = set((getattr(card, "data_split", None) or {}).get("train", []))
    out = []
    for path in sorted(REPLAY_CROPS_DIR.glob(f"{task}__*.png")):
        name = path.stem.split("__", 1)[1]
        if name.endswith("_mask") or name not in train:
            continue
        mask_path = path.with_name(f"{path.stem}_mask.png")
        if mask_path.exists():
            out.append((read_image(path)[..., :3], read_image(mask_path).astype(np.int32)))
    return out


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# --------------------------------------------------------------------------- the round
def finetune(model: nn.Module, image: np.ndarray, labels: np.ndarray, region=None, steps: int | None = None,
             lr: float = 3e-4, train: str | None = None, tile_size: int | None = None, card=None,
             replay="auto", progress: Callable[[int, int, float], None] | None = None,
             cancel: Callable[[], bool] | None = None, seed: int = 0, batch_size: int = 2,
             replay_per_batch: int | None = REPLAY_PER_BATCH, weight_decay: float = 1e-4,
             max_seconds: float | None = None, gap_weight: float | None = None,
             warmup_steps: int = 0, check_fraction: float = 0.25,
             replay_tolerance: float = REPLAY_TOLERANCE, dice_margin: float = DICE_MARGIN,
             rechoose_postprocessing: bool = True, settings_alone: bool | None = None,
             anchor: float = 0.0, crossing: str = "split", edge: str = "boundary",
             outside_check: bool = True, channels_last: bool = True,
             earlier_step: int | None = None, average_from: int | None = None,
             device: str = "cpu") -> FinetuneResult:
    """One safe round: train a copy of `model` on corrected labels of one image, check it on the part
    of the corrections it did not train on (and on the model's training data), keep it only if it
    is at least as good there.

    image: (H, W, 3) uint8 / float (or (H, W) gray); labels: (H, W) corrected instance ids
    (0 = background; class ids for multi-class models); region: None (all of the image), an (H, W)
    boolean mask or a (y0, y1, x0, x1) box: only labels there count (the loss ignores other pixels).
    steps: training steps; None (default): `DEFAULT_STEPS` (30) when the trained-on part holds
    fewer than `DECODER_ONLY_BELOW` corrected objects, else `DEFAULT_STEPS_MANY` (45).
    train: "all" or "decoder" (encoder frozen, see `encoder_prefixes`); None (default): "decoder"
    when the trained-on part holds fewer than `DECODER_ONLY_BELOW` corrected objects (an instance
    task) and the architecture's encoder is known, else "all". tile_size: crop side, by
    default the card's tile size up to DEFAULT_CROP (224). card: the model's ModelCard (normalisation,
    tile size, post-processing). replay: training samples of the model ((image, mask) pairs or
    data.Sample) of which `replay_per_batch` crops join every batch (default 1; None:
    `REPLAY_PER_BATCH_FEW` on fewer than `DECODER_ONLY_BELOW` corrected objects, else
    `REPLAY_PER_BATCH_MANY`), and fixed crops of which check
    the round; "auto" (default): the crops of the card's training images that ship with the package
    (`bundled_replay`); None: none. progress(step, steps, loss) after every step; cancel() is
    checked before every step and ends the round with the old model kept; max_seconds stops training once that much time has
    passed (a predictable round in the GUI; the check still runs).
    gap_weight: loss weight on background gaps between touching objects (`touching_gap_weights`),
    by default what the checkpoint was trained with (its card), else 1 (off).
    warmup_steps: the learning rate rises linearly over these first steps.
    channels_last: train in the NHWC memory layout (default; the returned weights are contiguous
    either way): a GlaS round 17.3 against 18.9 CPU s alternating in one run, and every round's
    decision the same over the GlaS and MoNuSeg validation images (finetune_glands_s9_channels_last.md,
    finetune_nuclei_s9_channels_last.md).
    earlier_step: when set (0 < earlier_step < steps), the weights after that many steps are kept
    aside, and if the check rolls the final weights back they face the same check (against the
    same previous model) and are kept if they pass it: a second candidate for a round that
    overshot. None (default): off. Not the default: a second candidate faces the same few held-back
    glands, and GlaS train_34's 15-step weights passed them (object F1 1.000 -> 1.000) and lost
    0.255 on the unseen half (benchmarks/results/finetune_glands_s10_earlier15.md, _s10.md).
    average_from: when set (0 <= average_from < steps), the round's weights are the mean of the
    trained weights after every step from that step on (stochastic weight averaging over the end
    of the round's path) instead of the last step's. None (default): off. Not the default: over
    the GlaS validation images average_from=20 gave the defaults' mean (+0.0178) at 19.0 against
    18.0 CPU s, and average_from=10 kept train_34 at -0.255 (finetune_glands_s10.md).
    anchor: strength of an L2 pull of every trained weight towards its value before the round
    ("L2-SP": the gradient of anchor/2 * ||w - w_start||^2 joins the loss's), so a round cannot
    move far from the model it starts from; 0 (default) is off.
    crossing: what becomes of a corrected object that the cut between the held-back and the
    trained-on part crosses: "split" (default) its pixels on each side count for that side;
    "move" it goes to one side whole (the side with most of its reviewed pixels); "untrained" it is
    trained on nowhere, and the check keeps its held-back pixels. With "move" or "untrained" no
    held-back object is ever partly trained on.

    The check: about `check_fraction` of the reviewed region (its far end along the longer side, cut
    between objects, grown up to 40% until it holds two objects; `finetune_check.split_check`) is
    held back and never trained on. After training the post-processing is re-chosen on the
    trained-on corrections (`rechoose_postprocessing`), and old (card settings) and new (re-chosen
    settings) are scored on the held-back part and on replay crops; the new weights are kept only
    if every signal holds (`finetune_check.judge_round`): on the held-back part the object score
    does not drop, the pixel Dice drops by at most `dice_margin` and the number of objects found
    moves no farther from the number corrected; on the replay crops the pixel Dice drops by at most
    `replay_tolerance`; around the reviewed region the new model may not join objects the old one
    kept apart across background, nor cut one it had whole (`finetune_check.judge_outside`). A
    round whose held-back part holds fewer than two corrected objects (or
    when too few objects were corrected to hold any back: the scores are then of the trained-on
    corrections, and say so) is rolled back: such a check cannot see what the round did; so is a
    round on whose held-back objects neither model finds a single one. When the new weights are
    rolled back and `settings_alone` is on, the previous weights with settings re-chosen on the
    trained-on corrections face the same check, and must score strictly better on the held-back
    part (a tie is no evidence for a change); if they do, only the settings are kept
    (`FinetuneResult.weights_kept` False). None (default): on for a round on at least
    `DECODER_ONLY_BELOW` corrected objects, off below. Over the validation images
    (`benchmarks/bench_finetune.py`, one run per task) it raised the mean unseen-half AJI on
    MoNuSeg from +0.026 to +0.031 (three rolled-back rounds kept settings; none worse); on a few
    glands a setting (one global value for the whole image) confirmed by one more of 2-3
    held-back glands is no evidence: GlaS train_5 kept marker_threshold 0.6 -> 0.5 on 0.857 ->
    1.000 there and lost 0.190 on the unseen half, and on a training image (train_41) a setting
    that rose 0.500 -> 0.667 on its held-back gland lost 0.242 (finetune_glands_s9.md,
    finetune_check_rules_s9.md); it costs one more prediction of the reviewed region.
    Raises ValueError, before any training, if the reviewed region holds no labelled pixel."""
    if train not in (None, "all", "decoder"):
        raise ValueError(f"train must be 'all' or 'decoder', got {train!r}")
    image, labels = np.asarray(image), np.asarray(labels)
    if labels.ndim != 2 or image.shape[:2] != labels.shape:
        raise ValueError(f"labels {labels.shape} must be (H, W) and match the image {image.shape}")
    valid = region_mask(region, labels.shape)
    if not valid.any():
        raise ValueError("the reviewed region is empty: select the area whose labels you corrected")
    if not np.any(labels[valid] > 0):
        raise ValueError("the corrections contain no labelled object in the reviewed region: label at "
                         "least one object (fine-tuning on background alone would teach the model "
                         "to predict nothing)")
    head = head_of(card)
    channels = int((getattr(model, "config", None) or {}).get("num_classes", 1))
    if head not in HEADS or (head != "binary" and channels != head_channels(head)):
        # An instance head learns targets.card_target of the corrections (see CorrectionSampler);
        # a card whose head does not fit the model would teach it the wrong thing.
        raise ValueError(f"cannot fine-tune: the card's head {head!r} does not fit this model "
                         f"({channels} output channel(s); heads: {HEADS})")
    corrections = describe_corrections(image, labels, valid, region)
    check = split_check(valid, labels, check_fraction)
    if edge not in EDGES:
        raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
    if crossing not in ("split", "move", "untrained"):
        raise ValueError(f"crossing must be 'split', 'move' or 'untrained', got {crossing!r}")
    if crossing == "move":
        check = whole_objects_check(valid, labels, check)
    train_valid = valid & ~check
    if crossing == "untrained" and check.any():
        kept_out = train_valid & ~crossing_objects(valid, labels, check)
        if np.any(labels[kept_out] > 0):   # never leave nothing to train on
            train_valid = kept_out
    from .instances import InstanceParams
    objects = InstanceParams.from_card(card).mode != "semantic"   # else labels are class ids
    few = objects and np.unique(labels[train_valid & (labels > 0)]).size < DECODER_ONLY_BELOW
    if train is None:
        train = "decoder" if few and _encoder_known(model) else "all"
    if replay_per_batch is None:
        replay_per_batch = REPLAY_PER_BATCH_FEW if few else REPLAY_PER_BATCH_MANY
    if settings_alone is None:
        settings_alone = not few
    if steps is None:
        steps = DEFAULT_STEPS if few else DEFAULT_STEPS_MANY

    t0 = time.perf_counter()
    cfg = getattr(model, "config", {})
    in_channels, num_classes = int(cfg.get("in_channels", 3)), int(cfg.get("num_classes", 1))
    normalization = getattr(card, "normalization", None) or DEFAULT_NORMALIZATION
    tile = int(tile_size or min(int(getattr(card, "tile_size", None) or DEFAULT_CROP), DEFAULT_CROP))
    trained = getattr(card, "training", None) or {}
    gap = float(trained.get("gap_weight", 1.0) if gap_weight is None else gap_weight)
    gap_radius = int(trained.get("gap_radius", 6))
    # Labels outside the trained-on part are zeroed before any target or weight is made from them.
    sampler = CorrectionSampler(image, np.where(train_valid, labels, 0), train_valid, tile, in_channels,
                                num_classes, normalization, gap, gap_radius, card, edge)
    if isinstance(replay, str):
        if replay != "auto":
            raise ValueError(f"replay must be 'auto', None or a list of samples, got {replay!r}")
        replay = bundled_replay(card) if card is not None else []
    replay = [(s.image, s.mask) if hasattr(s, "image") else tuple(s) for s in (replay or [])]
    fits = [s for s in replay if s[1].shape[0] >= sampler.crop[0] and s[1].shape[1] >= sampler.crop[1]]
    replayer = (ReplaySampler(fits, sampler.crop, in_channels, num_classes, normalization, gap,
                              gap_radius, card) if fits else None)

    new = copy.deepcopy(model)
    if channels_last:
        # NHWC activations: oneDNN's convolutions run faster that way on a CPU (a training step of the
        # glands model ~0.9x the CPU time, benchmarks/results/finetune_speed.md); the weights go back
        # to the usual layout after training (checkpoints are written from contiguous tensors)
        new = new.to(memory_format=torch.channels_last)
    dev = next(new.parameters()).device
    prefixes = encoder_prefixes(new) if train == "decoder" else ()
    params = []
    for name, p in new.named_parameters():
        p.requires_grad_(not is_encoder_param(name, prefixes))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start = [p.detach().clone() for p in params] if anchor > 0 else []
    warm = max(0, int(warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (warm + 1)))
    new.train()
    _freeze_batchnorm(new)

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    history: list[float] = []
    stopped = "steps"
    snapshot = None     # the weights after `earlier_step` steps (a second candidate)
    averaged: list[torch.Tensor] | None = None   # running mean of params (average_from)
    n_averaged = 0
    for step in range(steps):
        if cancel is not None and cancel():
            stopped = "cancelled"
            break
        if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
            stopped = "time budget"
            break
        parts = sampler.batch(rng, batch_size)
        if replayer is not None and replay_per_batch > 0:
            parts = [torch.cat(pair) for pair in zip(parts, replayer.batch(rng, replay_per_batch))]
        x, t, v, w = (a.to(dev) for a in parts)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = dice_ce_loss(new(x), t, v, pixel_weight=w)
        value = float(loss.detach())
        if not math.isfinite(value):
            stopped = "non-finite loss"  # keep the weights of the last finished step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, p0 in zip(params, start):   # L2-SP: pull towards the starting weights
            if p.grad is not None:
                p.grad.add_(p.detach() - p0, alpha=anchor)
        opt.step()
        sched.step()
        history.append(value)
        if average_from is not None and len(history) > average_from:
            n_averaged += 1
            if averaged is None:
                averaged = [p.detach().clone() for p in params]
            else:
                for a, p in zip(averaged, params):
                    a.add_(p.detach() - a, alpha=1.0 / n_averaged)
        if earlier_step is not None and len(history) == earlier_step and earlier_step < steps:
            snapshot = {k: v.detach().clone() for k, v in new.state_dict().items()}
        if progress is not None:
            progress(step + 1, steps, value)
    if averaged is not None:
        with torch.no_grad():
            for a, p in zip(averaged, params):
                p.copy_(a)
    for p in new.parameters():
        p.requires_grad_(True)
    if channels_last:
        new = new.to(memory_format=torch.contiguous_format)
    new.eval()
    steps_done = len(history)
    train_seconds = time.perf_counter() - t0
    corrections.update({"steps": steps_done, "lr": lr, "train": train, "tile_size": tile,
                        "batch_size": batch_size, "replay_per_batch": replay_per_batch, "seed": seed, "gap_weight": gap,
                        "warmup_steps": warm, "anchor": anchor,
                        "crossing": crossing, "edge": edge, "channels_last": channels_last,
                        "earlier_step": earlier_step, "average_from": average_from,
                        "averaged_steps": n_averaged,
                        "replay_images": len(replayer.items) if replayer is not None else 0,
                        "final_loss": history[-1] if history else None, "stopped": stopped,
                        "held_back_pixels": int(check.sum())})
    result = FinetuneResult(model=new, loss_history=history, steps_done=steps_done,
                            steps_requested=steps, cancelled=stopped == "cancelled",
                            corrections=corrections, stopped=stopped, trained=new)
    if stopped == "cancelled" or steps_done == 0:
        why = "cancelled" if stopped == "cancelled" else f"no training step finished ({stopped})"
        _decide(result, model, False, f"{why}, nothing was checked")
    else:
        cache: dict = {}
        _check_round(result, model, new, image, labels, train_valid, check, card, replay,
                     tile, replay_tolerance, rechoose_postprocessing, device, dice_margin,
                     settings_alone, outside=few and outside_check, cache=cache)
        if not result.kept and snapshot is not None and steps_done > earlier_step:
            mid = copy.deepcopy(model)
            mid.load_state_dict(snapshot)
            mid.eval()
            second = FinetuneResult(model=mid, loss_history=history[:earlier_step],
                                    steps_done=earlier_step, steps_requested=steps, cancelled=False,
                                    corrections=dict(corrections), stopped=stopped, trained=mid)
            _check_round(second, model, mid, image, labels, train_valid, check, card, replay,
                         tile, replay_tolerance, rechoose_postprocessing, device, dice_margin,
                         False, outside=few and outside_check, cache=cache)
            final = {k: corrections.get(k) for k in ("check", "replay_check", "outside_check",
                                                     "instance_params", "kept", "reason")}
            earlier = {"steps": earlier_step, "kept": second.kept, "reason": second.reason}
            if second.kept and second.weights_kept:
                corrections.clear()
                corrections.update(second.corrections)
                corrections.update({"steps": earlier_step, "final_steps_check": final,
                                    "earlier_check": earlier})
                result.model = result.trained = mid
                for f in ("check_before", "check_after", "replay_before", "replay_after",
                          "check_source", "instance_params", "kept", "weights_kept"):
                    setattr(result, f, getattr(second, f))
                result.steps_done = earlier_step
                _decide(result, model, True, f"the weights after {earlier_step} of {steps_done} "
                        f"steps were {second.reason} (after {steps_done} steps: {final['reason']})")
            else:
                corrections["earlier_check"] = earlier
    corrections["check_seconds"] = round(time.perf_counter() - t0 - train_seconds, 2)
    result.seconds = time.perf_counter() - t0
    return result


def _decide(result: FinetuneResult, old: nn.Module, kept: bool, reason: str) -> None:
    result.kept, result.reason = kept, reason
    result.weights_kept = kept and result.weights_kept
    result.model = result.trained if result.weights_kept else old
    result.corrections.update({"kept": kept, "reason": reason})
    result.summary = _summary(result)


def _summary(r: FinetuneResult) -> str:
    """The user's view of the round: held-back objects matched before -> after, and the decision,
    e.g. "Objects matching your held-back corrections: 12 of 20 before, 18 of 20 after. Kept the
    fine-tuned model: at least as good on your held-back corrections (AJI 0.512 -> 0.561)." """
    text = ""
    if r.check_before is not None and r.check_after is not None:
        which = "your held-back corrections" if r.check_source == "held back" else "your corrections"
        text = (f"Objects matching {which}: {r.check_before.matched} of {r.check_before.objects} "
                f"before, {r.check_after.matched} of {r.check_after.objects} after. ")
    if r.kept and not r.weights_kept:
        return text + r.reason[0].upper() + r.reason[1:] + "."
    return text + ("Kept the fine-tuned model: " if r.kept else "Kept the previous model: ") + r.reason + "."


def _cached(cache: dict | None, key: str, compute: Callable[[], Any]) -> Any:
    """cache[key], computed once; without a cache, computed every time."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _check_round(result: FinetuneResult, old: nn.Module, new: nn.Module, image, labels, train_valid,
                 check, card, replay, tile: int, tolerance: float, rechoose: bool, device,
                 dice_margin: float = DICE_MARGIN,
                 settings_alone: bool = True, outside: bool = False,
                 cache: dict | None = None) -> None:
    """Scores old and new weights, re-chooses the post-processing, and decides (`judge_round`).
    With `outside`, both models are also run on the image around the reviewed region
    (`outside_part`) and their objects there compared (`object_changes`, no labels needed).
    Both models are predicted and labelled over the reviewed region's box (`check_box`): the
    re-choice needs the trained-on part, the check the held-back one."""
    from .instances import InstanceParams
    old_params = InstanceParams.from_card(card)
    count_min = max(1, int(old_params.min_size))    # smaller corrected fragments are not counted
    held = bool(check.any())
    part = check if held else train_valid
    result.check_source = "held back" if held else "trained on"
    rechoose = rechoose and old_params.mode != "semantic"
    settings_alone = settings_alone and rechoose
    reviewed = train_valid | check
    snap = outside_snap(card)
    around = outside_part(reviewed, OUTSIDE_MARGIN, snap) if outside else None
    # Every object the check scores is labelled over one box, the reviewed region's grown by
    # CONTEXT (`check_box`), with the outside check or without it: the held-back part's objects as
    # the re-choice's, whole where they cross into the trained-on part. Only where the
    # probabilities come from differs: with the outside check, one window per model around the
    # reviewed region (the whole GlaS image), else that box alone (cheaper on a slide); `predict`
    # reads a margin of context around either, so they differ only where tiles blend differently.
    box = check_box(reviewed)
    if around is not None and around.any():
        # One prediction per model over the reviewed region and its neighbourhood (the whole image
        # when that covers it: `predict` then tiles exactly as when the user segments the image):
        # the held-back check, the re-choice and the comparison outside all use it.
        new_window, window = region_probabilities(new, image, card, reviewed, device,
                                                  OUTSIDE_MARGIN, snap)
        # A second candidate (earlier_step) faces the same old model: its outputs come from `cache`.
        old_window = _cached(cache, "old_window", lambda: region_probabilities(
            old, image, card, reviewed, device, OUTSIDE_MARGIN, snap)[0])
        new_prob = crop_probabilities(new_window, window, box)
        old_prob = crop_probabilities(old_window, window, box)
    else:
        around = None
        new_prob, _ = region_probabilities(new, image, card, reviewed, device)
        old_prob = _cached(cache, "old_prob",
                           lambda: region_probabilities(old, image, card, reviewed, device)[0])
    new_params = old_params
    if rechoose:
        new_params, _ = choose_postprocessing(new_prob, box, labels, train_valid, card, old_params,
                                              count_min)
    result.instance_params = {k: v for k, v in asdict(new_params).items() if v is not None}
    result.check_before = score_region(old_prob, box, labels, part, card, old_params, count_min)
    result.check_after = score_region(new_prob, box, labels, part, card, new_params, count_min)
    crops = replay_crops(replay, tile) if replay else []
    old_replay = _cached(cache, "old_replay",
                         lambda: [predict(old, im, card, device=device) for im, _ in crops])
    result.replay_before = score_replay(old, crops, card, old_params, count_min, device, old_replay)
    result.replay_after = score_replay(new, crops, card, new_params, count_min, device)
    result.corrections.update({
        "check": {"source": result.check_source, "before": result.check_before.to_dict(),
                  "after": result.check_after.to_dict(),
                  "objects_either_model_found": informative_objects(result.check_before,
                                                                     result.check_after)},
        "replay_check": (None if result.replay_before is None else
                         {"crops": len(crops), "before": result.replay_before.to_dict(),
                          "after": result.replay_after.to_dict()}),
        "instance_params": result.instance_params})
    changes = None
    result.corrections["outside_check"] = None    # not checked (nothing around, or many objects)
    if around is not None:
        # each model with its own settings, as the user would see them; objects are labelled over
        # the whole window, so one crossing into the reviewed part keeps its shape
        old_labels_around = labels_in(old_window, card, old_params)
        changes = object_changes(old_labels_around, labels_in(new_window, card, new_params),
                                 around[window], count_min)
        result.corrections["outside_check"] = {"pixels": int(around.sum()), **changes.to_dict()}
    kept, reason = judge_round(result.check_before, result.check_after, result.replay_before,
                               result.replay_after, held, dice_margin, tolerance, outside=changes)
    old_tuned = old_params
    if not kept and settings_alone:  # the fallback's settings: only needed once the weights lost
        old_tuned, _ = choose_postprocessing(old_prob, box, labels, train_valid, card, old_params,
                                             count_min)
    if not kept and old_tuned != old_params:
        # The new weights lost; the old ones with settings re-chosen on the trained-on corrections
        # face the same check (held-back part, replay crops) against the old ones as they were.
        tuned_check = score_region(old_prob, box, labels, part, card, old_tuned, count_min)
        tuned_replay = score_replay(old, crops, card, old_tuned, count_min, device, old_replay)
        tuned_changes = (None if around is None else   # the new settings outside, likewise
                         object_changes(old_labels_around, labels_in(old_window, card, old_tuned),
                                        around[window], count_min))
        ok, why = judge_round(result.check_before, tuned_check, result.replay_before, tuned_replay,
                              held, dice_margin, tolerance, outside=tuned_changes)
        if ok and not tuned_check.score > result.check_before.score:
            # Settings chosen on a few objects that merely tie on the check are noise, not evidence
            # (GlaS train_34: threshold 0.6 -> 0.7 on five glands, 1.000 -> 1.000 on the held-back
            # two, 0.889 -> 0.800 on the unseen half; benchmarks/results/finetune_diagnosis_train18.md).
            ok, why = False, (f"not kept, the re-chosen post-processing scored no better on "
                              f"{'the held-back part of ' if held else ''}your corrections "
                              f"({score_text(result.check_before, tuned_check)})")
        result.corrections["settings_check"] = {
            "instance_params": {k: v for k, v in asdict(old_tuned).items() if v is not None},
            "after": tuned_check.to_dict(), "kept": ok, "reason": why,
            "replay_after": None if tuned_replay is None else tuned_replay.to_dict()}
        if ok:
            _keep_settings(result, old, old_tuned, old_params, tuned_check, reason)
            return
    _decide(result, old, kept, reason)


def _keep_settings(result: FinetuneResult, old: nn.Module, tuned, start, check: RegionScore,
                   weights_reason: str) -> None:
    """The round's outcome when only the re-chosen post-processing passed the check: the previous
    weights stay, with `tuned` settings (the card records them with the round)."""
    moved = ", ".join(f"{k} {getattr(start, k)} -> {getattr(tuned, k)}" for k in asdict(start)
                      if getattr(start, k) != getattr(tuned, k))
    result.instance_params = {k: v for k, v in asdict(tuned).items() if v is not None}
    result.check_after = check
    reason = (f"kept the previous weights with post-processing re-chosen on your corrections ({moved}): "
              f"at least as good on your held-back corrections ({score_text(result.check_before, check)}); "
              f"the fine-tuned weights were {weights_reason}")
    result.weights_kept = False
    result.corrections["weights_kept"] = False
    _decide(result, old, True, reason)
