"""Choose a checkpoint's instance post-processing (threshold, minimum size) on its TRAINING images.

The validation split stays untouched, so the validation scores in the card remain honest. The script
prints a table and the best setting by object F1 (glands) or AJI (nuclei). With --write, it also
stores that setting in the checkpoint's card (the weights are unchanged).

    python scripts/tune_instances.py CHECKPOINT DATA_DIR [--max-images 20] [--write]
"""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("data", help="dataset folder with images/ and masks/")
    ap.add_argument("--max-images", type=int, default=20)
    ap.add_argument("--thresholds", default="0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--min-sizes", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="store the best setting in the checkpoint's card")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from src_models import metrics as M
    from src_models.checkpoints import load_checkpoint, save_checkpoint
    from src_models.data import load_samples, split_names
    from src_models.inference import predict
    from src_models.instances import InstanceMaker

    model, card = load_checkpoint(args.checkpoint)
    train_names, _ = split_names(args.data)
    names = train_names[:: max(1, len(train_names) // args.max_images)][: args.max_images]
    samples = load_samples(args.data, names)
    probs = [predict(model, s.image, card) for s in samples]
    glands = card.task == "glands"
    default_sizes = "100,200,300,500" if glands else "8,12,20,30"
    sizes = [int(v) for v in (args.min_sizes or default_sizes).split(",")]
    thresholds = [float(v) for v in args.thresholds.split(",")]
    key = "object_f1" if glands else "aji"
    rows = []
    for thr, size in itertools.product(thresholds, sizes):
        scores = []
        for s, p in zip(samples, probs):
            labels = InstanceMaker(p, card).labels(threshold=thr, min_size=size)
            scores.append(M.score_all(s.mask, labels, task="glands" if glands else "nuclei"))
        mean = {k: float(np.mean([sc[k] for sc in scores])) for k in (key, "dice")}
        rows.append((thr, size, mean[key], mean["dice"]))
    print(f"{len(samples)} training images of {args.data}; {key} and pixel Dice by setting\n")
    print(f"| threshold | min size | {key} | dice |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]:.2f} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} |")
    best = max(rows, key=lambda r: (r[2], r[3]))
    print(f"\nbest: threshold {best[0]}, min size {best[1]} ({key} {best[2]:.4f})")
    if args.write:
        card.instance_params = dict(card.instance_params) | {"threshold": best[0], "min_size": best[1]}
        card.training = dict(card.training) | {"instance_tuning": {
            "images": names, "criterion": key, "threshold": best[0], "min_size": best[1]}}
        save_checkpoint(model, args.checkpoint, card)
        print(f"wrote the setting into {args.checkpoint}: {json.dumps(card.instance_params)}")


if __name__ == "__main__":
    main()
