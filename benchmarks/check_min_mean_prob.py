"""Is an object lost to the card's `min_mean_prob` filter? For one validation image mirrored to a
square (as bench_overlap.py builds it), per checkpoint: pixel Dice and object count with the card's
min_mean_prob and with the filter off, and the largest object's mean foreground probability.

    python benchmarks/check_min_mean_prob.py train_35 CKPT [CKPT ...] [--size 1000 --overlap 0.25]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_overlap import mirrored  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--overlap", type=float, default=0.25)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from skimage.measure import regionprops
    from selected_weights import validation_set
    from src_models.evaluate import read_mask
    from src_models.image_io import read_image
    from src_models.inference import predict
    from src_models.instances import InstanceMaker, foreground_probability
    from src_models.metrics import pixel_scores
    for ck in args.checkpoints:
        model, card, root, _ = validation_set(ck)
        img, gt = mirrored(np.asarray(read_image(next((root / "images").glob(args.image + ".*")), lazy=False))[..., :3],
                           read_mask(next((root / "masks").glob(args.image + ".*"))), args.size)
        prob = predict(model, img, card, device="cpu", overlap=args.overlap)
        fg = foreground_probability(prob, prob.ndim == 3)
        kept = card.instance_params.get("min_mean_prob", 0.0)
        for mmp in (kept, 0.0):
            card.instance_params["min_mean_prob"] = mmp
            lab = InstanceMaker(prob, card).labels()
            print(f"{ck}: min_mean_prob {mmp}: pixel Dice {pixel_scores(gt > 0, lab > 0)['dice']:.3f}, "
                  f"{lab.max()} objects")
        big = max(regionprops(lab), key=lambda r: r.area)
        print(f"  largest object with the filter off: {big.area:.0f} px, mean foreground probability "
              f"{fg[lab == big.label].mean():.3f} (the card drops objects under {kept})")


if __name__ == "__main__":
    main()
