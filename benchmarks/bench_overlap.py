"""Object scores at a given tile size against the tile overlap, on validation images mirrored out
to a larger square (where the overlap changes how many tiles cover the image):

    python benchmarks/bench_overlap.py glands --size 1000 --overlaps 0.25,0.125 --out OUT.md
    python benchmarks/bench_overlap.py nuclei --size 2000 --overlaps 0.25,0.125 --out OUT.md

GlaS images (775x522) are covered by the same tiles at overlap 0.25 and 0.125, so the validation
split alone cannot tell the two apart; mirrored to 1000x1000 (as `time_1000.py` does), 384-pixel
tiles need 4x4 tiles at 0.25 and 3x3 at 0.125. Each image and its mask are mirrored the same way;
the mask is relabelled by connected component, so the mirrored copies of a gland are separate
objects and a gland cut by the mirror line stays one. Every overlap sees the same images and
post-processing (the card's); only the tiling differs. One thread unless --threads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def mirrored(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) padded symmetrically at the bottom/right to at least size, then cropped to it;
    the mask relabelled so that every connected object has its own id."""
    from skimage.measure import label
    h, w = mask.shape
    pad = ((0, max(0, size - h)), (0, max(0, size - w)))
    image = np.pad(image, pad + ((0, 0),), mode="symmetric")[:size, :size]
    mask = np.pad(mask, pad, mode="symmetric")[:size, :size]
    return np.ascontiguousarray(image), label(mask, background=0, connectivity=1).astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="bundled name or .safetensors")
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--overlaps", default="0.25,0.125")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="markdown path (a .json is written beside it)")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from src_models.evaluate import read_mask, score_pairs
    from src_models.image_io import read_image
    from src_models.inference import predict, tile_starts
    from src_models.instances import InstanceMaker
    from src_models.runtime_onnx import model_digest
    from src_models.safe_write import write_text_atomic

    from selected_weights import validation_set   # the weights that have not seen val
    model, card, root, files = validation_set(args.checkpoint)
    overlaps = [float(x) for x in args.overlaps.split(",")]
    pairs: dict[float, list] = {o: [] for o in overlaps}
    seconds: dict[float, float] = {o: 0.0 for o in overlaps}
    load_start = os.getloadavg()
    for name, img_path, mask_path in files:
        image, gt = mirrored(np.asarray(read_image(img_path, lazy=False))[..., :3], read_mask(mask_path), args.size)
        for o in overlaps:  # interleaved per image, so machine load falls on every setting alike
            t0 = time.perf_counter()
            prob = predict(model, image, card, device="cpu", overlap=o)
            pred = InstanceMaker(prob, card).labels()
            seconds[o] += time.perf_counter() - t0
            pairs[o].append((name, gt, pred))
    reports = {o: score_pairs(pairs[o], task=card.task) for o in overlaps}
    metrics = ("object_f1", "object_dice", "object_hausdorff", "dice") if card.task == "glands" \
        else ("aji", "pq", "dice")
    tiles = {o: len(tile_starts(args.size, card.tile_size, o)) ** 2 for o in overlaps}
    lines = [f"# Tile overlap against object scores: {args.checkpoint}, validation images mirrored to "
             f"{args.size}x{args.size}", "",
             f"Command: `python benchmarks/bench_overlap.py {args.checkpoint} --size {args.size} "
             f"--overlaps {args.overlaps} --threads {args.threads} --out ...`  ",
             f"{len(files)} images, tile {card.tile_size}, card post-processing; load average "
             f"{load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores; the seconds "
             f"are a loaded machine's, read only their ratio).", "",
             "| overlap | tiles per image | " + " | ".join(metrics) + " | seconds (sum) |",
             "|---|---|" + "---|" * len(metrics) + "---|"]
    out_json = {"checkpoint": args.checkpoint, "weights": model_digest(model), "size": args.size,
                "tile": card.tile_size, "images": [f[0] for f in files], "overlaps": {}}
    for o in overlaps:
        means = {m: float(np.nanmean([r[m] for r in reports[o].rows])) for m in metrics}
        lines.append(f"| {o} | {tiles[o]} | " + " | ".join(f"{means[m]:.4f}" for m in metrics)
                     + f" | {seconds[o]:.1f} |")
        out_json["overlaps"][str(o)] = {"means": means, "tiles": tiles[o], "seconds": seconds[o],
                                        "per_image": [{m: r[m] for m in ("name",) + metrics}
                                                      for r in reports[o].rows]}
    if len(overlaps) == 2:
        a, b = overlaps
        key = metrics[0]
        diff = [rb[key] - ra[key] for ra, rb in zip(reports[a].rows, reports[b].rows)]
        lines += ["", f"Per image, {key} at {b} minus at {a}: better on {sum(d > 1e-9 for d in diff)}, "
                  f"worse on {sum(d < -1e-9 for d in diff)}, equal on {sum(abs(d) <= 1e-9 for d in diff)}; "
                  f"largest drop {min(diff):+.4f}, largest gain {max(diff):+.4f}."]
    out = Path(args.out)
    write_text_atomic(out, "\n".join(lines) + "\n")
    write_text_atomic(out.with_suffix(".json"), json.dumps(out_json, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
