"""`napari-dca train`: train a DCA model on a folder of images/ and masks/."""
from __future__ import annotations

import argparse
import json
import os

from ._cli_bounds import bounded_int, check_range

MAX_TILE = 2048
MAX_TILE_PIXELS_PER_BATCH = 8 * 1024 * 1024   # batch x tile x tile: ~8 GB of activations at k = 0.5


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a model on an annotated folder (images/ + masks/)",
        description="Train a segmentation model on a folder with images/<stem>.png and masks/<stem>.png "
                    "(0 = background, 1..N = objects). A fixed 20%% validation split (grouped by patient "
                    "where known) is held out; the best model by validation Dice is written as a "
                    "checkpoint (.safetensors + .json model card), atomically, at every improvement. "
                    "OUT keeps its own suffix: OUT.safetensors is written unless OUT already ends in "
                    ".safetensors (mymodel.v2 -> mymodel.v2.safetensors + mymodel.v2.json). An existing "
                    "checkpoint is never replaced unless --overwrite (or --resume, which continues its "
                    "run). Ctrl-C or a cancel before the first validation writes nothing; a NaN/inf loss "
                    "stops training and keeps the last good checkpoint.")
    p.add_argument("data", help="dataset folder containing images/ and masks/")
    p.add_argument("-o", "--out", required=True,
                   help="output checkpoint path (.safetensors appended unless it ends in .safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at OUT")
    p.add_argument("--task", default="nuclei", choices=["nuclei", "glands", "semantic"],
                   help="what the masks hold; sets instance defaults stored in the card (default: nuclei)")
    p.add_argument("--arch", default="unet", help="backbone: unet, vnet, r2unet, resunetpp, doubleunet, multiresunet")
    p.add_argument("--no-dca", action="store_true", help="train the backbone without DCA")
    p.add_argument("--width", type=float, default=0.125,
                   help="filter coefficient k, 0.01..4 (paper: 0.5; 0.125 is light enough for laptops)")
    p.add_argument("--model-kwargs", default="{}", help="extra constructor arguments as a JSON object")
    p.add_argument("--protocol", default="tiles", choices=["tiles", "paper"],
                   help="tiles: random crops at native resolution; paper: whole images resized to 224")
    p.add_argument("--tile", type=int, default=256, help=f"training tile size, 32..{MAX_TILE} (default 256)")
    p.add_argument("--batch", type=int, default=8, help="batch size, 1..256 (default 8)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate, >0..1 (default 2e-3)")
    p.add_argument("--val-every", type=int, default=100, help="validate every N steps (default 100)")
    p.add_argument("--patience", type=int, default=10, help="validations without improvement before stopping")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes, keeping the best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--resume", action="store_true", help="continue from <out>.resume.pt")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (same architecture and arguments); "
                        "recorded as the new card's parent")
    p.add_argument("--gap-weight", type=float, default=1.0,
                   help="cross-entropy weight on background gaps between touching objects, which keeps "
                        "them apart (U-Net's border weighting; 1 = off; the bundled glands model used 10)")
    p.add_argument("--gap-radius", type=int, default=6,
                   help="two objects closer than this many pixels form a gap (default 6)")
    return p


def check_options(args) -> dict:
    """ValueError (one line: what, why, what to do) for a bad option; the model kwargs."""
    from src_models.registry import list_models

    if args.arch not in list_models():
        raise ValueError(f"--arch {args.arch!r} is not a known backbone; choose one of {', '.join(list_models())}")
    try:
        extra = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-kwargs is not valid JSON ({err}); give an object such as "
                         f"'{{\"patch_size\": 16}}'") from err
    if not isinstance(extra, dict):
        raise ValueError("--model-kwargs must be a JSON object such as '{\"patch_size\": 16}'")
    check_range("--width", args.width, 0.01, 4.0, "k = 0.5 is the paper's; 4 is already ~64x its size")
    kwargs = {"dca": not args.no_dca, "width": args.width} | extra
    from src_models.card_schema import CARD_HINT, CheckpointError, validate_model_kwargs
    try:
        validate_model_kwargs(args.arch, kwargs)
    except CheckpointError as err:
        message = str(err).replace("model card field 'model_kwargs.", "--model-kwargs field '")
        raise ValueError(message.replace(CARD_HINT, "change --model-kwargs / --width")) from None
    args.tile = bounded_int("--tile", args.tile, 32, MAX_TILE,
                            "smaller tiles hold too little context; larger ones do not fit in memory")
    args.batch = bounded_int("--batch", args.batch, 1, 256, "it is a number of tiles per step")
    tile = 224 if args.protocol == "paper" else args.tile
    if args.batch * tile * tile > MAX_TILE_PIXELS_PER_BATCH:
        raise ValueError(f"--batch {args.batch} x --tile {tile}^2 = {args.batch * tile * tile / 1e6:.0f} M "
                         f"pixels per step is more than {MAX_TILE_PIXELS_PER_BATCH / 1e6:.0f} M (it would "
                         f"need tens of GB); lower --batch or --tile")
    bounded_int("--steps", args.steps, 1, None, "at least one step")
    bounded_int("--val-every", args.val_every, 1, None, "validate every N >= 1 steps")
    bounded_int("--patience", args.patience, 1, None, "validations without improvement")
    check_range("--lr", args.lr, 1e-12, 1.0, "larger rates diverge")
    if args.max_minutes is not None:
        check_range("--max-minutes", args.max_minutes, 1e-6, None, "a time budget")
    check_range("--gap-weight", args.gap_weight, 1.0, 1000.0, "1 = off")
    bounded_int("--gap-radius", args.gap_radius, 1, 100, "a distance in pixels")
    if args.threads is not None:
        args.threads = bounded_int("--threads", args.threads, 1, os.cpu_count() or 1,
                                   "torch cannot use more threads than CPUs usefully", clamp_high=True)
    return kwargs


def check_data(folder: str) -> None:
    from pathlib import Path
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset folder {root}; give a folder with images/ and masks/")
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} has no {sub}/ folder; a dataset folder holds images/<stem>.png "
                                    f"and masks/<stem>.png")


def run(args) -> int:
    kwargs = check_options(args)
    check_data(args.data)
    from src_models.inference import select_device
    from src_models.train import TrainConfig, check_output, train

    select_device(args.device)  # an unavailable device is refused before any data is read
    cfg = TrainConfig(data=args.data, out=args.out, task=args.task, architecture=args.arch,
                      model_kwargs=kwargs, protocol=args.protocol, tile_size=args.tile,
                      batch_size=args.batch, steps=args.steps, lr=args.lr, val_every=args.val_every,
                      patience=args.patience, max_minutes=args.max_minutes, seed=args.seed,
                      threads=args.threads, device=args.device, resume=args.resume,
                      init=args.init, gap_weight=args.gap_weight, gap_radius=args.gap_radius,
                      overwrite=args.overwrite)
    check_output(cfg)
    summary = train(cfg)
    if summary["checkpoint"] is None:
        print(f"{summary['stopped']} after {summary['steps']} steps, before the first validation: "
              f"nothing was written")
        return 1
    best = summary["best"]
    print(f"{summary['checkpoint']}: {summary['steps']} steps in {summary['minutes']:.1f} min "
          f"({summary['stopped']}); validation Dice native {best.get('dice_native', float('nan')):.4f}, "
          f"paper protocol {best.get('dice_paper_protocol', float('nan')):.4f} at step {best.get('step')}")
    return 0


if __name__ == "__main__":  # python -m napari_dca._cli_train ... (same as `napari-dca train ...`)
    import sys

    from .cli import main
    sys.exit(main(["train"] + sys.argv[1:]))
