"""How far the chunked instance step's labels are from the whole-image labels of the same probabilities.

    python benchmarks/chunk_seams.py CHECKPOINT [--image PATH] [--size 2048] [--chunks 512:64,1024:128,2048:64]

The probabilities of one image (default: the first GlaS training image by name, mirrored out to
--size x --size as benchmarks/time_1000.py builds it) are labelled twice with the card's
post-processing: whole (`instances.probabilities_to_labels`) and chunk by chunk
(`chunked_instances.chunked_labels`, the rule the card's mode uses) for each CHUNK:MARGIN. Printed
per setting: objects in each, pixels whose foreground differs, and the largest region of
difference (where it is, its mean foreground probability, and the whole-image object it belongs
to). A difference is what each window decides alone: a gland's lumen that is a hole of the object
in the whole image but open to the window's edge is not filled, and per-object filters
(min_size, min_mean_prob) see a window's part of an object, not all of it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def settings(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]


def largest_difference(diff: np.ndarray, whole: np.ndarray, fg: np.ndarray) -> str:
    from scipy import ndimage as ndi
    regions, n = ndi.label(diff)
    if n == 0:
        return "-"
    sizes = np.bincount(regions.ravel())[1:]
    k = int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(regions == k)
    ids = [int(i) for i in np.unique(whole[regions == k]) if i]
    return (f"{int(sizes[k - 1])} px at y {ys.min()}-{ys.max()}, x {xs.min()}-{xs.max()}, mean foreground "
            f"probability {fg[regions == k].mean():.2f}, whole-image object(s) {ids or 'none'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--image", default=None, help="an RGB image (default: GlaS, see above)")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--chunks", default="512:64,1024:128,2048:64", help="CHUNK:MARGIN,...")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from src_models.checkpoints import load_checkpoint
    from src_models.chunked_instances import chunked_labels, rule_for
    from src_models.inference import predict
    from src_models.instances import InstanceParams, foreground_probability, probabilities_to_labels
    from time_1000 import DATASET_FOR_TASK, he_image

    model, card = load_checkpoint(args.checkpoint)
    if args.image:
        import imageio.v3 as iio
        image, source = np.asarray(iio.imread(args.image))[..., :3], args.image
    else:
        image, source = he_image(args.size, DATASET_FOR_TASK.get(card.task, "GlaS"))
    prob = predict(model, image, card, device="cpu")
    label = lambda p: probabilities_to_labels(p, card)  # noqa: E731
    whole = label(prob)
    fg = foreground_probability(prob, prob.ndim == 3)
    rule = rule_for(InstanceParams.from_card(card))
    print(f"{args.checkpoint}: {source}, {image.shape[1]}x{image.shape[0]}, rule {rule!r}, "
          f"{int(whole.max())} objects whole\n")
    print("| chunk | margin | objects | foreground pixels that differ | largest difference |")
    print("|---|---|---|---|---|")
    for chunk, margin in settings(args.chunks):
        labels = chunked_labels(prob, label, rule, chunk=chunk, margin=margin)
        diff = (labels > 0) != (whole > 0)
        print(f"| {chunk} | {margin} | {int(labels.max())} | {int(diff.sum())} "
              f"| {largest_difference(diff, whole, fg)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
