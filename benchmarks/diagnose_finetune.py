"""Why does a glands round merge or split glands? One training variant at a time, on a few
validation images: left half corrected (ground truth), right half scored, the TRAINED weights
(whatever the round's check decides) with the card's post-processing, nothing re-chosen.

    python benchmarks/diagnose_finetune.py GlaS train_2,train_21 \
        '[{"tile_size": 512}, {"tile_size": 256}, {"tile_size": 256, "replay_n": 4}]'

Each variant is a JSON object of `finetune` arguments (no check part, no re-chosen settings, no
replay unless given) plus "replay_n": that many training images of the card (data_split) as replay,
and "bn_train": true to let BatchNorm layers run in training mode (batch statistics, running
statistics updated). Prints per variant: the right half's score (object F1 / AJI) and object count,
that score at thresholds 0.5 / 0.65 / 0.8, and the mean probability on the right half's background
and foreground before -> after.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src_models import finetune as F  # noqa: E402
from src_models import metrics as M  # noqa: E402
from src_models.checkpoints import load_checkpoint  # noqa: E402
from selected_weights import for_validation  # noqa: E402  (the weights that have not seen val)
from src_models.data import load_samples  # noqa: E402
from src_models.inference import predict  # noqa: E402
from src_models.instances import InstanceMaker  # noqa: E402

DATA = Path("/work/shared/data")


def main(dataset: str, names: str, variants: str) -> None:
    torch.set_num_threads(1)
    task = {"GlaS": "glands", "MoNuSeg": "nuclei"}[dataset]
    model, card = load_checkpoint(for_validation(task))
    root = DATA / dataset / "train"

    def score(gt, lab, cols):
        g, p = gt[:, cols], lab[:, cols]
        return M.object_f1(g, p).f1 if task == "glands" else M.aji(g, p)

    def count(lab, cols):
        return len(np.unique(lab[:, cols])) - 1

    frozen = F._freeze_batchnorm
    for s in load_samples(root, names.split(",")):
        img, gt = s.image, s.mask
        h, w = gt.shape
        right = slice(w // 2, w)
        p0 = predict(model, img, card, device="cpu")
        lab0 = InstanceMaker(p0, card).labels()
        print(f"{s.name} {h}x{w}: right half {count(gt, right)} objects; before: "
              f"{score(gt, lab0, right):.3f} ({count(lab0, right)} objects)", flush=True)
        for v in json.loads(variants):
            v = dict(v)
            bn_train, n_replay = v.pop("bn_train", False), v.pop("replay_n", 0)
            F._freeze_batchnorm = (lambda m: None) if bn_train else frozen
            replay = F.replay_from_card(card, root, max_images=n_replay) if n_replay else None
            kw = dict(steps=30, card=card, check_fraction=0, rechoose_postprocessing=False)
            kw.update(v)
            t = time.perf_counter()
            res = F.finetune(model, img, gt, region=(0, h, 0, w // 2), replay=replay, **kw)
            seconds = time.perf_counter() - t
            F._freeze_batchnorm = frozen
            p1 = predict(res.trained, img, card, device="cpu")
            maker = InstanceMaker(p1, card)
            lab1 = maker.labels()
            sweep = " ".join(f"t{t}: {score(gt, maker.labels(threshold=t), right):.2f}"
                             for t in (0.5, 0.65, 0.8))
            bg, fg = gt[:, right] == 0, gt[:, right] > 0
            print(f"  {json.dumps(v)} bn_train={bn_train} replay={n_replay}: right "
                  f"{score(gt, lab1, right):.3f} ({count(lab1, right)} objects) [{sweep}] "
                  f"P(bg) {p0[:, right][bg].mean():.3f}->{p1[:, right][bg].mean():.3f} "
                  f"P(fg) {p0[:, right][fg].mean():.3f}->{p1[:, right][fg].mean():.3f} "
                  f"loss {np.mean(res.loss_history[:3]):.3f}->{np.mean(res.loss_history[-3:]):.3f} "
                  f"{seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
