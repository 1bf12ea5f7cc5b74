"""What could a fine-tuning round's keep/rollback check have seen? Runs the round with the engine's
defaults (or the given finetune arguments) on validation images, left half corrected, and records
for the old and the trained weights every signal a check could use - on the held-back part, on the
trained-on part and on every shipped replay crop: the object score, pixel Dice, predicted and
corrected object counts, objects matched - next to the unseen right half's score (ground truth the
round never sees), so decision rules can be compared offline without re-training.

    python benchmarks/finetune_signals.py GlaS train_47,train_49 '{}' /tmp/signals.json [checkpoint]

Appends one JSON row per image to the output file (a list), rewriting it after each image.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src_models.checkpoints import load_checkpoint  # noqa: E402
from src_models.data import load_samples  # noqa: E402
from src_models.finetune import bundled_replay, finetune, region_mask  # noqa: E402
from src_models.finetune_check import compare_labels, split_check  # noqa: E402
from src_models.inference import predict  # noqa: E402
from src_models.instances import InstanceMaker, InstanceParams  # noqa: E402

DATA = Path("/work/shared/data")


def region_signals(gt, pred, part, task, min_size):
    s = compare_labels(np.where(part, gt, 0), np.where(part, pred, 0), task, min_size)
    d = asdict(s)
    d["n_pred"] = int(np.count_nonzero(np.unique(np.where(part, pred, 0))))
    return d


def main(dataset: str, names: str, kwargs: str, out: str, checkpoint: str | None = None) -> None:
    torch.set_num_threads(1)
    task = {"GlaS": "glands", "MoNuSeg": "nuclei"}[dataset]
    model, card = load_checkpoint(checkpoint or task)
    root = DATA / dataset / "train"
    kw = json.loads(kwargs)
    rows = json.loads(Path(out).read_text()) if Path(out).exists() else []
    replay = bundled_replay(card)
    old_params = InstanceParams.from_card(card)
    mins = max(1, int(old_params.min_size))
    for s in load_samples(root, names.split(",")):
        img, gt = s.image, s.mask
        h, w = gt.shape
        left = region_mask((0, h, 0, w // 2), gt.shape)
        right = ~left
        t, c = time.perf_counter(), time.process_time()
        res = finetune(model, img, gt, region=(0, h, 0, w // 2), card=card, **kw)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        new_params = InstanceParams(**{**asdict(old_params), **(res.instance_params or {})})
        check = split_check(left, gt, kw.get("check_fraction", 0.25))
        row = {"image": s.name, "kwargs": kw, "kept": res.kept, "reason": res.reason,
               "wall": wall, "cpu": cpu, "steps": res.steps_done,
               "new_params": asdict(new_params), "corrections": res.corrections}
        for which, m, p in (("old", model, old_params), ("new", res.trained, new_params)):
            prob = predict(m, img, card, device="cpu")
            lab = InstanceMaker(prob, card).labels(**asdict(p))
            row[which] = {"check": region_signals(gt, lab, check, task, mins),
                          "train": region_signals(gt, lab, left & ~check, task, mins),
                          "right": region_signals(gt, lab, right, task, 1),
                          "replay": [region_signals(mk, InstanceMaker(predict(m, im, card, device="cpu"),
                                                                      card).labels(**asdict(p)),
                                                    np.ones(mk.shape, bool), task, mins)
                                     for im, mk in replay]}
        rows.append(row)
        o, n = row["old"], row["new"]
        print(f"{s.name}: right {o['right']['score']:.3f} -> {n['right']['score']:.3f} kept={res.kept} "
              f"check {o['check']['score']:.3f}->{n['check']['score']:.3f} ({o['check']['objects']} obj) "
              f"replay {np.mean([r['score'] for r in o['replay']]):.3f}->"
              f"{np.mean([r['score'] for r in n['replay']]):.3f} {cpu:.1f} CPU s {wall:.1f} wall",
              flush=True)
        tmp = Path(out + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(out)


if __name__ == "__main__":
    main(*sys.argv[1:6])
