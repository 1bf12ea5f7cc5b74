"""What would a fine-tuning round give with another post-processing re-choice or another keep rule?

Same scenario as `bench_finetune.py` (validation images, left half corrected with the ground truth,
right half scored: GlaS object F1 / MoNuSeg AJI). Each image gets ONE round per finetune variant
(the engine's defaults, or the JSON arguments given); its trained weights are then scored, with
several post-processing choices, everywhere a keep rule looks (the held-back part, the replay crops)
and on the unseen half. `report` then replays keep rules over those scores without training again:
the engine's rule (`finetune_check.judge_round`) and variants of it.

    python benchmarks/diagnose_rounds.py run GlaS /tmp/rounds_base.jsonl
    python benchmarks/diagnose_rounds.py run GlaS /tmp/rounds_open.jsonl '{"edge": "open"}' --images train_5,train_76
    python benchmarks/diagnose_rounds.py report /tmp/rounds_base.jsonl /tmp/rounds_open.jsonl

Post-processing choices for the trained weights: "engine" (the round's own re-choice), "card" (the
card's settings, no re-choice), "wide" (`choose_postprocessing` also sweeping grow, min_mean_prob
and boundary_weight, the settings tuned for the card since session 6). One JSON line per image.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_finetune import DATA, TASK, object_score  # noqa: E402
from src_models.checkpoints import load_checkpoint  # noqa: E402
from selected_weights import for_validation  # noqa: E402  (the weights that have not seen val)
from src_models.data import load_samples  # noqa: E402
from src_models.finetune import bundled_replay, finetune, region_mask  # noqa: E402
from src_models.finetune_check import (RegionScore, choose_postprocessing, judge_round,  # noqa: E402
                                       labels_in, region_box, region_probabilities, replay_crops,
                                       score_region, score_replay, split_check, crop_probabilities)
from src_models.inference import predict  # noqa: E402
from src_models.instances import InstanceParams  # noqa: E402

WIDE = {"grow": (0, 3, 5), "min_mean_prob": (0.0, 0.8), "boundary_weight": (0.0, 1.0)}


def wide_choice(prob, box, labels, part, card, start: InstanceParams, min_size: int) -> InstanceParams:
    """The engine's sweep, then the newer settings one at a time (strictly better only)."""
    from src_models.finetune_check import compare_labels
    from src_models.instances import InstanceMaker
    best, _ = choose_postprocessing(prob, box, labels, part, card, start, min_size)
    maker = InstanceMaker(prob, card)
    keep = part[box]
    gt = np.where(keep, labels[box], 0)

    def score(p):
        return compare_labels(gt, np.where(keep, maker.labels(**asdict(p)), 0), p.mode, min_size).score

    best_score = score(best)
    for name, values in WIDE.items():
        for v in values:
            if v == getattr(best, name):
                continue
            p = replace(best, **{name: v})
            s = score(p)
            if s > best_score:
                best, best_score = p, s
    return best


def score_dict(s: RegionScore | None):
    if s is None:
        return None
    d = s.to_dict()
    d["found"] = list(s.found) if s.found is not None else None
    return d


def run(args) -> None:
    torch.set_num_threads(1)
    task = TASK[args.dataset]
    model, card = load_checkpoint(for_validation(task))
    variant = json.loads(args.variant) if args.variant else {}
    val = list(card.data_split["validation"])
    if args.images:
        val = [n for n in args.images.split(",") if n]
    replay = bundled_replay(card)
    p0 = InstanceParams.from_card(card)
    count_min = max(1, int(p0.min_size))
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {json.loads(line)["image"] for line in out.read_text().splitlines() if line.strip()}
    for sample in load_samples(DATA / args.dataset / "train", [n for n in val if n not in done]):
        image, gt = sample.image, sample.mask
        h, w = gt.shape
        right = slice(w // 2, w)
        before_prob = predict(model, image, card, device="cpu")
        before = object_score(task, gt[:, right], labels_in(before_prob, card, p0)[:, right])
        res = finetune(model, image, gt, region=(0, h, 0, w // 2), card=card, **variant)
        valid = region_mask((0, h, 0, w // 2), (h, w))
        check = split_check(valid, gt, variant.get("check_fraction", 0.25))
        train_valid = valid & ~check
        new = res.trained
        new_whole = predict(new, image, card, device="cpu")
        new_prob, new_box = region_probabilities(new, image, card, train_valid | check)
        part_box = region_box(check) if check.any() else None
        crops = replay_crops(replay, int(res.corrections["tile_size"]))
        new_replay = [predict(new, im, card, device="cpu") for im, _ in crops]
        choices = {"engine": InstanceParams(**{**asdict(p0), **res.corrections["instance_params"]}),
                   "card": p0,
                   "wide": wide_choice(new_prob, new_box, gt, train_valid, card, p0, count_min)}
        row = {"image": sample.name, "variant": variant, "before": before, "kept": res.kept,
               "weights_kept": res.weights_kept, "reason": res.reason,
               "held_back": bool(check.any()),
               "check_before": score_dict(res.check_before) if res.check_source == "held back" or True else None,
               "replay_before": score_dict(res.replay_before), "choices": {}}
        for name, params in choices.items():
            entry = {"params": {k: getattr(params, k) for k in ("threshold", "min_size", "marker_threshold",
                                                                "grow", "min_mean_prob", "boundary_weight")},
                     "unseen": object_score(task, gt[:, right], labels_in(new_whole, card, params)[:, right])}
            if part_box is not None:
                entry["check_after"] = score_dict(score_region(crop_probabilities(new_prob, new_box, part_box),
                                                               part_box, gt, check, card, params, count_min))
            entry["replay_after"] = score_dict(score_replay(new, crops, card, params, count_min,
                                                            probs=new_replay))
            row["choices"][name] = entry
        # the engine's own outcome on the unseen half (what bench_finetune reports)
        after_params = InstanceParams(**{**asdict(p0), **(res.instance_params or {})})
        row["after"] = object_score(task, gt[:, right], labels_in(
            new_whole if res.weights_kept else before_prob, card, after_params)[:, right]) if res.kept else before
        row["seconds"] = res.seconds
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        c = row["choices"]
        print(f"{sample.name}: before {before:.3f} after {row['after']:.3f} kept={res.kept} | trained "
              + " ".join(f"{k} {v['unseen']:.3f}" for k, v in c.items()) + f" | {res.seconds:.1f}s", flush=True)


def as_score(d) -> RegionScore:
    d = dict(d)
    found = d.pop("found", None)
    return RegionScore(**d, found=tuple(found) if found is not None else None)


def decide(row, choice: str, rule: str) -> tuple[bool, float]:
    """(kept, unseen-half score after) of a round under a keep rule, with one post-processing choice."""
    c = row["choices"][choice]
    if "check_after" not in c or row["check_before"] is None:
        return False, row["before"]
    cb, ca = as_score(row["check_before"]), as_score(c["check_after"])
    rb = as_score(row["replay_before"]) if row["replay_before"] else None
    ra = as_score(c["replay_after"]) if c["replay_after"] else None
    tol = 0.01
    if rule.startswith("replay_tol="):
        tol = float(rule.split("=")[1])
    if rule == "replay_object":   # replay judged on its object score instead of its pixel Dice
        if rb is not None:
            rb, ra = replace(rb, dice=rb.score), replace(ra, dice=ra.score)
    if rule == "replay_as_check":  # replay judged as the held-back part: score no lower, Dice -0.02
        kept, _ = judge_round(cb, ca, None, None, True)
        if kept and rb is not None:
            kept = ra.score >= rb.score and ra.dice >= rb.dice - 0.02
        return kept, (c["unseen"] if kept else row["before"])
    kept, _ = judge_round(cb, ca, rb, ra, True, replay_tolerance=tol if rule != "replay_object" else 0.0)
    return kept, (c["unseen"] if kept else row["before"])


def report(args) -> None:
    rules = ["engine", "replay_object", "replay_as_check", "replay_tol=0.02", "no_replay"]
    for path in args.files:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        print(f"\n## {path}: {len(rows)} images, variant {rows[0]['variant'] if rows else {}}")
        print(f"engine as run: mean change {np.mean([r['after'] - r['before'] for r in rows]):+.4f}, "
              f"kept {sum(r['kept'] for r in rows)}")
        for choice in ("engine", "card", "wide"):
            every = np.mean([r["choices"][choice]["unseen"] - r["before"] for r in rows])
            line = [f"{choice:7s} every round kept {every:+.4f}"]
            for rule in rules:
                if rule == "no_replay":
                    res = []
                    for r in rows:
                        r2 = dict(r, replay_before=None)
                        res.append(decide(r2, choice, "engine"))
                else:
                    res = [decide(r, choice, rule) for r in rows]
                ch = [a - r["before"] for (k, a), r in zip(res, rows)]
                worst = min([c for (k, _), c in zip(res, ch) if k] or [0.0])
                line.append(f"{rule}: {np.mean(ch):+.4f} kept {sum(k for k, _ in res)} worst {worst:+.3f}")
            print(" | ".join(line))
        if args.rows:
            for r in rows:
                print(f"  {r['image']:9s} before {r['before']:.3f} as-run {r['after'] - r['before']:+.3f} "
                      + " ".join(f"{k} {v['unseen'] - r['before']:+.3f}" for k, v in r["choices"].items())
                      + f" | {r['reason'][:90]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("dataset", choices=sorted(TASK))
    r.add_argument("out")
    r.add_argument("variant", nargs="?", default=None)
    r.add_argument("--images", default=None)
    p = sub.add_parser("report")
    p.add_argument("files", nargs="+")
    p.add_argument("--rows", action="store_true")
    args = ap.parse_args()
    (run if args.cmd == "run" else report)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
