"""Which keep rule would have judged a fine-tuning round right? Replays check rules without training.

Same scenario as `bench_finetune.py` (left half corrected with the ground truth, right half unseen).
`dump` runs ONE round per image with the engine's defaults (or JSON `finetune` arguments) and saves
what any check rule needs: the old and the trained weights' whole-image probabilities, the ground
truth, the held-back part, both models' post-processing settings, the replay and outside results
and the engine's decision (npz, one per image). `rules` then replays keep rules over the dumps:
the engine's (`finetune_check.judge_round`) and variants that judge a round the engine refuses as
uncheckable (too few held-back objects, none found) on the held-back part's pixels instead.

    python benchmarks/diagnose_check.py dump GlaS /tmp/ck/val
    python benchmarks/diagnose_check.py dump GlaS /tmp/ck/train --split train --images 12
    python benchmarks/diagnose_check.py rules /tmp/ck/val /tmp/ck/train
    python benchmarks/diagnose_check.py outside /tmp/ck/val /tmp/ck/val_seed1

`outside` replays the engine's decision with stricter rules on the objects around the reviewed
region (`finetune_check.object_changes`, no labels): objects found on the previous model's
background (`appeared`), lost to the new model's background (`vanished`), any split. A round the
engine kept and a rule refuses counts as rolled back (change 0: the previous model stays; the
engine's settings-only fallback is not replayed).

On GlaS the outside check's window is the whole image (since session 11: before, it stopped 4
columns short of a 775-column image's edge), so the whole-image probabilities here are exactly what
the round's check uses.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_finetune import DATA, TASK, object_score, pick_images  # noqa: E402
from diagnose_rounds import score_dict  # noqa: E402
from src_models.checkpoints import load_checkpoint  # noqa: E402
from selected_weights import for_validation  # noqa: E402  (the weights that have not seen val)
from src_models.data import load_samples  # noqa: E402
from src_models.finetune import finetune, region_mask  # noqa: E402
from src_models.finetune_check import split_check  # noqa: E402
from src_models.inference import predict  # noqa: E402
from src_models.instances import InstanceParams, InstanceMaker  # noqa: E402


def dump(args) -> None:
    torch.set_num_threads(1)
    task = TASK[args.dataset]
    model, card = load_checkpoint(for_validation(task))
    variant = json.loads(args.variant) if args.variant else {}
    names = pick_images(card, args.split, args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p0 = InstanceParams.from_card(card)
    todo = [n for n in names if not (out / f"{n}.npz").exists()]
    for sample in load_samples(DATA / args.dataset / "train", todo):
        image, gt = sample.image, sample.mask
        h, w = gt.shape
        t = time.perf_counter()
        res = finetune(model, image, gt, region=(0, h, 0, w // 2), card=card, **variant)
        seconds = time.perf_counter() - t
        valid = region_mask((0, h, 0, w // 2), (h, w))
        check = split_check(valid, gt, variant.get("check_fraction", 0.25))
        old_prob = predict(model, image, card, device="cpu")
        new_prob = predict(res.trained, image, card, device="cpu")
        new_params = {**asdict(p0), **(res.corrections.get("instance_params") or {})}
        right = slice(w // 2, w)
        before = object_score(task, gt[:, right], InstanceMaker(old_prob, card).labels()[:, right])
        trained = object_score(task, gt[:, right],
                               InstanceMaker(new_prob, card).labels(**new_params)[:, right])
        meta = {"image": sample.name, "split": args.split, "task": task, "variant": variant,
                "kept": res.kept, "weights_kept": res.weights_kept, "reason": res.reason,
                "before": before, "trained": trained, "old_params": asdict(p0),
                "new_params": new_params, "seconds": seconds,
                "check_before": score_dict(res.check_before), "check_after": score_dict(res.check_after),
                "replay_before": score_dict(res.replay_before), "replay_after": score_dict(res.replay_after),
                "outside": res.corrections.get("outside_check"),
                "settings_check": res.corrections.get("settings_check")}
        np.savez_compressed(out / f"{sample.name}.npz", gt=gt, check=check,
                            old=old_prob.astype(np.float16), new=new_prob.astype(np.float16),
                            meta=json.dumps(meta))
        print(f"{sample.name}: before {before:.3f} trained {trained:.3f} ({trained - before:+.3f}) "
              f"kept={res.kept} ({seconds:.1f} s) {res.reason}", flush=True)


def load(path: Path):
    d = np.load(path)
    return (d["gt"], d["check"], d["old"].astype(np.float32), d["new"].astype(np.float32),
            json.loads(str(d["meta"])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("dataset", choices=sorted(TASK))
    d.add_argument("out")
    d.add_argument("variant", nargs="?", default=None)
    d.add_argument("--split", choices=("validation", "train"), default="validation")
    d.add_argument("--images", default=None)
    r = sub.add_parser("rules")
    r.add_argument("folders", nargs="+")
    o = sub.add_parser("outside")
    o.add_argument("folders", nargs="+")
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args)
    elif args.cmd == "outside":
        outside_rules(args)
    else:
        rules(args)
    return 0


def as_score(d):
    from src_models.finetune_check import RegionScore
    if d is None:
        return None
    d = dict(d)
    found = d.pop("found", None)
    return RegionScore(**d, found=tuple(found) if found is not None else None)


LABELLING = ("part", "reviewed", "whole")


def check_scores(gt, check, valid, old, new, meta, card, labelling: str):
    """Old and new model on the held-back part, their objects labelled over the part's box grown by
    CONTEXT ("part"), over the reviewed region's box grown by CONTEXT ("reviewed", where the
    re-choice labels them) or over the whole image ("whole": what the user sees)."""
    from src_models.finetune_check import crop_probabilities, region_box, score_region
    p_old, p_new = InstanceParams(**meta["old_params"]), InstanceParams(**meta["new_params"])
    count_min = max(1, int(p_old.min_size))
    full = (slice(0, gt.shape[0]), slice(0, gt.shape[1]))
    box = {"part": region_box(check), "reviewed": region_box(valid), "whole": full}[labelling]
    return tuple(score_region(crop_probabilities(prob, full, box), box, gt, check, card, p, count_min)
                 for prob, p in ((old, p_old), (new, p_new)))


def judge(b, a, rb, ra, held, outside, rule: str):
    """The engine's decision, or a variant for the checks it refuses as uncheckable: "one" judges a
    one-object check by its scores (pixel Dice may not drop at all) instead of refusing it; "unseen"
    judges a check on which neither model found an object by its pixel Dice (may not drop)."""
    from src_models.finetune_check import judge_outside, judge_round
    kept, why = judge_round(b, a, rb, ra, held, outside=outside)
    if kept or rule == "engine":
        return kept, why
    few = held and b.objects == 1 and why.startswith("rolled back, too few")
    unseen = (held and b.objects >= 2 and why.startswith("rolled back, the check cannot judge"))
    if not ((rule == "one" and few) or (rule in ("unseen", "one") and unseen)):
        return kept, why
    if a.dice < b.dice:
        return False, "pixel Dice dropped"
    ok, why = judge_outside(outside)
    if not ok:
        return False, why
    if rb is not None and ra is not None and ra.dice < rb.dice - 0.01:
        return False, "replay"
    return True, f"kept by {rule}"


def rules(args) -> None:
    from src_models.finetune_check import ObjectChanges
    card = None
    for folder in args.folders:
        print(f"\n## {folder}")
        totals: dict[str, list] = {}
        for path in sorted(Path(folder).glob("*.npz"), key=lambda p: (len(p.stem), p.stem)):
            gt, check, old, new, meta = load(path)
            held = bool(check.any())
            if not held:     # nothing could be held back: the engine checks the trained-on part
                check = np.zeros(gt.shape, bool)
                check[:, :gt.shape[1] // 2] = True
            if card is None:
                card = load_checkpoint(meta["task"])[1]
            gain = meta["trained"] - meta["before"]
            rb, ra = as_score(meta["replay_before"]), as_score(meta["replay_after"])
            outside = ObjectChanges(**{k: v for k, v in meta["outside"].items() if k != "pixels"}) \
                if meta.get("outside") else None
            line = [f"{meta['image']:9s} gain {gain:+.3f} engine kept={str(meta['kept'])[0]}"]
            valid = np.zeros(gt.shape, bool)
            valid[:, :gt.shape[1] // 2] = True
            for labelling in LABELLING:
                b, a = check_scores(gt, check, valid, old, new, meta, card, labelling)
                line.append(f"{labelling}: {b.matched}->{a.matched}/{b.objects} {b.score:.3f}->{a.score:.3f} "
                            f"dice {b.dice:.3f}->{a.dice:.3f} n {b.predicted}->{a.predicted}")
                for rule in ("engine", "unseen", "one"):
                    kept, why = judge(b, a, rb, ra, held, outside, rule)
                    totals.setdefault(f"{labelling}/{rule}", []).append((kept, gain))
                    line.append(f"{rule[0]}{'K' if kept else '-'}")
                line.append(why[:50])
            if outside:
                line.append(f"outside {outside.merged}/{outside.split} ({outside.bridged}/{outside.cut})")
            print(" ".join(line))
        for name, rows in totals.items():
            kept_gain = [g for k, g in rows if k]
            print(f"{name}: kept {len(kept_gain)} of {len(rows)}, mean change "
                  f"{sum(kept_gain) / len(rows):+.4f}, worst kept {min(kept_gain, default=0):+.3f}")


# Outside rules replayed over the rounds the engine kept: name -> passes(changes). "as run" is
# the engine's decision in the dump; the others judge the window taken to the image's edge
# (`finetune_check.outside_snap`): bridges and cuts only (the rule up to session 10), then adding
# found ("appeared") and lost ("vanished") objects, which the engine refuses since session 11
# (`finetune_check.judge_outside`), then stricter ones.
def _bridges_cuts(c) -> bool:
    return c.bridged == 0 and c.cut == 0


def _engine(c) -> bool:
    from src_models.finetune_check import judge_outside
    return judge_outside(c)[0]


OUTSIDE_RULES = {
    "as run": lambda c: True,
    "to the edge: bridges, cuts": _bridges_cuts,
    "+ none appeared": lambda c: _bridges_cuts(c) and c.appeared == 0,
    "+ none vanished (engine)": _engine,
    "+ no split": lambda c: _engine(c) and c.split == 0,
    "+ count unchanged": lambda c: _engine(c) and c.split == 0 and c.merged == 0,
}


def round_outcome(meta, old, new, card):
    """The labels the round leaves the user with, over the whole image: the new weights with their
    settings, or the old weights with the re-chosen settings when only those were kept."""
    if meta["kept"] and not meta.get("weights_kept", True) and meta.get("settings_check"):
        params = {**meta["old_params"], **meta["settings_check"]["instance_params"]}
        return InstanceMaker(old, card).labels(**params)
    return InstanceMaker(new, card).labels(**meta["new_params"])


def outside_rules(args) -> None:
    from src_models.finetune_check import OUTSIDE_MARGIN, object_changes, outside_part, outside_snap
    card = None
    totals: dict[str, list] = {}
    for folder in args.folders:
        print(f"\n## {folder}")
        for path in sorted(Path(folder).glob("*.npz"), key=lambda p: (len(p.stem), p.stem)):
            gt, check, old, new, meta = load(path)
            if card is None:
                card = load_checkpoint(meta["task"])[1]
            valid = np.zeros(gt.shape, bool)
            valid[:, :gt.shape[1] // 2] = True
            outcome = round_outcome(meta, old, new, card)
            gain = meta["trained"] - meta["before"] if meta["kept"] else 0.0
            if meta["kept"] and not meta.get("weights_kept", True):
                right = slice(gt.shape[1] // 2, gt.shape[1])
                gain = object_score(meta["task"], gt[:, right], outcome[:, right]) - meta["before"]
            old_lab = InstanceMaker(old, card).labels(**meta["old_params"])
            ch = object_changes(old_lab, outcome,
                                outside_part(valid, OUTSIDE_MARGIN, outside_snap(card)),
                                max(1, int(meta["old_params"]["min_size"])))
            verdicts = []
            for name, passes in OUTSIDE_RULES.items():
                kept = meta["kept"] and passes(ch)
                totals.setdefault(name, []).append((kept, gain if kept else 0.0))
                verdicts.append("K" if kept else "-")
            print(f"{folder.rstrip('/').split('/')[-1]:12s} {meta['image']:9s} kept={str(meta['kept'])[0]} "
                  f"weights={str(meta.get('weights_kept'))[0]} change {gain:+.3f} "
                  f"objects {ch.old_objects}->{ch.new_objects} merged {ch.merged} ({ch.bridged} bridged) "
                  f"split {ch.split} ({ch.cut} cut) appeared {ch.appeared} vanished {ch.vanished} "
                  f"rules {''.join(verdicts)}", flush=True)
    print("\nrules, over every round above:")
    for name, rows in totals.items():
        kept = [g for k, g in rows if k]
        print(f"{name:26s} kept {len(kept):2d} of {len(rows)}, mean change {sum(g for _, g in rows) / len(rows):+.4f}, "
              f"worst kept {min(kept, default=0):+.3f}, kept below -0.01: {sum(g < -0.01 for g in kept)}")


if __name__ == "__main__":
    sys.exit(main())
