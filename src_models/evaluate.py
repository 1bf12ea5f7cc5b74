"""Score a checkpoint (or ready-made label images) on an annotated folder: one row per image and a
mean row, as a markdown table and JSON (`napari-dca evaluate`).

Predictions come from the same path the plugin uses: tiled, blended probabilities
(`inference.predict`) -> instances (`instances.InstanceMaker`, the card's settings) -> `metrics`.
`score_pairs` takes label arrays directly, so any other tool's output can be scored the same way.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import metrics as M

# How each score is printed in the markdown table, and whether higher is better.
DIGITS = {"object_hausdorff": 2}
LOWER_IS_BETTER = {"object_hausdorff"}


def metric_names(task: str) -> tuple[str, ...]:
    return {"glands": M.GLAND_METRICS, "nuclei": M.NUCLEI_METRICS,
            "semantic": ("dice", "iou", "dice_224", "iou_224")}.get(task, M.GLAND_METRICS + M.NUCLEI_METRICS[4:])


@dataclass
class EvaluationReport:
    """Per-image scores (`rows`: dicts with "name", "objects_gt", "objects_pred" and the task's
    metrics) and their means over images (`overall`)."""
    task: str
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> tuple[str, ...]:
        return metric_names(self.task)

    @property
    def overall(self) -> dict[str, float]:
        """Mean over images of every metric. A distance that is infinite for some image (nothing
        predicted there) makes the mean infinite; `overall_finite` gives the mean over the others."""
        return {m: float(np.mean([r[m] for r in self.rows])) if self.rows else float("nan")
                for m in self.metrics}

    @property
    def overall_finite(self) -> dict[str, float]:
        out = {}
        for m in self.metrics:
            vals = [r[m] for r in self.rows if math.isfinite(r[m])]
            out[m] = float(np.mean(vals)) if vals else float("nan")
        return out

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({"task": self.task, "metrics": list(self.metrics), "images": len(self.rows),
                          "overall": self.overall, "overall_finite_only": self.overall_finite,
                          "per_image": self.rows, "meta": self.meta})

    def to_markdown(self) -> str:
        cols = list(self.metrics)
        head = ["image", "gt objects", "pred objects"] + cols
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            lines.append("| " + " | ".join([r["name"], str(r["objects_gt"]), str(r["objects_pred"])]
                                           + [_fmt(m, r[m]) for m in cols]) + " |")
        overall = self.overall
        lines.append("| **mean** | | | " + " | ".join(f"**{_fmt(m, overall[m])}**" for m in cols) + " |")
        notes = [f"{len(self.rows)} images, task {self.task}. dice/iou: native resolution; "
                 f"dice_224/iou_224: both masks resized to 224x224 (nearest), the DCA paper's protocol."]
        if any(not math.isfinite(overall[m]) for m in cols if m in LOWER_IS_BETTER):
            fin = self.overall_finite
            notes.append("object_hausdorff is infinite where an image has no predicted (or no true) "
                         f"object; mean over the other images: {_fmt('object_hausdorff', fin['object_hausdorff'])}.")
        for k in ("checkpoint", "images_dir", "masks_dir", "split", "seconds"):
            if k in self.meta:
                notes.append(f"{k}: {self.meta[k]}")
        return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"

    def write(self, out: str | Path) -> tuple[Path, Path]:
        """Write markdown + JSON. out: a folder (-> evaluation.md / evaluation.json inside) or a file
        path whose .md / .json siblings are written."""
        out = Path(out)
        if out.suffix.lower() in (".md", ".json"):
            md, js = out.with_suffix(".md"), out.with_suffix(".json")
        else:
            md, js = out / "evaluation.md", out / "evaluation.json"
        from .safe_write import write_text_atomic
        write_text_atomic(md, self.to_markdown())
        write_text_atomic(js, json.dumps(self.to_dict(), indent=1) + "\n")
        return md, js


def _fmt(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.{DIGITS.get(metric, 4)}f}"


def _jsonable(obj):
    """Standard JSON has no inf/nan: they become null."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def score_pairs(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], task: str = "nuclei",
                meta: dict | None = None) -> EvaluationReport:
    """pairs of (name, ground-truth labels, predicted labels), both (H, W) -> EvaluationReport."""
    rows = []
    for name, gt, pred in pairs:
        row: dict[str, Any] = {"name": name,
                               "objects_gt": int(np.count_nonzero(np.unique(gt))),
                               "objects_pred": int(np.count_nonzero(np.unique(pred)))}
        row.update(M.score_all(gt, pred, task=task))
        rows.append(row)
    return EvaluationReport(task, rows, dict(meta or {}))


# --------------------------------------------------------------------------- folders
def match_files(images_dir: str | Path, masks_dir: str | Path,
                names: Sequence[str] | None = None) -> list[tuple[str, Path, Path]]:
    """(stem, image path, mask path) for images with a mask of the same stem, restricted to `names`
    if given (a name without a mask is an error: a silently smaller test set misleads)."""
    from .image_io import list_images, OUTPUT_SUFFIXES
    from .segment_outputs import source_stem
    images = {p.stem: p for p in list_images([images_dir])}
    # Label images written by `napari-dca segment` (x.png.labels.tif) stand for x when no x.* is there.
    for p in list_images([images_dir], suffixes=OUTPUT_SUFFIXES[:1], include_outputs=True):
        images.setdefault(source_stem(p), p)
    masks = {p.stem: p for p in list_images([masks_dir])}
    if names is None:
        names = sorted(set(images) & set(masks))
        if not names:
            raise FileNotFoundError(f"no image in {images_dir} has a mask of the same name in {masks_dir}")
    missing = [n for n in names if n not in images or n not in masks]
    if missing:
        raise FileNotFoundError(f"{len(missing)} requested image(s) lack an image or a mask: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [(n, images[n], masks[n]) for n in names]


def split_of(card, images_dir: str | Path, split: str) -> list[str] | None:
    """Image names of a split: the checkpoint card's own record (data_split) when it has one,
    otherwise data.split_names on the folder above images_dir. "all" -> None (every image)."""
    if split == "all":
        return None
    key = {"val": "validation", "validation": "validation", "train": "train"}.get(split)
    if key is None:
        raise ValueError(f"split must be 'val', 'train' or 'all', got {split!r}")
    data_split = (getattr(card, "data_split", None) or {}) if card is not None else {}
    recorded = data_split.get(key)
    if recorded:
        return list(recorded)
    if key == "validation" and recorded is not None and data_split.get("train"):
        # Final all-image weights (train_recipe.py --all-images) record an empty validation split.
        # The folder's seeded split would pick images these weights learned from.
        raise ValueError(f"this checkpoint was trained on every image of its data set "
                         f"({len(data_split['train'])} images, no validation split), so --split val "
                         f"would score images it learned from; its card's validation scores are its "
                         f"selected run's (training.selected_run). Use --split all or --names for "
                         f"images it has not seen")
    from .data import split_names
    train, val = split_names(Path(images_dir).parent)
    return val if key == "validation" else train


def read_mask(path: Path) -> np.ndarray:
    from .image_io import read_image
    mask = np.asarray(read_image(path, lazy=False))
    if mask.ndim == 3:  # RGB masks of binary data sets: any non-zero is foreground
        mask = (mask.max(axis=-1) > 0).astype(np.uint8)
    return mask


def evaluate_folder(model, card, images_dir: str | Path, masks_dir: str | Path,
                    names: Sequence[str] | None = None, task: str | None = None,
                    predict_kwargs: dict | None = None, instance_settings: dict | None = None,
                    progress: Callable[[int, int, str], None] | None = None,
                    save_labels: str | Path | None = None) -> EvaluationReport:
    """Run tiled inference + instance extraction on every image and score it against its mask.

    model/card: from checkpoints.load_checkpoint. task: metrics to report (default: card.task).
    predict_kwargs go to inference.predict (tile_size, overlap, device, tta, ...);
    instance_settings override the card's (threshold, min_size, ...). progress(i, n, name) after
    each image. save_labels: folder for the predicted label TIFFs, named as `napari-dca segment`
    names them (x.png -> x.png.labels.tif), so they never replace an image or a mask."""
    from .image_io import read_image, write_labels
    from .inference import card_value, predict
    from .safe_write import check_not_input
    from .segment_outputs import output_path
    from .instances import InstanceMaker

    task = task or card_value(card, "task", "nuclei")
    files = match_files(images_dir, masks_dir, names)
    t0 = time.perf_counter()

    def pairs():
        for i, (name, img_path, mask_path) in enumerate(files):
            image = np.asarray(read_image(img_path, lazy=False))
            gt = read_mask(mask_path)
            prob = predict(model, image, card, **(predict_kwargs or {}))
            mode = task if task in ("nuclei", "glands") else None
            pred = InstanceMaker(prob, card, mode=mode, **(instance_settings or {})).labels()
            if pred.shape != gt.shape:
                raise ValueError(f"{name}: mask {gt.shape} and image {image.shape} differ in size")
            if save_labels is not None:  # segment's naming: never over an image (or a mask)
                target = output_path(img_path, save_labels)
                check_not_input(target, (img_path, mask_path))
                write_labels(target, pred)
            if progress is not None:
                progress(i + 1, len(files), name)
            yield name, gt, pred

    report = score_pairs(pairs(), task=task)
    report.meta.update({"images_dir": str(images_dir), "masks_dir": str(masks_dir),
                        "seconds": round(time.perf_counter() - t0, 1),
                        "instance_settings": dict(instance_settings or {})})
    return report


def evaluate_predictions(pred_dir: str | Path, masks_dir: str | Path,
                         names: Sequence[str] | None = None, task: str = "nuclei") -> EvaluationReport:
    """Score label images already on disk (pred_dir/<stem>.*) against masks_dir/<stem>.*."""
    files = match_files(pred_dir, masks_dir, names)
    report = score_pairs(((n, read_mask(m), read_mask(p)) for n, p, m in files), task=task)
    report.meta.update({"predictions_dir": str(pred_dir), "masks_dir": str(masks_dir)})
    return report
