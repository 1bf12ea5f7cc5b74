"""Where a checkpoint calls background foreground on its own training split: the hard negatives
for a continuation run (TrainConfig.focus_crops).

    python benchmarks/find_false_glands.py glands --overlap 0.125 --size 1000 --out FOCUS.json

Runs the checkpoint (a bundled name is replaced by its selected run's weights, as the validation
benchmarks do) on the images of its card's *training* split only (never the validation split),
each image at its own size and mirrored out to --size x --size as bench_overlap.py builds it,
at --overlap, with the card's post-processing. A false-positive region is a connected component of
(predicted objects' foreground AND ground-truth background) of at least --min-area pixels. Its
centre is written in the original image's coordinates (a region found in a mirrored copy is mapped
back through the mirror), so that the training sampler can crop around it; centres of one image
closer than --merge pixels are kept once. One thread unless --threads.

A .safetensors path of final all-image weights (the card's validation split empty) runs on all of
its training images: the hard negatives of a continuation on every image (`--all-images`).
--split val counts the same regions on the validation split, to measure a model (how many false
regions and false objects: predicted objects mostly on background); such a file is a score, never
a training input.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_overlap import mirrored  # noqa: E402


def unmirror(coord: int, length: int) -> int:
    """The original index of `coord` in an axis of `length` padded symmetrically (np.pad mode
    'symmetric', repeated as often as needed)."""
    m = coord % (2 * length)
    return m if m < length else 2 * length - 1 - m


def false_regions(pred: np.ndarray, gt: np.ndarray, min_area: int) -> list[dict]:
    """Components of predicted foreground on ground-truth background with >= min_area pixels:
    centre (row, col) as the component's pixel nearest its centroid, area, and whether the
    predicted objects they belong to mostly lie on background (a false object, not a spill)."""
    from skimage.measure import label, regionprops
    wrong = (pred > 0) & (gt == 0)
    out = []
    for r in regionprops(label(wrong, connectivity=1)):
        if r.area < min_area:
            continue
        coords = r.coords
        cy, cx = r.centroid
        y, x = coords[np.argmin((coords[:, 0] - cy) ** 2 + (coords[:, 1] - cx) ** 2)]
        ids = np.unique(pred[coords[:, 0], coords[:, 1]])
        obj = np.isin(pred, ids)
        out.append({"row": int(y), "col": int(x), "area": int(r.area),
                    "false_object": bool((gt[obj] == 0).mean() > 0.5)})
    return out


def all_image_weights(card) -> bool:
    """The card records a training split and an empty validation split (train_recipe --all-images)."""
    split = card.data_split or {}
    return bool(split.get("train")) and split.get("validation") == []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="bundled name or .safetensors")
    ap.add_argument("--overlap", type=float, default=0.125)
    ap.add_argument("--size", type=int, default=1000, help="mirrored square side (0: native size only)")
    ap.add_argument("--min-area", type=int, default=800)
    ap.add_argument("--merge", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--split", choices=("train", "val"), default="train")
    ap.add_argument("--out", required=True, help="JSON path")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from selected_weights import scored_model, validation_files
    from src_models.evaluate import match_files, read_mask, split_of
    from src_models.image_io import read_image
    from src_models.inference import predict
    from src_models.instances import InstanceMaker
    from src_models.runtime_onnx import model_digest
    from src_models.safe_write import write_text_atomic

    model, card, root = scored_model(args.checkpoint)
    if all_image_weights(card):
        # final all-image weights (an empty validation split): every image is a training image,
        # the hard negatives of a continuation on all images; there is no validation split to score
        if args.split == "val":
            sys.exit(f"{args.checkpoint} was trained on every image: it has no validation split")
        val_files = []
    else:
        val_files = validation_files(card, root)
    names = split_of(card, root / "images", "train")
    val_names = {f[0] for f in val_files}
    assert not val_names & set(names), "the training split overlaps the validation split"
    files = match_files(root / "images", root / "masks", names) if args.split == "train" else val_files
    t0 = time.perf_counter()
    views_named = ["native"] + ([f"mirrored_{args.size}"] if args.size else [])
    images, total = {}, {v: 0 for v in views_named}
    objects, area = dict.fromkeys(views_named, 0), dict.fromkeys(views_named, 0)
    for i, (name, img_path, mask_path) in enumerate(files):
        image = np.asarray(read_image(img_path, lazy=False))[..., :3]
        gt = read_mask(mask_path)
        h, w = gt.shape
        found = []
        views = [("native", image, gt)]
        if args.size:
            views.append((f"mirrored_{args.size}",) + mirrored(image, gt, args.size))
        for view, img, msk in views:
            pred = InstanceMaker(predict(model, img, card, device="cpu", overlap=args.overlap), card).labels()
            regions = false_regions(pred, msk, args.min_area)
            total[view] += len(regions)
            objects[view] += sum(r["false_object"] for r in regions)
            area[view] += sum(r["area"] for r in regions)
            for r in regions:
                r["row"], r["col"] = unmirror(r["row"], h), unmirror(r["col"], w)
                r["view"] = view
                found.append(r)
        kept: list[dict] = []
        for r in sorted(found, key=lambda r: -r["area"]):
            if all((r["row"] - k["row"]) ** 2 + (r["col"] - k["col"]) ** 2 >= args.merge ** 2 for k in kept):
                kept.append(r)
        if kept:
            images[name] = {"shape": [h, w], "centres": kept}
        print(f"{i + 1}/{len(files)} {name}: {len(found)} regions, {len(kept)} kept "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    out = {"checkpoint": args.checkpoint, "weights": model_digest(model), "overlap": args.overlap,
           "size": args.size, "min_area": args.min_area, "merge": args.merge,
           "split": ("train (the card's data_split.train; no validation image)" if args.split == "train"
                     else "val (a measurement: never train on it)"), "images_searched": len(files),
           "regions_per_view": total, "false_objects_per_view": objects, "region_pixels_per_view": area, "centres": sum(len(v["centres"]) for v in images.values()),
           "command": "python benchmarks/find_false_glands.py " + " ".join(sys.argv[1:]),
           "images": images}
    write_text_atomic(Path(args.out), json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "images"}, indent=1))


if __name__ == "__main__":
    main()
