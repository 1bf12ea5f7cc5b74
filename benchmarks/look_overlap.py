"""A picture of what the tile overlap changes on one validation image mirrored to a square, as
bench_overlap.py scores it: per overlap one row of (foreground probability, predicted objects'
foreground, ground-truth foreground), at half resolution.

    python benchmarks/look_overlap.py glands train_21 --overlaps 0.25,0.125 --out OUT.png
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
    ap.add_argument("checkpoint", help="bundled name or .safetensors")
    ap.add_argument("image", help="image name without extension, e.g. train_21")
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--overlaps", default="0.25,0.125")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args()
    import imageio.v3 as iio
    import torch
    from selected_weights import validation_set
    from src_models.evaluate import read_mask
    from src_models.image_io import read_image
    from src_models.inference import predict
    from src_models.instances import InstanceMaker, foreground_probability
    from src_models.safe_write import write_atomic
    torch.set_num_threads(args.threads)
    model, card, root, _ = validation_set(args.checkpoint)
    image = np.asarray(read_image(next((root / "images").glob(args.image + ".*")), lazy=False))[..., :3]
    gt = read_mask(next((root / "masks").glob(args.image + ".*")))
    image, gt = mirrored(image, gt, args.size)
    rows = []
    for overlap in (float(o) for o in args.overlaps.split(",")):
        prob = predict(model, image, card, device="cpu", overlap=overlap)
        labels = InstanceMaker(prob, card, mode=card.task).labels()
        fg = foreground_probability(prob, prob.ndim == 3)
        rows.append(np.concatenate([(fg * 255).astype(np.uint8), np.where(labels > 0, 255, 0).astype(np.uint8),
                                    np.where(gt > 0, 255, 0).astype(np.uint8)], axis=1))
        print(f"overlap {overlap}: row {len(rows)}")
    picture = np.ascontiguousarray(np.concatenate(rows, axis=0)[::2, ::2])
    write_atomic(Path(args.out), lambda tmp: iio.imwrite(tmp, picture, extension=".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
