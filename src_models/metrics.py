"""Segmentation scores for H&E: the paper's pixel Dice / IoU, the GlaS challenge's object scores for
glands, and AJI / panoptic quality for nuclei.

Every object score starts from one contingency table: `overlap[i, j]` = number of pixels with ground
truth label i and predicted label j (row / column 0 = background), built with one `np.bincount` over
the flattened label pairs; no loop ever visits pixels.

Conventions for empty inputs (documented per function): when both ground truth and prediction are
empty, similarity scores are 1 and distances 0 (nothing to find, nothing found); when exactly one is
empty, similarity scores are 0 and distances are infinite.

Inputs: label images (H, W) of non-negative ints, 0 = background, one id per object (ids need not be
consecutive). Binary masks (bool or 0/1) are valid label images with a single object.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PAPER_SIZE = 224


# --------------------------------------------------------------------------- helpers
def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    if gt.ndim != 2:
        raise ValueError(f"expected (H, W) label images, got shape {gt.shape}")
    return gt, pred


def _lookup_size(labels: np.ndarray) -> int:
    """The length of an id -> index lookup table for integer `labels`, or 0 when a table would not
    be bounded by the image (negative ids, or ids far above the number of pixels): then the callers
    sort instead. A table is O(pixels) memory and time; np.unique sorts (O(pixels log pixels)),
    which was a quarter of a nuclei fine-tuning round (its check scores ~20 label images)."""
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return 0
    lo, hi = int(labels.min()), int(labels.max())
    return hi + 1 if lo >= 0 and hi < max(2 * labels.size, 1 << 16) else 0


def relabel_sequential(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W) labels with arbitrary ids -> (H, W) int64 labels 0..n (0 kept as background), n.
    The ids keep their order (the smallest object id becomes 1)."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.int64), int(labels.any())
    size = _lookup_size(labels)
    if size:
        present = np.zeros(size, bool)
        present[labels.ravel()] = True
        rank = np.cumsum(present, dtype=np.int64)     # 1-based rank of each present id
        has_background = bool(present[0])
        out = rank[labels] - (1 if has_background else 0)
        return out, int(rank[-1]) - (1 if has_background else 0)
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int64)
    if ids.size and ids[0] == 0:
        return inverse, ids.size - 1
    return inverse + 1, ids.size  # no background pixel at all: every id is an object


@dataclass
class Overlaps:
    """Sparse contingency table of two label images: one entry per (gt object, predicted object) pair
    that shares pixels. Objects are numbered 0..n-1 after relabelling (background dropped)."""
    n_gt: int
    n_pred: int
    gi: np.ndarray        # (K,) gt object index of each overlapping pair
    pj: np.ndarray        # (K,) predicted object index
    inter: np.ndarray     # (K,) shared pixels, float64
    area_gt: np.ndarray   # (n_gt,) object areas
    area_pred: np.ndarray  # (n_pred,)

    @property
    def union(self) -> np.ndarray:
        return self.area_gt[self.gi] + self.area_pred[self.pj] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union

    @property
    def dice(self) -> np.ndarray:
        return 2 * self.inter / (self.area_gt[self.gi] + self.area_pred[self.pj])


def overlaps(gt: np.ndarray, pred: np.ndarray) -> Overlaps:
    """All overlapping (gt, pred) object pairs with their shared pixel counts: the non-zero part of the
    contingency table. Memory stays O(pixels), not O(n_gt x n_pred), so noisy predictions with many
    fragments stay cheap: pairs are counted over the pixels both label as objects, with a bincount
    when the table of pair codes is no larger than the image, else with one `np.unique`."""
    gt, pred = _check_pair(gt, pred)
    g, ng = relabel_sequential(gt)
    p, npred = relabel_sequential(pred)
    area_g = np.bincount(g.ravel(), minlength=ng + 1)[1:].astype(np.float64)
    area_p = np.bincount(p.ravel(), minlength=npred + 1)[1:].astype(np.float64)
    both = (g > 0) & (p > 0)
    codes = (g[both] - 1) * npred + (p[both] - 1)
    if ng * npred <= max(g.size, 1):
        counts = np.bincount(codes, minlength=ng * npred)
        codes = np.flatnonzero(counts)
        counts = counts[codes]
    else:
        codes, counts = np.unique(codes, return_counts=True)
    gi, pj = np.divmod(codes, max(npred, 1))
    return Overlaps(ng, npred, gi, pj, counts.astype(np.float64), area_g, area_p)


def contingency(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Dense (n_gt + 1, n_pred + 1) overlap counts of relabelled gt x pred; row/column 0 = background.
    For inspection and small images; the scores use the sparse `overlaps`."""
    gt, pred = _check_pair(gt, pred)
    g, ng = relabel_sequential(gt)
    p, npred = relabel_sequential(pred)
    flat = g.ravel() * (npred + 1) + p.ravel()
    return np.bincount(flat, minlength=(ng + 1) * (npred + 1)).reshape(ng + 1, npred + 1)


def _best_per(owner: np.ndarray, value: np.ndarray, n: int) -> np.ndarray:
    """For each of n owners, the index (into the pair arrays) of its pair with the largest value, or -1
    if it has no pair. Ties go to the pair listed first."""
    best = np.full(n, -1, np.int64)
    if owner.size:
        order = np.lexsort((-value, owner))
        first = np.r_[True, owner[order][1:] != owner[order][:-1]]
        best[owner[order][first]] = order[first]
    return best


def resize_nearest(mask: np.ndarray, size: int | tuple[int, int] = PAPER_SIZE) -> np.ndarray:
    """(H, W) -> size, nearest neighbour with pixel centres aligned (source index floor((i+0.5)*H/h)).

    Labels are never blended, so a resized instance map stays an instance map."""
    mask = np.asarray(mask)
    oh, ow = (size, size) if np.isscalar(size) else size
    h, w = mask.shape[:2]
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


# --------------------------------------------------------------------------- pixel scores
def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Binary pixel Dice 2|G∩P| / (|G| + |P|) of the foregrounds (label > 0). Both empty -> 1."""
    gt, pred = _check_pair(gt, pred)
    g, p = gt > 0, pred > 0
    denom = int(g.sum()) + int(p.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.count_nonzero(g & p)) / denom


def iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """Binary pixel IoU |G∩P| / |G∪P| of the foregrounds (label > 0). Both empty -> 1."""
    gt, pred = _check_pair(gt, pred)
    g, p = gt > 0, pred > 0
    union = int(np.count_nonzero(g | p))
    return 1.0 if union == 0 else int(np.count_nonzero(g & p)) / union


def pixel_scores(gt: np.ndarray, pred: np.ndarray, protocol: str = "native",
                 size: int = PAPER_SIZE) -> dict[str, float]:
    """{"dice", "iou"} at native resolution, or with protocol="paper" after resizing both image-level
    masks to size x size with nearest neighbour (the DCA paper's evaluation)."""
    gt, pred = _check_pair(gt, pred)
    if protocol == "paper":
        gt, pred = resize_nearest(gt > 0, size), resize_nearest(pred > 0, size)
    elif protocol != "native":
        raise ValueError(f"protocol must be 'native' or 'paper', got {protocol!r}")
    return {"dice": dice(gt, pred), "iou": iou(gt, pred)}


# --------------------------------------------------------------------------- GlaS object scores
@dataclass
class ObjectF1:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        d = self.tp + self.fp
        return 1.0 if d == 0 else self.tp / d

    @property
    def recall(self) -> float:
        d = self.tp + self.fn
        return 1.0 if d == 0 else self.tp / d

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 1.0 if d == 0 else 2 * self.tp / d


def object_f1(gt: np.ndarray, pred: np.ndarray) -> ObjectF1:
    """GlaS detection score: a predicted object is a true positive if it covers more than 50% of the
    ground-truth object it overlaps most; otherwise a false positive. Unmatched ground-truth objects
    are false negatives. (>50% of a gt object can be covered by at most one prediction, so matches are
    one-to-one.) Both empty -> F1 = 1; `.f1`, `.precision`, `.recall`, `.tp/.fp/.fn`."""
    ov = overlaps(gt, pred)
    best = _best_per(ov.pj, ov.inter, ov.n_pred)
    best = best[best >= 0]
    tp = int(np.count_nonzero(ov.inter[best] / ov.area_gt[ov.gi[best]] > 0.5))
    return ObjectF1(tp, ov.n_pred - tp, ov.n_gt - tp)


def _weighted_sides(ov: Overlaps, gt_side: np.ndarray, pred_side: np.ndarray) -> float:
    """½[Σ_i γ_i x_i + Σ_j σ_j y_j] with γ, σ the objects' shares of total gt / predicted area."""
    return float(0.5 * (np.dot(ov.area_gt, gt_side) / ov.area_gt.sum()
                        + np.dot(ov.area_pred, pred_side) / ov.area_pred.sum()))


def object_dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """GlaS object Dice: ½[Σ_i γ_i D(G_i, S*(G_i)) + Σ_j σ_j D(G*(S_j), S_j)], with γ, σ the objects'
    shares of the total gt / predicted area and S*(G_i) the prediction overlapping G_i most (Dice 0 if
    none overlaps). Both empty -> 1; one empty -> 0."""
    ov = overlaps(gt, pred)
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 1.0
    if ov.n_gt == 0 or ov.n_pred == 0:
        return 0.0
    pair_dice = np.r_[ov.dice, 0.0]  # index -1 (no partner) -> Dice 0
    g_side = pair_dice[_best_per(ov.gi, ov.inter, ov.n_gt)]
    p_side = pair_dice[_best_per(ov.pj, ov.inter, ov.n_pred)]
    return _weighted_sides(ov, g_side, p_side)


def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Hausdorff distance (pixels, Euclidean) between two boolean pixel sets (all pixels, not only
    boundaries). Both empty -> 0, one empty -> inf."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    # The nearest pixel of either set lies inside the union's bounding box, so an EDT there is exact.
    ys, xs = np.nonzero(a | b)
    sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    a, b = a[sl], b[sl]
    return float(max(ndimage.distance_transform_edt(~b)[a].max(),
                     ndimage.distance_transform_edt(~a)[b].max()))


class _Objects:
    """One label image (relabelled 1..n) with its objects' bounding boxes, for pairwise distances."""

    def __init__(self, labels: np.ndarray, n: int):
        self.labels, self.n = labels, n
        self.boxes = ndimage.find_objects(labels, max_label=n)

    def pair_hausdorff(self, i: int, other: "_Objects", j: int) -> float:
        """Hausdorff between object i (0-based) here and object j of other, on their union's box."""
        s0, s1 = self.boxes[i], other.boxes[j]
        sl = tuple(slice(min(u.start, v.start), max(u.stop, v.stop)) for u, v in zip(s0, s1))
        return hausdorff(self.labels[sl] == i + 1, other.labels[sl] == j + 1)

    def nearest(self, i: int, other: "_Objects") -> float:
        """Smallest Hausdorff distance from object i to any object of other (branch and bound: the
        farthest pixel of other's object k from object i is a lower bound of H, so candidates are
        tried in increasing bound order and the search stops once the bound reaches the best)."""
        dist_to_i = ndimage.distance_transform_edt(self.labels != i + 1)
        bound = np.asarray(ndimage.maximum(dist_to_i, other.labels, np.arange(1, other.n + 1)))
        best = np.inf
        for k in np.argsort(bound, kind="stable"):
            if bound[k] >= best:
                break
            best = min(best, self.pair_hausdorff(i, other, int(k)))
        return float(best)


def object_hausdorff(gt: np.ndarray, pred: np.ndarray) -> float:
    """GlaS object Hausdorff: ½[Σ_i γ_i H(G_i, S*(G_i)) + Σ_j σ_j H(G*(S_j), S_j)], weights as in
    `object_dice`; S*(G_i) is the prediction overlapping G_i most or, if none overlaps, the one at the
    smallest Hausdorff distance (as the challenge's code does). Both empty -> 0; one empty -> inf."""
    gt, pred = _check_pair(gt, pred)
    ov = overlaps(gt, pred)
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 0.0
    if ov.n_gt == 0 or ov.n_pred == 0:
        return float("inf")
    g = _Objects(relabel_sequential(gt)[0], ov.n_gt)
    p = _Objects(relabel_sequential(pred)[0], ov.n_pred)
    best_g = _best_per(ov.gi, ov.inter, ov.n_gt)
    best_p = _best_per(ov.pj, ov.inter, ov.n_pred)
    g_side = np.array([g.pair_hausdorff(i, p, int(ov.pj[b])) if b >= 0 else g.nearest(i, p)
                       for i, b in enumerate(best_g)])
    p_side = np.array([p.pair_hausdorff(j, g, int(ov.gi[b])) if b >= 0 else p.nearest(j, g)
                       for j, b in enumerate(best_p)])
    return _weighted_sides(ov, g_side, p_side)


# --------------------------------------------------------------------------- nuclei scores
def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017). Each gt nucleus G_i is paired with the prediction
    S_j of highest IoU: C += |G_i ∩ S_j|, U += |G_i ∪ S_j| (a gt nucleus no prediction touches adds
    |G_i| to U only); every prediction never paired adds its area to U. AJI = C / U.
    Both empty -> 1; one empty -> 0."""
    ov = overlaps(gt, pred)
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 1.0
    if ov.n_gt == 0 or ov.n_pred == 0:
        return 0.0
    best = _best_per(ov.gi, ov.iou, ov.n_gt)
    hit = best >= 0
    pairs = best[hit]
    c = ov.inter[pairs].sum()
    used = np.zeros(ov.n_pred, bool)
    used[ov.pj[pairs]] = True
    u = ov.union[pairs].sum() + ov.area_gt[~hit].sum() + ov.area_pred[~used].sum()
    return float(c / u)


@dataclass
class PanopticQuality:
    tp: int
    fp: int
    fn: int
    iou_sum: float

    @property
    def dq(self) -> float:
        d = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return 1.0 if d == 0 else self.tp / d

    @property
    def sq(self) -> float:
        if self.tp + self.fp + self.fn == 0:
            return 1.0
        return 0.0 if self.tp == 0 else self.iou_sum / self.tp

    @property
    def pq(self) -> float:
        return self.dq * self.sq


def panoptic_quality(gt: np.ndarray, pred: np.ndarray) -> PanopticQuality:
    """Panoptic quality (Kirillov et al. 2019) as used for nuclei: a gt and a predicted object match if
    their IoU > 0.5 (unique by construction). DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of matches,
    PQ = DQ x SQ; `.pq`, `.dq`, `.sq`. Both empty -> 1."""
    ov = overlaps(gt, pred)
    iou_pairs = ov.iou
    matched = iou_pairs > 0.5
    tp = int(matched.sum())
    return PanopticQuality(tp, ov.n_pred - tp, ov.n_gt - tp, float(iou_pairs[matched].sum()))


# --------------------------------------------------------------------------- everything at once
GLAND_METRICS = ("dice", "iou", "dice_224", "iou_224", "object_f1", "object_dice", "object_hausdorff")
NUCLEI_METRICS = ("dice", "iou", "dice_224", "iou_224", "aji", "pq", "dq", "sq")


def score_all(gt: np.ndarray, pred: np.ndarray, task: str = "nuclei") -> dict[str, float]:
    """Every score for one image: pixel Dice/IoU at native resolution and at 224 (paper protocol),
    plus object scores for the task ("glands": GlaS F1 / object Dice / object Hausdorff; "nuclei":
    AJI / PQ / DQ / SQ; "all": both sets)."""
    gt, pred = _check_pair(gt, pred)
    out = dict(pixel_scores(gt, pred))
    paper = pixel_scores(gt, pred, protocol="paper")
    out["dice_224"], out["iou_224"] = paper["dice"], paper["iou"]
    if task in ("glands", "all"):
        out["object_f1"] = object_f1(gt, pred).f1
        out["object_dice"] = object_dice(gt, pred)
        out["object_hausdorff"] = object_hausdorff(gt, pred)
    if task in ("nuclei", "all"):
        pq = panoptic_quality(gt, pred)
        out["aji"] = aji(gt, pred)
        out["pq"], out["dq"], out["sq"] = pq.pq, pq.dq, pq.sq
    if task not in ("glands", "nuclei", "all", "semantic"):
        raise ValueError(f"task must be 'glands', 'nuclei', 'semantic' or 'all', got {task!r}")
    return out
