"""Post-processing variants of the bundled instance models, scored from cached probabilities.

The model runs once per image (`cache`); every post-processing variant is then scored from the
cache in seconds, with the same scoring as `napari-dca evaluate` (evaluate.score_pairs ->
metrics.score_all), so the numbers are the evaluate command's numbers.

    python benchmarks/bench_post.py cache glands            # probabilities -> /work/runs/post/glands/*.npz
    python benchmarks/bench_post.py check glands \
        benchmarks/results/heads/glands_three_class_long/val/evaluation.json   # card settings = shipped table?
    python benchmarks/bench_post.py score glands --split val --set '{"grow": 2}' [--set ...]
    python benchmarks/bench_post.py grid glands --split train --grid '{"marker_opening": [0, 2, 4]}'
    python benchmarks/bench_post.py time glands --set '{}' --set '{"grow": 3}'   # instance-step time, a/b

Splits: "train" = the card's recorded training images, "val" = its validation images; the
validation split is only ever scored, never searched (the grid command refuses it). Settings are
InstanceParams fields (src_models/instances.py) on top of the card's instance_params.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = {"glands": Path("/work/shared/data/GlaS/train"), "nuclei": Path("/work/shared/data/MoNuSeg/train")}
CACHE = Path(os.environ.get("POST_CACHE", "/work/runs/post"))
# The object score each task is tuned by (as scripts/tune_instances.py), and what is reported.
CRITERION = {"glands": "object_f1", "nuclei": "aji"}
REPORTED = {"glands": ("object_f1", "object_dice", "object_hausdorff", "dice"),
            "nuclei": ("aji", "pq", "dice")}


def split_names_of(card, task: str, split: str) -> list[str]:
    from src_models.evaluate import split_of
    return sorted(split_of(card, DATA[task] / "images", split))


def load_card(task: str):
    from selected_weights import for_validation   # benchmarks/: the weights that have not seen val
    from src_models.checkpoints import load_checkpoint
    return load_checkpoint(for_validation(task))


def cache(task: str, threads: int = 1) -> None:
    """Probabilities of the bundled model for every training and validation image, as evaluate
    computes them (inference.predict, card tile size, overlap 0.25, no TTA)."""
    import torch
    torch.set_num_threads(threads)
    from src_models.evaluate import match_files
    from src_models.image_io import read_image
    from src_models.inference import predict
    model, card = load_card(task)
    out = CACHE / task
    out.mkdir(parents=True, exist_ok=True)
    names = split_names_of(card, task, "train") + split_names_of(card, task, "val")
    for name, img_path, _ in match_files(DATA[task] / "images", DATA[task] / "masks", names):
        target = out / f"{name}.npy"
        if target.exists():
            continue
        t0 = time.perf_counter()
        prob = predict(model, np.asarray(read_image(img_path, lazy=False)), card, device="cpu", overlap=0.25)
        tmp = out / f".{name}.tmp.npy"
        np.save(tmp, np.asarray(prob, np.float32))
        tmp.replace(target)
        print(f"{name}: {prob.shape} {time.perf_counter() - t0:.1f} s", flush=True)


class Cached:
    """One task's cached probabilities and ground truth, for one split."""

    def __init__(self, task: str, split: str):
        from src_models.evaluate import read_mask
        self.task = task
        _, self.card = load_card(task)
        self.names = split_names_of(self.card, task, split)
        self.probs = [np.load(CACHE / task / f"{n}.npy") for n in self.names]
        self.masks = [read_mask(p) for p in sorted((DATA[task] / "masks").glob("*.png"))
                      if p.stem in set(self.names)]
        mask_names = sorted(p.stem for p in (DATA[task] / "masks").glob("*.png") if p.stem in set(self.names))
        assert mask_names == self.names

    def labels(self, settings: dict) -> list[np.ndarray]:
        from src_models.instances import InstanceMaker
        return [InstanceMaker(p, self.card, mode=self.task, **settings).labels() for p in self.probs]

    def report(self, settings: dict, full: bool = True):
        """EvaluationReport (evaluate.score_pairs) of these settings; full=False scores only the
        criterion and pixel Dice (for grids)."""
        from src_models import metrics as M
        from src_models.evaluate import EvaluationReport, score_pairs
        preds = self.labels(settings)
        if full:
            return score_pairs(zip(self.names, self.masks, preds), task=self.task)
        rows = []
        for name, gt, pred in zip(self.names, self.masks, preds):
            crit = M.object_f1(gt, pred).f1 if self.task == "glands" else M.aji(gt, pred)
            rows.append({"name": name, CRITERION[self.task]: crit, "dice": M.dice(gt, pred)})
        return EvaluationReport(self.task, rows)


def spread(values) -> str:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], float)
    return f"{v.mean():.3f} ({v.min():.3f} / {np.median(v):.3f} / {v.max():.3f})" if v.size else "n/a"


def count_cell(rows) -> str:
    err = [abs(r["objects_pred"] - r["objects_gt"]) / max(1, r["objects_gt"]) for r in rows]
    return f"{np.mean(err):.1%} (max {np.max(err):.1%}; {sum(e <= 0.10 for e in err)}/{len(err)} within 10%)"


def table(task: str, named_reports) -> str:
    cols = list(REPORTED[task]) + (["count error per image"] if task == "nuclei" else [])
    lines = ["| settings | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, rep in named_reports:
        cells = [spread([r[m] for r in rep.rows]) for m in REPORTED[task]]
        if task == "nuclei":
            cells.append(count_cell(rep.rows))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nEach cell: mean over the images (min / median / max per image).\n"


def check(task: str, shipped_json: str) -> None:
    """The card's settings on the cached validation probabilities against a shipped
    evaluation.json, image by image and score by score."""
    data = Cached(task, "val")
    rep = data.report({})
    shipped = {r["name"]: r for r in json.loads(Path(shipped_json).read_text())["per_image"]}
    worst = 0.0
    for row in rep.rows:
        ref = shipped[row["name"]]
        for k, v in row.items():
            if k == "name" or ref.get(k) is None:
                continue
            worst = max(worst, abs(float(v) - float(ref[k])))
    print(table(task, [("card settings (cache)", rep)]))
    print(f"{len(rep.rows)} images; largest per-image difference from {shipped_json}: {worst:.3g}")


def score(task: str, split: str, settings_list: list[dict], out: str | None = None) -> None:
    data = Cached(task, split)
    named = []
    for s in [{}] + settings_list:
        t0 = time.perf_counter()
        rep = data.report(s)
        named.append((json.dumps(s) if s else "card settings", rep))
        print(f"{json.dumps(s)}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    text = f"{task}, {split} split ({len(data.names)} images)\n\n" + table(task, named)
    print(text)
    if out:
        Path(out).write_text(json.dumps({name: rep.to_dict() for name, rep in named}, indent=1))


def grid(task: str, split: str, grid_spec: dict, base: dict, full: bool = False,
         one_at_a_time: bool = False) -> list[tuple[dict, float, float]]:
    """Mean criterion and pixel Dice for every combination of grid_spec (on top of base); with
    full, every reported score too (slower: object Hausdorff)."""
    if split != "train":
        raise SystemExit("grids run on the training split only (selection stays honest)")
    data = Cached(task, split)
    keys = list(grid_spec)
    rows = []
    if one_at_a_time:   # each field alone, the others at base
        combos = [base | {k: v} for k in keys for v in grid_spec[k]]
    else:
        combos = [base | dict(zip(keys, c)) for c in itertools.product(*(grid_spec[k] for k in keys))]
    for s in combos:
        rep = data.report(s, full=full)
        crit = float(np.mean([r[CRITERION[task]] for r in rep.rows]))
        dice = float(np.mean([r["dice"] for r in rep.rows]))
        rows.append((s, crit, dice))
        extra = ""
        if full:
            extra = " | " + " | ".join(f"{m} {np.mean([r[m] for r in rep.rows]):.4f}" for m in REPORTED[task])
            if task == "nuclei":
                extra += " | count " + count_cell(rep.rows)
        print(f"| {json.dumps(s)} | {crit:.4f} | {dice:.4f}{extra} |", flush=True)
    best = max(rows, key=lambda r: (r[1], r[2]))
    print(f"\nbest on {len(data.names)} {split} images: {json.dumps(best[0])} "
          f"({CRITERION[task]} {best[1]:.4f}, dice {best[2]:.4f})")
    return rows


def time_step(task: str, split: str, a: dict, b: dict, repeats: int = 3, size: int = 0) -> None:
    """Instance-step seconds per image, settings a against b, alternating a/b per image and
    repeat (fresh InstanceMaker each time, so nothing is cached); medians over images. size:
    reflect-pad each probability map to at least size x size first (a 1000x1000 stand-in)."""
    from src_models.instances import InstanceMaker
    data = Cached(task, split)
    times = {"a": [], "b": []}
    for prob in data.probs:
        if size:
            pad = [(0, 0)] + [(0, max(0, size - n)) for n in prob.shape[1:]]
            prob = np.pad(prob, pad, mode="reflect")
        per = {"a": [], "b": []}
        for _ in range(repeats):
            for key, s in (("a", a), ("b", b)):
                t0 = time.perf_counter()
                InstanceMaker(prob, data.card, mode=task, **s).labels()
                per[key].append(time.perf_counter() - t0)
        for key in per:
            times[key].append(float(np.median(per[key])))
    ta, tb = np.median(times["a"]), np.median(times["b"])
    shape = prob.shape[1:]
    print(f"{task} {split}, {len(data.probs)} images {shape}, load average "
          f"{os.getloadavg()[0]:.1f}: a {json.dumps(a)} {ta:.3f} s, b {json.dumps(b)} {tb:.3f} s "
          f"(median per image), b/a {tb / ta:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("cache", "check", "score", "grid", "time"))
    ap.add_argument("task", choices=("glands", "nuclei"))
    ap.add_argument("shipped", nargs="?", help="check: the shipped evaluation.json")
    ap.add_argument("--split", default="val", choices=("train", "val"))
    ap.add_argument("--set", action="append", default=[], help="score: JSON settings (repeatable)")
    ap.add_argument("--grid", default="{}", help='grid: JSON {"field": [values]}')
    ap.add_argument("--base", default="{}", help="grid: JSON settings every combination starts from")
    ap.add_argument("--one-at-a-time", action="store_true", help="grid: vary one field at a time")
    ap.add_argument("--full", action="store_true", help="grid: report every score, not only the criterion")
    ap.add_argument("--out", help="score: also write the reports as JSON here")
    ap.add_argument("--size", type=int, default=0, help="time: reflect-pad the maps to SIZE x SIZE")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.command == "cache":
        cache(args.task, args.threads)
    elif args.command == "check":
        check(args.task, args.shipped)
    elif args.command == "score":
        score(args.task, args.split, [json.loads(s) for s in args.set], args.out)
    elif args.command == "time":
        sets = [json.loads(x) for x in args.set]
        time_step(args.task, args.split, sets[0] if len(sets) > 1 else {}, sets[-1], size=args.size)
    else:
        grid(args.task, args.split, json.loads(args.grid), json.loads(args.base), args.full,
             args.one_at_a_time)


if __name__ == "__main__":
    main()
