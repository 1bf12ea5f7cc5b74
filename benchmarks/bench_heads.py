"""Time a bundled model on a 1000x1000 H&E-like image: probabilities (with and without flip TTA)
and the instance step from the card's settings. Medians of --repeats, wall clock.

    python benchmarks/bench_heads.py [--model glands] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="glands")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    torch.set_num_threads(args.threads)
    from src_models.checkpoints import load_checkpoint
    from src_models.data import load_samples
    from src_models.inference import ModelRunner, predict, select_device
    from src_models.instances import InstanceMaker

    model, card = load_checkpoint(args.model)
    root = "/work/shared/data/GlaS/train" if card.task == "glands" else "/work/shared/data/MoNuSeg/train"
    sample = load_samples(root, [card.data_split["validation"][0]])[0]
    image = np.pad(sample.image, ((0, max(0, 1000 - sample.image.shape[0])),
                                  (0, max(0, 1000 - sample.image.shape[1])), (0, 0)), mode="reflect")[:1000, :1000]
    print(f"| {args.model} (head {card.head}), 1000x1000, {args.threads} threads | median s |\n|---|---|")
    for tta in (False, True):
        runner = ModelRunner(model, select_device("cpu"), tta=tta)
        predict(model, image, card, runner=runner)  # warm-up
        times, post = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            prob = predict(model, image, card, runner=runner)
            t1 = time.perf_counter()
            InstanceMaker(prob, card).labels()
            times.append(t1 - t0)
            post.append(time.perf_counter() - t1)
        print(f"| probabilities{' with flip TTA (4 passes)' if tta else ''} | {np.median(times):.2f} |")
    print(f"| instance step (card settings) | {np.median(post):.2f} |")


if __name__ == "__main__":
    main()
