"""Does one fine-tuning round help where the pathologist did not look, and how long does it take?

Scenario (issue 16): a pathologist opens an image the model never trained on (its card's validation
split), corrects the labels of the image's LEFT half (the ground truth stands in for a perfect
correction) and presses Fine-tune with the engine's defaults. The round trains on part of that half,
checks itself on the rest (held back) and on replay crops of the model's training data, and keeps
the new weights or the old ones. We then segment the whole image and score the RIGHT half, which
the round never saw (glands: GlaS object F1; nuclei: AJI), before and after, with the settings each
model's card gives (a kept round re-chooses them).

    python benchmarks/bench_finetune.py --dataset GlaS      # glands, every validation image
    python benchmarks/bench_finetune.py --dataset MoNuSeg   # nuclei
    python benchmarks/bench_finetune.py --dataset GlaS --images train_2,train_21 --steps 20
    python benchmarks/bench_finetune.py --dataset MoNuSeg --crop 160 --set '{"boundary_width": 1}' \
        --out benchmarks/results/finetune_nuclei_bw1

Per image: the unseen-half score before / after (and of the trained weights whatever the decision,
to show what the check prevented), whether the round was kept and why, the user's summary line,
the round's wall and CPU seconds. Writes markdown and JSON to benchmarks/results/ (`--out`), one
row at a time, with the command and the model (card created date and weights hash).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src_models import metrics as M  # noqa: E402
from src_models.checkpoints import load_checkpoint, resolve_checkpoint  # noqa: E402
from selected_weights import for_validation  # noqa: E402  (the weights that have not seen val)
from src_models.data import load_samples  # noqa: E402
from src_models.finetune import finetune  # noqa: E402
from src_models.inference import predict  # noqa: E402
from src_models.instances import InstanceMaker  # noqa: E402
from src_models.safe_write import write_text_atomic  # noqa: E402

DATA = Path("/work/shared/data")
TASK = {"MoNuSeg": "nuclei", "GlaS": "glands"}
METRIC = {"nuclei": "AJI", "glands": "object F1"}


def object_score(task: str, gt: np.ndarray, pred: np.ndarray) -> float:
    return M.aji(gt, pred) if task == "nuclei" else M.object_f1(gt, pred).f1


def segment(model, card, image) -> np.ndarray:
    return InstanceMaker(predict(model, image, card, device="cpu"), card).labels()


def outside_text(o) -> str:
    """The round's label-free comparison around the reviewed region (`finetune_check.ObjectChanges`)."""
    if not o:
        return "not checked"
    text = (f"{o['old_objects']} -> {o['new_objects']}, {o['merged']} / {o['split']} "
            f"({o.get('bridged', 0)} / {o.get('cut', 0)})")
    if "appeared" in o:     # counted since session 11
        text += f", found / lost {o['appeared']} / {o['vanished']}"
    return text


def pick_images(card, split: str = "validation", images: str | None = None) -> list[str]:
    """The images a run corrects: the card's `split` ("validation", or "train": images the model
    was trained on, a second set to confirm a rule on, never a measure of gain on unseen images).
    `images`: comma-separated names, or a count (validation: the first N; train: N spread evenly
    over the split, leaving out the images whose crops ship for replay, which the round's replay
    check scores on)."""
    names = list((card.data_split or {}).get(split) or [])
    if split == "train":
        from src_models.finetune import REPLAY_CROPS_DIR
        shipped = {p.stem.split("__", 1)[1] for p in REPLAY_CROPS_DIR.glob(f"{card.task}__*.png")}
        names = sorted((n for n in names if n not in shipped), key=lambda n: (len(n), n))
    if images and images.isdigit():
        k = int(images)
        if split == "train" and 0 < k < len(names):
            return [names[int(i * len(names) / k)] for i in range(k)]
        return names[:k]
    if images:
        return [n.strip() for n in images.split(",") if n.strip()]
    return names


def weights_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(TASK), default="GlaS")
    ap.add_argument("--checkpoint", default=None, help="default: the bundled nuclei / glands model")
    ap.add_argument("--images", default=None,
                    help="comma-separated image names, or a count (default: all of --split)")
    ap.add_argument("--split", choices=("validation", "train"), default="validation",
                    help="the card's split the images come from: validation (default; images the "
                         "model never trained on) or train (images it trained on: a second set to "
                         "confirm a keep rule on, see pick_images)")
    ap.add_argument("--steps", type=int, default=None, help="default: the engine's")
    ap.add_argument("--lr", type=float, default=None, help="default: the engine's")
    ap.add_argument("--replay-per-batch", type=int, default=None, help="default: the engine's")
    ap.add_argument("--crop", type=int, default=None, help="crop side (finetune's tile_size); default: the engine's")
    ap.add_argument("--set", default=None, metavar="JSON",
                    help='other finetune arguments, e.g. \'{"boundary_width": 1}\'')
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/finetune_<task>")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out's JSON (an interrupted run of the same code) "
                         "and run only the images it lacks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    task = TASK[args.dataset]
    root = DATA / args.dataset / "train"
    name = args.checkpoint or for_validation(task)
    model, card = load_checkpoint(name)
    model_id = (f"{name} (card created {card.created}, head {card.head or 'binary'}, weights sha256 "
                f"{weights_hash(resolve_checkpoint(name))})")
    load_start = os.getloadavg()
    val = pick_images(card, args.split, args.images)
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr),
                                   ("replay_per_batch", args.replay_per_batch),
                                   ("tile_size", args.crop)) if v is not None}
    overrides.update(json.loads(args.set) if args.set else {})
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"finetune_{task}")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_finetune.py " + " ".join(sys.argv[1:])
    metric = METRIC[task]
    split_name = ("validation" if args.split == "validation" else
                  "TRAINING (the model was trained on these images, right halves included)")

    rows = []
    if args.resume and out.with_suffix(".json").exists():
        rows = json.loads(out.with_suffix(".json").read_text())["rows"]
        command += f"  (resumed: the first {len(rows)} rows come from the interrupted run)"
    head = ["image", "objects L/R", f"before R {metric}", f"after R {metric}", "change",
            f"trained R {metric}", "kept", "held-back objects matched (before -> after)",
            "round s (wall)", "round CPU s", "of which check s (wall)",
            "outside: old -> new objects, merged / split (bridged / cut)[, found / lost]", "why"]

    def write() -> None:
        kept = [r for r in rows if r["kept"]]
        changes = [r["after"] - r["before"] for r in rows]
        worst = min(changes) if changes else float("nan")
        lines = [f"# Fine-tuning rounds: {args.dataset} {split_name} images, left half corrected, "
                 f"right half scored", "",
                 f"Command: `{command}`  ", f"Model: {model_id}  ",
                 f"Engine defaults{(' except ' + json.dumps(overrides)) if overrides else ''}; "
                 f"CPU, {args.threads} thread(s); load average (1, 5, 15 min) at the start "
                 f"{', '.join(f'{v:.1f}' for v in load_start)}, at the end "
                 f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} cores (a shared "
                 f"machine: wall times include waiting for the CPU, CPU seconds do not; the first "
                 f"round also pays torch's one-time optimizer import).", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            lines.append("| " + " | ".join([
                r["image"], r["objects"], f"{r['before']:.3f}", f"{r['after']:.3f}",
                f"{r['after'] - r['before']:+.3f}", f"{r['trained']:.3f}",
                "no" if not r["kept"] else "yes" if r.get("weights_kept", True) else "settings only",
                r["matched"], f"{r['seconds']:.1f}", f"{r['cpu']:.1f}", f"{r['check_seconds']:.1f}",
                outside_text(r.get("outside")), r["reason"]]) + " |")
        if rows:
            lines += ["", f"Images: {len(rows)}; rounds kept: {len(kept)}; mean change of the "
                      f"unseen-half {metric}: {np.mean(changes):+.4f} (goal >= +0.03: "
                      f"{'met' if np.mean(changes) >= 0.03 else 'NOT met'}); worst change: "
                      f"{worst:+.4f} (goal: no kept round below -0.01: "
                      f"{'met' if all(r['after'] - r['before'] >= -0.01 for r in kept) else 'NOT met'}); "
                      f"median round {np.median([r['seconds'] for r in rows]):.1f} s wall, "
                      f"{np.median([r['cpu'] for r in rows]):.1f} s CPU; mean change had every "
                      f"round been kept: {np.mean([r['trained'] - r['before'] for r in rows]):+.4f}."]
        write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
        write_text_atomic(out.with_suffix(".json"),
                          json.dumps({"command": command, "model": model_id, "rows": rows}, indent=1))

    done = {r["image"] for r in rows}
    for sample in load_samples(root, [n for n in val if n not in done]):
        image, gt = sample.image, sample.mask
        h, w = gt.shape
        right = slice(w // 2, w)
        if not (gt[:, :w // 2] > 0).any():   # nothing to correct there: the engine refuses the round
            print(f"{sample.name}: skipped, no object in the left half", flush=True)
            continue
        before = segment(model, card, image)
        t, c = time.perf_counter(), time.process_time()
        res = finetune(model, image, gt, region=(0, h, 0, w // 2), card=card, **overrides)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        new_card = res.card(card)
        after = segment(res.model, new_card, image)
        # the new weights with their re-chosen settings, whatever the decision
        tuned = (res.corrections.get("instance_params") if not res.weights_kept else res.instance_params)
        trained = after if res.weights_kept else segment(
            res.trained, replace(card, instance_params=tuned or card.instance_params), image)
        b, a = res.check_before, res.check_after
        rows.append({
            "image": sample.name,
            "objects": f"{len(np.unique(gt[:, :w // 2])) - 1}/{len(np.unique(gt[:, right])) - 1}",
            "before": object_score(task, gt[:, right], before[:, right]),
            "after": object_score(task, gt[:, right], after[:, right]),
            "trained": object_score(task, gt[:, right], trained[:, right]),
            "kept": res.kept, "weights_kept": res.weights_kept, "reason": res.reason,
            "summary": res.summary,
            "matched": f"{b.matched} -> {a.matched} of {b.objects}" if b and a else "",
            "seconds": seconds, "cpu": cpu, "steps": res.steps_done,
            "check_seconds": float(res.corrections.get("check_seconds") or 0.0),
            "held_back_pixels": res.corrections.get("held_back_pixels"),
            "instance_params": res.instance_params,
            "outside": res.corrections.get("outside_check")})
        r = rows[-1]
        print(f"{r['image']}: {r['before']:.3f} -> {r['after']:.3f} (trained {r['trained']:.3f}) "
              f"kept={r['kept']} {seconds:.1f}s wall {cpu:.1f}s CPU | {res.summary}", flush=True)
        write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
