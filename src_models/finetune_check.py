"""The checks that make a fine-tuning round safe: a held-back part of the pathologist's corrections,
fixed crops of the model's own training data, and the post-processing re-chosen after a round.

`finetune.finetune` trains on the reviewed region minus a held-back check part (`split_check`), then
scores the old and the new weights on that check part (`score_region`) and on replay crops
(`score_replay`), and keeps the new weights only if they are at least as good on both. Scores are
the task's object scores (glands: GlaS object F1; nuclei: AJI; other tasks: pixel Dice) and, for
the user, how many of their corrected objects a prediction matches (IoU > 0.5, one-to-one).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np

from . import metrics as M
from .inference import predict
from .instances import InstanceMaker, InstanceParams, remove_small


# --------------------------------------------------------------------------- the check part
def split_check(valid: np.ndarray, labels: np.ndarray, fraction: float = 0.25,
                min_objects: int = 1) -> np.ndarray:
    """The held-back part of the reviewed region: (H, W) bool, a subset of `valid`, or all False
    when it cannot hold back `min_objects` objects while leaving one to train on.

    It is the far end of the reviewed region along its longer side, about `fraction` of its area,
    cut where the fewest labelled pixels cross (between objects rather than through them); when
    that strip would hold no object (or all of them), whole objects from that end with a margin
    around them (`hold_back_objects`). It depends only on the region and the labels, so a round is
    reproducible."""
    valid = np.asarray(valid, bool)
    none = np.zeros(valid.shape, bool)
    if fraction <= 0 or not valid.any():
        return none
    ys, xs = np.nonzero(valid)
    axis = 0 if (ys.max() - ys.min()) >= (xs.max() - xs.min()) else 1
    inside = np.where(valid, labels, 0)
    # per line across the long axis: reviewed pixels, and labelled pixels on it
    area = valid.sum(axis=1 - axis).astype(np.float64)
    on_line = (inside > 0).sum(axis=1 - axis).astype(np.float64)
    beyond = np.cumsum(area[::-1])[::-1] / area.sum()     # share of the area from line i on
    candidates = np.flatnonzero((beyond >= 0.6 * fraction) & (beyond <= 1.4 * fraction))
    if candidates.size == 0:
        candidates = np.array([int(np.argmin(np.abs(beyond - fraction)))])
    # fewest labelled pixels on the cut; among equals, the share closest to `fraction`
    order = np.lexsort((np.abs(beyond[candidates] - fraction), on_line[candidates]))
    cut = int(candidates[order[0]])
    check = none.copy()
    if axis == 0:
        check[cut:] = valid[cut:]
    else:
        check[:, cut:] = valid[:, cut:]
    n_check = np.count_nonzero(np.unique(np.where(check, labels, 0)))
    n_train = np.count_nonzero(np.unique(np.where(valid & ~check, labels, 0)))
    if n_check < min_objects or n_train < 1:
        return hold_back_objects(valid, labels, fraction, axis)
    return check


def hold_back_objects(valid: np.ndarray, labels: np.ndarray, fraction: float, axis: int,
                      margin: int = 8) -> np.ndarray:
    """When a strip cannot be cut (e.g. no object lies at the far end): the object farthest along
    `axis` (by centre), and the next ones while they stay within `fraction` of the labelled area,
    never all of them, with `margin`
    pixels of reviewed background around them; the other objects' pixels stay for training.
    All False with fewer than two objects."""
    from scipy import ndimage as ndi
    inside = np.where(valid, labels, 0)
    ids = np.unique(inside)
    ids = ids[ids > 0]
    if ids.size < 2:
        return np.zeros(valid.shape, bool)
    centres = np.array([c[axis] for c in ndi.center_of_mass(np.ones(inside.shape), inside, ids)])
    areas = ndi.sum_labels(np.ones(inside.shape), inside, ids)
    order = np.argsort(-centres, kind="stable")[:-1]  # farthest first; one always stays for training
    chosen, held_area = [ids[order[0]]], areas[order[0]]
    for k in order[1:]:
        if held_area + areas[k] > fraction * areas.sum():
            break
        chosen.append(ids[k])
        held_area += areas[k]
    held = np.isin(inside, chosen)
    around = ndi.maximum_filter(held, size=2 * margin + 1)
    return around & valid & ~((inside > 0) & ~held)


# --------------------------------------------------------------------------- scores
@dataclass
class RegionScore:
    """One model's result on a set of corrected objects: `matched` of `objects` corrected objects
    have a predicted object with IoU > 0.5; `score` is the task's object score (higher is better);
    `dice` the pixel Dice of foreground."""
    matched: int
    objects: int
    score: float
    metric: str
    dice: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_metric(task: str) -> str:
    return {"glands": "object_f1", "nuclei": "aji"}.get(task, "dice")


def compare_labels(gt: np.ndarray, pred: np.ndarray, task: str, min_size: int = 1) -> RegionScore:
    """Scores `pred` against the corrected `gt` (both already cut to the part that counts). Corrected
    objects smaller than `min_size` pixels there (slivers at the region's edge) are not counted."""
    gt = remove_small(M.relabel_sequential(gt)[0], min_size)
    pred = M.relabel_sequential(pred)[0]
    metric = task_metric(task)
    if metric == "object_f1":
        score = M.object_f1(gt, pred).f1
    elif metric == "aji":
        score = M.aji(gt, pred)
    else:
        score = M.dice(gt, pred)
    pq = M.panoptic_quality(gt, pred)
    return RegionScore(matched=pq.tp, objects=int(gt.max()), score=float(score), metric=metric,
                       dice=float(M.dice(gt > 0, pred > 0)))


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def region_probabilities(model, image: np.ndarray, card, mask: np.ndarray,
                         device="cpu") -> tuple[np.ndarray, tuple[slice, slice]]:
    """The model's probabilities over the bounding box of `mask` (with the tile context `predict`
    reads around a region), and that box as slices."""
    y0, y1, x0, x1 = bbox(mask)
    prob = predict(model, image, card, device=device, region=(y0, y1, x0, x1))
    return prob, (slice(y0, y1), slice(x0, x1))


def labels_in(prob: np.ndarray, card, params: InstanceParams) -> np.ndarray:
    return InstanceMaker(prob, card).labels(**asdict(params))


def score_region(prob: np.ndarray, box: tuple[slice, slice], labels: np.ndarray, part: np.ndarray,
                 card, params: InstanceParams, min_size: int) -> RegionScore:
    """Scores the instances that `params` makes of `prob` (over `box`) on the pixels of `part`."""
    pred = labels_in(prob, card, params)
    keep = part[box]
    return compare_labels(np.where(keep, labels[box], 0), np.where(keep, pred, 0),
                          params.mode, min_size)


# --------------------------------------------------------------------------- replay crops
def replay_crops(samples: Sequence, size: int, count: int = 2, seed: int = 0) -> list[tuple]:
    """Fixed (image, mask) crops of up to `count` training samples for checking a round: one
    `size`-pixel crop each (the whole sample when smaller), at a position drawn from `seed`."""
    rng = np.random.default_rng(seed + 7919)
    out = []
    for s in list(samples)[:count]:
        image, mask = (s.image, s.mask) if hasattr(s, "image") else s
        h, w = mask.shape
        ch, cw = min(size, h), min(size, w)
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append((image[y0:y0 + ch, x0:x0 + cw], mask[y0:y0 + ch, x0:x0 + cw]))
    return out


def score_replay(model, crops: Sequence[tuple], card, params: InstanceParams, min_size: int,
                 device="cpu") -> RegionScore | None:
    """The model on the replay crops: matched/objects summed, scores averaged. None without crops."""
    if not crops:
        return None
    scores = []
    for image, mask in crops:
        prob = predict(model, image, card, device=device)
        scores.append(compare_labels(mask, labels_in(prob, card, params), params.mode, min_size))
    return RegionScore(matched=sum(s.matched for s in scores), objects=sum(s.objects for s in scores),
                       score=float(np.mean([s.score for s in scores])), metric=scores[0].metric,
                       dice=float(np.mean([s.dice for s in scores])))


# --------------------------------------------------------------------------- post-processing
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def choose_postprocessing(prob: np.ndarray, box: tuple[slice, slice], labels: np.ndarray,
                          part: np.ndarray, card, start: InstanceParams, min_size: int,
                          thresholds: Sequence[float] = THRESHOLDS) -> tuple[InstanceParams, float]:
    """Instance settings for `prob` chosen on the corrected pixels of `part`: the threshold, then the
    minimum size (x0.5, x1, x2), then for splitting tasks the seed distance (-1, 0, +1), one at a
    time. A setting moves from `start` only if it scores strictly better, so noise does not move it.
    Returns (settings, their score)."""
    if start.mode == "semantic":
        return start, float("nan")
    maker = InstanceMaker(prob, card)
    keep = part[box]
    gt = np.where(keep, labels[box], 0)

    def score(p: InstanceParams) -> float:
        pred = np.where(keep, maker.labels(**asdict(p)), 0)
        return compare_labels(gt, pred, p.mode, min_size).score

    best, best_score = start, score(start)
    sweeps = [("threshold", [t for t in thresholds if t != start.threshold]),
              ("min_size", sorted({max(1, int(start.min_size * f)) for f in (0.5, 2.0)} - {start.min_size}))]
    if start.splits:
        near = (start.min_distance - 1, start.min_distance + 1)
        sweeps.append(("min_distance", [d for d in near if d >= 1]))
    for name, values in sweeps:
        for v in values:
            p = replace(best, **{name: v})
            s = score(p)
            if s > best_score:
                best, best_score = p, s
    return best, best_score
