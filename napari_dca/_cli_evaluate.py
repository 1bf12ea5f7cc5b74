"""`napari-dca evaluate`: score a checkpoint on annotated images (per-image + mean table)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="score a checkpoint (or existing label images) against ground-truth masks",
        description="Segment every image of --images with a checkpoint (tiled, as `segment` does), "
                    "compare with the mask of the same name in --masks (0 = background, one id per "
                    "object) and write OUT as a markdown table and JSON: one row per image and the "
                    "mean. Scores: pixel Dice/IoU at native resolution and at 224x224 (the DCA "
                    "paper's protocol); glands: GlaS object F1, object Dice, object Hausdorff; "
                    "nuclei: AJI and panoptic quality.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--checkpoint", default=None, metavar="NAME|PATH",
                   help="bundled model name (nuclei, glands) or a .safetensors checkpoint; "
                        "not needed with --predictions")
    p.add_argument("--images", metavar="DIR", help="folder of images")
    p.add_argument("--masks", required=True, metavar="DIR", help="folder of ground-truth label masks")
    p.add_argument("--predictions", metavar="DIR", default=None,
                   help="score these label images (same file stems) instead of running a model")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--names", metavar="FILE", help="text file with one image name (stem) per line")
    which.add_argument("--split", choices=["val", "train", "all"], default="all",
                       help="which images: the checkpoint's recorded validation/training split "
                            "(its card's data_split; else the folder's seeded split), or all")
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="folder (gets evaluation.md + evaluation.json) or a .md/.json file path")
    p.add_argument("--task", choices=["nuclei", "glands", "semantic", "all"], default=None,
                   help="which object scores (default: the checkpoint's task; nuclei with --predictions)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="tile size (default: the checkpoint's training tile size)")
    p.add_argument("--overlap", type=float, default=None, metavar="F",
                   help="fraction of a tile shared with each neighbour (0 <= F <= 0.9; default: the "
                        "checkpoint's, else 0.25), as in segment")
    p.add_argument("--tta", action="store_true", help="average the four flips")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: card's)")
    p.add_argument("--min-size", type=int, default=None, metavar="PIXELS",
                   help="drop objects smaller than this (default: card's)")
    p.add_argument("--save-labels", metavar="DIR", default=None, help="also write predicted labels here (NAME.EXT.labels.tif, as segment names them)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch")
    return p


def load_model(checkpoint: str, device: str):
    """(model, card); separate so tests can substitute a tiny model."""
    from src_models.checkpoints import load_checkpoint
    return load_checkpoint(checkpoint, device=device)


def _names(args, card) -> list[str] | None:
    if args.names:
        return [ln.strip() for ln in Path(args.names).read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    from src_models.evaluate import split_of
    return split_of(card, args.images or args.predictions, args.split)


def _check_folders(args) -> None:
    for option, folder in (("--images", args.images), ("--masks", args.masks),
                           ("--predictions", args.predictions), ("--save-labels", None)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{option} {folder}: no such folder")
    if args.names and not Path(args.names).is_file():
        raise FileNotFoundError(f"--names {args.names}: no such file")


def _check_options(args) -> None:
    from ._cli_bounds import check_inference_options
    check_inference_options(args)


def run(args) -> int:
    from src_models.evaluate import evaluate_folder, evaluate_predictions

    try:
        _check_options(args)
        _check_folders(args)
        if args.predictions:
            names = _names(args, None) if (args.names or args.split != "all") else None
            report = evaluate_predictions(args.predictions, args.masks, names, task=args.task or "nuclei")
        else:
            if not args.checkpoint or not args.images:
                raise ValueError("give --checkpoint and --images (or --predictions DIR to score labels "
                                 "already on disk)")
            import torch
            from tqdm import tqdm

            from src_models.inference import select_device
            if args.threads:
                torch.set_num_threads(args.threads)
            device = select_device(args.device)
            model, card = load_model(args.checkpoint, str(device))
            names = _names(args, card)
            bar = tqdm(total=len(names) if names else None, desc="evaluate", unit="image", file=sys.stderr)

            def progress(i, n, name):
                bar.total = n
                bar.set_postfix_str(name)
                bar.update(1)

            settings = {k: v for k, v in (("threshold", args.threshold), ("min_size", args.min_size))
                        if v is not None}
            report = evaluate_folder(model, card, args.images, args.masks, names, task=args.task,
                                     predict_kwargs={"tile_size": args.tile, "device": device,
                                                     "tta": args.tta, "overlap": args.overlap},
                                     instance_settings=settings, progress=progress,
                                     save_labels=args.save_labels)
            bar.close()
            report.meta.update({"checkpoint": str(args.checkpoint), "split": args.split
                                if not args.names else f"names from {args.names}"})
    except (FileNotFoundError, ValueError) as err:  # CheckpointError is a ValueError
        print(f"napari-dca evaluate: error: {err}", file=sys.stderr)
        return 2
    md, js = report.write(args.out)
    print(report.to_markdown())
    print(f"wrote {md} and {js}")
    return 0
