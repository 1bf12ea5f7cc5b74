"""How long does one fine-tuning round take, per setting? Rounds of each variant alternate (A, B,
A, B, ...) in one process after a warm-up round (torch's one-time imports), so a loaded machine
slows them alike; prints CPU and wall seconds per round, medians, and the load average.

    python benchmarks/time_finetune.py GlaS train_12 '[{"replay_per_batch": 1}, {"replay_per_batch": 2}]' 2

Each variant is a JSON object of `finetune` arguments; the round corrects the image's left half with
its ground truth, as bench_finetune does.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src_models.checkpoints import load_checkpoint  # noqa: E402
from selected_weights import for_validation  # noqa: E402  (the weights that have not seen val)
from src_models.data import load_samples  # noqa: E402
from src_models.finetune import finetune  # noqa: E402


def main(dataset: str, name: str, variants: str, repeats: str = "2") -> None:
    torch.set_num_threads(1)
    task = {"GlaS": "glands", "MoNuSeg": "nuclei"}[dataset]
    model, card = load_checkpoint(for_validation(task))
    s = load_samples(Path("/work/shared/data") / dataset / "train", [name])[0]
    h, w = s.mask.shape
    region = (0, h, 0, w // 2)
    finetune(model, s.image, s.mask, region=region, card=card, steps=1)   # warm-up
    variants = json.loads(variants)
    times: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(variants))}
    for _ in range(int(repeats)):
        for i, v in enumerate(variants):
            c, t = time.process_time(), time.perf_counter()
            res = finetune(model, s.image, s.mask, region=region, card=card, **v)
            times[i].append((time.process_time() - c, time.perf_counter() - t))
            print(f"{json.dumps(v)}: {times[i][-1][0]:.1f} CPU s, {times[i][-1][1]:.1f} s wall (check "
                  f"{res.corrections['check_seconds']:.1f} s wall), load {os.getloadavg()[0]:.1f}",
                  flush=True)
    for i, v in enumerate(variants):
        cpu, wall = np.median([t[0] for t in times[i]]), np.median([t[1] for t in times[i]])
        print(f"median {json.dumps(v)}: {cpu:.1f} CPU s, {wall:.1f} s wall")
    print(f"load average (1, 5, 15 min): {os.getloadavg()} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main(*sys.argv[1:5])
