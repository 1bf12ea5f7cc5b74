"""How much does re-choosing the post-processing on the corrections give, without any training?

Same scenario as `bench_finetune.py` (validation images of the card's data_split, the left half
corrected with the ground truth, the right half scored: GlaS object F1 / MoNuSeg AJI), but the
weights stay the bundled ones: the instance settings (threshold, min size, marker threshold or seed
distance) are chosen on the corrected left half with `finetune_check.choose_postprocessing`, the
function a round uses after training, and the right half is scored with the card's settings and
with the chosen ones. `--passes 2` repeats the one-setting-at-a-time sweep from its result (so a
setting can move two grid steps). One prediction per image; no training, so it is cheap.

    python benchmarks/bench_finetune_rechoice.py --dataset MoNuSeg
    python benchmarks/bench_finetune_rechoice.py --dataset MoNuSeg --passes 2 --out benchmarks/results/finetune_rechoice_nuclei_2pass

Writes markdown and JSON (`--out`, default benchmarks/results/finetune_rechoice_<task>), a row at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_finetune import DATA, METRIC, TASK, object_score  # noqa: E402  (same dataset, same scores)
from src_models.checkpoints import load_checkpoint  # noqa: E402
from selected_weights import for_validation  # noqa: E402  (the weights that have not seen val)
from src_models.data import load_samples  # noqa: E402
from src_models.finetune_check import choose_postprocessing, labels_in  # noqa: E402
from src_models.inference import predict  # noqa: E402
from src_models.instances import InstanceParams  # noqa: E402
from src_models.safe_write import write_text_atomic  # noqa: E402


def changed(start: InstanceParams, chosen: InstanceParams) -> str:
    a, b = asdict(start), asdict(chosen)
    return ", ".join(f"{k} {a[k]} -> {b[k]}" for k in a if a[k] != b[k]) or "none"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(TASK), default="MoNuSeg")
    ap.add_argument("--checkpoint", default=None, help="default: the bundled nuclei / glands model")
    ap.add_argument("--images", default=None, help="comma-separated validation image names (default: all)")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = TASK[args.dataset]
    name = args.checkpoint or for_validation(task)
    model, card = load_checkpoint(name)
    val = list((card.data_split or {}).get("validation") or [])
    if args.images:
        val = [n.strip() for n in args.images.split(",") if n.strip()]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"finetune_rechoice_{task}")
    command = "python benchmarks/bench_finetune_rechoice.py " + " ".join(sys.argv[1:])
    load_start = os.getloadavg()
    start = InstanceParams.from_card(card)
    metric = METRIC[task]
    rows = []

    def write() -> None:
        gains = [r["chosen"] - r["card"] for r in rows]
        lines = [f"# Post-processing re-chosen on the corrected left half, no training: {args.dataset} "
                 f"validation images, right half scored", "", f"Command: `{command}`  ",
                 f"Model: {name} (card created {card.created}, head {card.head or 'binary'}); card "
                 f"settings {json.dumps(card.instance_params)}; {args.passes} pass(es); load average "
                 f"at the start {', '.join(f'{v:.1f}' for v in load_start)}, at the end "
                 f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} cores.", "",
                 f"| image | right {metric}, card settings | right {metric}, chosen on the left half | "
                 f"change | left-half {metric} card -> chosen | settings moved |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['image']} | {r['card']:.3f} | {r['chosen']:.3f} | {r['chosen'] - r['card']:+.3f} "
                         f"| {r['left_card']:.3f} -> {r['left_chosen']:.3f} | {r['moved']} |")
        if rows:
            lines += ["", f"Images: {len(rows)}; mean change of the right-half {metric}: "
                      f"{np.mean(gains):+.4f}; worst {min(gains):+.4f}; better on {sum(g > 0 for g in gains)}, "
                      f"worse on {sum(g < 0 for g in gains)}."]
        write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
        write_text_atomic(out.with_suffix(".json"), json.dumps({"command": command, "rows": rows}, indent=1))

    for sample in load_samples(DATA / args.dataset / "train", val):
        image, gt = sample.image, sample.mask
        h, w = gt.shape
        left = np.zeros((h, w), bool)
        left[:, :w // 2] = True
        prob = predict(model, image, card, device="cpu")
        box = (slice(0, h), slice(0, w))
        count_min = max(1, int(start.min_size))
        chosen = start
        for _ in range(args.passes):
            chosen, left_score = choose_postprocessing(prob, box, gt, left, card, chosen, count_min)
        before, after = labels_in(prob, card, start), labels_in(prob, card, chosen)
        right = slice(w // 2, w)
        rows.append({"image": sample.name,
                     "card": object_score(task, gt[:, right], before[:, right]),
                     "chosen": object_score(task, gt[:, right], after[:, right]),
                     "left_card": object_score(task, gt[:, :w // 2], before[:, :w // 2]),
                     "left_chosen": object_score(task, gt[:, :w // 2], after[:, :w // 2]),
                     "moved": changed(start, chosen), "settings": asdict(chosen)})
        r = rows[-1]
        print(f"{r['image']}: {r['card']:.3f} -> {r['chosen']:.3f} ({r['moved']})", flush=True)
        write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
