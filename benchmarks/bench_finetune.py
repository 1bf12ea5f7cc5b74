"""Does one fine-tuning round help, and how long does it take on a CPU?

Scenario: a pathologist opens a held-out image (from the validation split, never trained on),
corrects the labels of its LEFT half and asks the model to learn. We fine-tune on the left half's
ground truth (region = left half) and measure on the RIGHT half, which the round never saw:
pixel Dice, AJI and PQ before and after, and the wall time of the round on CPU threads.

    python benchmarks/bench_finetune.py                       # nuclei (MoNuSeg), 2 threads
    python benchmarks/bench_finetune.py --dataset GlaS --checkpoint glands
    python benchmarks/bench_finetune.py --checkpoint runs/nuclei.safetensors --modes all,decoder

Without a usable checkpoint (the bundled defaults are absent before they are trained) a tiny
U-Net + DCA is trained briefly on the dataset's training split first (`--pretrain-seconds`) and
cached (`--cache`), so the numbers then describe that weak model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src_models import build_model  # noqa: E402
from src_models import metrics as M  # noqa: E402
from src_models.checkpoints import card_for, load_checkpoint, save_checkpoint  # noqa: E402
from src_models.data import load_samples, split_names  # noqa: E402
from src_models.finetune import finetune  # noqa: E402
from src_models.inference import predict  # noqa: E402
from src_models.instances import InstanceMaker  # noqa: E402

DATA = Path("/work/shared/data")
TASK = {"MoNuSeg": "nuclei", "GlaS": "glands"}


def quick_model(root: Path, task: str, seconds: float, cache: Path, seed: int = 0):
    """A tiny U-Net + DCA trained for `seconds` on random 128-pixel crops of the training split."""
    if cache.exists():
        return load_checkpoint(cache)
    from src_models.augment import AugmentConfig, geometric, random_crop
    from src_models.losses import dice_ce_loss
    from src_models.preprocess import DEFAULT_NORMALIZATION, as_float01, normalize
    train_names, val_names = split_names(root)
    samples = load_samples(root, train_names)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model("unet", width=0.125, patch_size=16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    aug = AugmentConfig(affine_p=0.0)
    model.train()
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        xs, ys = [], []
        for _ in range(4):
            s = samples[rng.integers(len(samples))]
            img, msk = geometric(*random_crop(s.image, s.mask, 128, rng), aug, rng)
            xs.append(normalize(as_float01(img), DEFAULT_NORMALIZATION))
            ys.append((msk > 0).astype(np.int64))
        loss = dice_ce_loss(model(torch.from_numpy(np.stack(xs))), torch.from_numpy(np.stack(ys)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    print(f"(no checkpoint: trained a tiny model for {step} steps, {time.perf_counter() - t0:.0f} s; "
          f"cached at {cache})")
    card = card_for(model, task=task, tile_size=256,
                    data_split={"dataset": root.parent.name, "train": train_names, "validation": val_names},
                    trained_on=f"bench_finetune quick model, {step} steps")
    save_checkpoint(model, cache, card)
    return load_checkpoint(cache)


def half_scores(gt: np.ndarray, labels: np.ndarray, half: slice, task: str) -> dict[str, float]:
    g, p = gt[:, half], labels[:, half]
    out = {"dice": M.dice(g, p)}
    if task == "nuclei":
        out["aji"] = M.aji(g, p)
        out["pq"] = M.panoptic_quality(g, p).pq
    else:
        out["obj_f1"] = M.object_f1(g, p).f1
        out["obj_dice"] = M.object_dice(g, p)
    return out


def segment(model, card, image) -> np.ndarray:
    prob = predict(model, image, card, device="cpu")
    return InstanceMaker(prob, card).labels()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["MoNuSeg", "GlaS"], default="MoNuSeg")
    ap.add_argument("--checkpoint", default=None, help="default: the bundled nuclei / glands model")
    ap.add_argument("--image", default=None, help="validation image name (default: the first)")
    ap.add_argument("--crop", type=int, default=512,
                    help="use the central CROPxCROP part of the image (0 = whole image)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--modes", default="all", help="comma-separated: all, decoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pretrain-seconds", type=float, default=150)
    ap.add_argument("--cache", default="/tmp/napari_dca_bench_finetune_{dataset}.safetensors")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    root = DATA / args.dataset / "train"
    task = TASK[args.dataset]
    name = args.checkpoint or task
    try:
        model, card = load_checkpoint(name)
        source = name
    except (ValueError, FileNotFoundError) as err:
        print(f"(checkpoint {name!r} unavailable: {err})")
        model, card = quick_model(root, task, args.pretrain_seconds,
                                  Path(args.cache.format(dataset=args.dataset)))
        source = "quick tiny model"
    val = (card.data_split or {}).get("validation") or split_names(root)[1]
    image_name = args.image or val[0]
    if image_name not in val:
        print(f"warning: {image_name} is not in the model's validation split")
    sample = load_samples(root, [image_name])[0]
    image, gt = sample.image, sample.mask
    if args.crop and min(gt.shape) > args.crop:
        y0, x0 = (gt.shape[0] - args.crop) // 2, (gt.shape[1] - args.crop) // 2
        image, gt = image[y0:y0 + args.crop, x0:x0 + args.crop], gt[y0:y0 + args.crop, x0:x0 + args.crop]
    h, w = gt.shape
    left, right = slice(0, w // 2), slice(w // 2, w)

    t = time.perf_counter()
    before = segment(model, card, image)
    t_pred = time.perf_counter() - t
    rows = [("before", half_scores(gt, before, left, task), half_scores(gt, before, right, task),
             None, None)]
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        t, c = time.perf_counter(), time.process_time()
        res = finetune(model, image, gt, region=(0, h, 0, w // 2), steps=args.steps, lr=args.lr,
                       train=mode, tile_size=args.tile, card=card, batch_size=args.batch)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        res.cpu_seconds = cpu
        after = segment(res.model, card, image)
        rows.append((f"after ({mode})", half_scores(gt, after, left, task),
                     half_scores(gt, after, right, task), seconds, res))

    print(f"\nfine-tuning round: {args.dataset} validation image {image_name} "
          f"({h}x{w}{', central crop' if args.crop else ''}), model: {source} "
          f"({card.architecture}, width {card.model_kwargs.get('width')}), CPU, {args.threads} threads")
    print(f"corrections: left half, {int(np.count_nonzero(np.unique(gt[:, left])))} objects; "
          f"scored on the right half; {args.steps} steps, batch {args.batch}, tile {args.tile}, "
          f"lr {args.lr}; one prediction of the image: {t_pred:.1f} s\n")
    keys = list(rows[0][1])
    head = (["model"] + [f"left {k}" for k in keys] + [f"RIGHT {k}" for k in keys]
            + ["round s", "s/step", "CPU s", "loss first->last"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, ls, rs, seconds, res in rows:
        cells = [label] + [f"{ls[k]:.4f}" for k in keys] + [f"{rs[k]:.4f}" for k in keys]
        if res is None:
            cells += ["", "", "", ""]
        else:
            hist = res.loss_history
            cells += [f"{seconds:.1f}", f"{seconds / max(1, res.steps_done):.2f}", f"{res.cpu_seconds:.1f}",
                      f"{np.mean(hist[:3]):.3f} -> {np.mean(hist[-3:]):.3f}"]
        print("| " + " | ".join(cells) + " |")
    base = rows[0][2]["dice"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for label, _, rs, seconds, res in rows[1:]:
        # CPU time / threads = the wall time the round would take with the threads to itself
        alone = res.cpu_seconds / args.threads
        print(f"\n{label}: right-half Dice {base:.4f} -> {rs['dice']:.4f} "
              f"({'up' if rs['dice'] > base else 'NOT up'}); round {seconds:.1f} s wall "
              f"({'within' if seconds <= 60 else 'over'} 60 s) at load average {load:.1f} on "
              f"{os.cpu_count()} cores; {res.cpu_seconds:.1f} CPU s = ~{alone:.0f} s on {args.threads} "
              f"uncontended threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
