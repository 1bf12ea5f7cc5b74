"""The instance step (probabilities -> labels) as shipped against the plain scipy/skimage calls it
replaced, on the bundled models' probabilities of the shared training images: same labels?
how much faster? Prints a markdown table.

    python benchmarks/bench_instance_step.py [--max-images N] [--threads 1]

"plain" is the same InstanceMaker with `instances.flood` replaced by one
`skimage.segmentation.watershed` over the whole image and `instances.fill_holes` by
`scipy.ndimage.binary_fill_holes` (what the step ran before). The two alternate per image; the
times are sums over the images. Probabilities come from `predict` (exported graph when available).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("NAPARI_DCA_SHARED", REPO.parent / "shared"))


def plain_flood(image, markers, mask, comps=None):
    from skimage.segmentation import watershed
    return watershed(image, markers, mask=mask).astype(np.int32)


def timed_labels(prob, card, plain: bool):
    from scipy import ndimage as ndi
    from src_models import instances
    saved = instances.flood, instances.fill_holes
    if plain:
        instances.flood, instances.fill_holes = plain_flood, ndi.binary_fill_holes
    try:
        start = time.perf_counter()
        labels = instances.InstanceMaker(prob, card).labels()
        return labels, time.perf_counter() - start
    finally:
        instances.flood, instances.fill_holes = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-images", type=int, default=None, help="first N images of each data set")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import imageio.v3 as iio
    import torch
    torch.set_num_threads(args.threads)
    from src_models.checkpoints import load_checkpoint
    from src_models.inference import predict
    print(f"load average {os.getloadavg()[0]:.1f} at the start\n")
    print("| model | images | labels identical | plain s | shipped s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, dataset in (("glands", "GlaS"), ("nuclei", "MoNuSeg")):
        model, card = load_checkpoint(name)
        files = sorted((SHARED / "data" / dataset / "train" / "images").glob("*.png"))
        files = files[:args.max_images] if args.max_images else files
        same, plain_s, shipped_s = 0, 0.0, 0.0
        for i, path in enumerate(files):
            prob = predict(model, np.asarray(iio.imread(path))[..., :3], card, device="cpu",
                           runtime="auto")
            order = (True, False) if i % 2 else (False, True)
            results = {plain: timed_labels(prob, card, plain) for plain in order}
            plain_s += results[True][1]
            shipped_s += results[False][1]
            same += bool(np.array_equal(results[True][0], results[False][0]))
        print(f"| {name} | {len(files)} {dataset} training images | {same} of {len(files)} | "
              f"{plain_s:.1f} | {shipped_s:.1f} | {plain_s / shipped_s:.2f}x |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
