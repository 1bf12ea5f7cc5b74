"""Object scores of a checkpoint when the model sees its validation images resampled by a zoom
factor (input upsampled by ZOOM, probabilities resampled back to the image, the card's
post-processing at native resolution): does a nuclei model gain from more pixels per nucleus?

    python benchmarks/bench_zoom.py nuclei --zooms 1,1.25,1.5 [--threads 1]

Prints one line per zoom: seconds, the mean scores, predicted and true object counts per image.
`zoom_predict` is also what `train_zoomed.py` validates with.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def zoom_predict(model, image, card=None, zoom: float = 1.0, **kwargs):
    """inference.predict on `image` resampled by `zoom` (bilinear), the probabilities resampled
    back to the image's size (area-averaged when shrinking)."""
    from skimage.transform import resize
    from src_models.inference import predict
    if zoom == 1:
        return predict(model, image, card, **kwargs)
    h, w = image.shape[:2]
    up = resize(image, (round(h * zoom), round(w * zoom)) + image.shape[2:], order=1,
                preserve_range=True, anti_aliasing=False).astype(image.dtype)
    prob = predict(model, up, card, **kwargs)
    shape = (prob.shape[0], h, w) if prob.ndim == 3 else (h, w)
    return resize(prob, shape, order=1, preserve_range=True, anti_aliasing=zoom > 1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="bundled name or .safetensors (a bundled model: its selected run)")
    ap.add_argument("--zooms", default="1,1.25,1.5")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    from selected_weights import validation_set
    from src_models.evaluate import read_mask, score_pairs
    from src_models.image_io import read_image
    from src_models.instances import InstanceMaker
    torch.set_num_threads(args.threads)
    model, card, _, files = validation_set(args.checkpoint)
    images = [(n, np.asarray(read_image(i, lazy=False))[..., :3], read_mask(m)) for n, i, m in files]
    for zoom in (float(z) for z in args.zooms.split(",")):
        t0 = time.perf_counter()

        def pairs():
            for name, image, gt in images:
                prob = zoom_predict(model, image, card, zoom=zoom, device="cpu")
                yield name, gt, InstanceMaker(prob, card, mode=card.task).labels()
        report = score_pairs(pairs(), task=card.task)
        means = {k: round(v, 4) for k, v in report.overall.items()}
        print(f"zoom {zoom}: {time.perf_counter() - t0:.1f} s, {means}, predicted objects "
              f"{[r['objects_pred'] for r in report.rows]}, true {[r['objects_gt'] for r in report.rows]}",
              flush=True)


if __name__ == "__main__":
    main()
