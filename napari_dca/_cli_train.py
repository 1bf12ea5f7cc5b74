"""`napari-dca train`: train a DCA model on a folder of images/ and masks/."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a model on an annotated folder (images/ + masks/)",
        description="Train a segmentation model on a folder with images/<stem>.png and masks/<stem>.png "
                    "(0 = background, 1..N = objects). A fixed 20%% validation split (grouped by patient "
                    "where known) is held out; the best model by validation Dice is written as a "
                    "checkpoint (.safetensors + .json model card).")
    p.add_argument("data", help="dataset folder containing images/ and masks/")
    p.add_argument("-o", "--out", required=True, help="output checkpoint path (.safetensors)")
    p.add_argument("--task", default="nuclei", choices=["nuclei", "glands", "semantic"],
                   help="what the masks hold; sets instance defaults stored in the card (default: nuclei)")
    p.add_argument("--arch", default="unet", help="backbone: unet, vnet, r2unet, resunetpp, doubleunet, multiresunet")
    p.add_argument("--no-dca", action="store_true", help="train the backbone without DCA")
    p.add_argument("--width", type=float, default=0.125,
                   help="filter coefficient k (paper: 0.5; 0.125 is light enough for laptops)")
    p.add_argument("--model-kwargs", default="{}", help="extra constructor arguments as JSON")
    p.add_argument("--protocol", default="tiles", choices=["tiles", "paper"],
                   help="tiles: random crops at native resolution; paper: whole images resized to 224")
    p.add_argument("--tile", type=int, default=256, help="training tile size (default 256)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
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


def run(args) -> int:
    from src_models.train import TrainConfig, train

    kwargs = {"dca": not args.no_dca, "width": args.width} | json.loads(args.model_kwargs)
    cfg = TrainConfig(data=args.data, out=args.out, task=args.task, architecture=args.arch,
                      model_kwargs=kwargs, protocol=args.protocol, tile_size=args.tile,
                      batch_size=args.batch, steps=args.steps, lr=args.lr, val_every=args.val_every,
                      patience=args.patience, max_minutes=args.max_minutes, seed=args.seed,
                      threads=args.threads, device=args.device, resume=args.resume,
                      init=args.init, gap_weight=args.gap_weight, gap_radius=args.gap_radius)
    summary = train(cfg)
    best = summary["best"]
    print(f"{summary['checkpoint']}: {summary['steps']} steps in {summary['minutes']:.1f} min "
          f"({summary['stopped']}); validation Dice native {best.get('dice_native', float('nan')):.4f}, "
          f"paper protocol {best.get('dice_paper_protocol', float('nan')):.4f} at step {best.get('step')}")
    return 0


if __name__ == "__main__":  # python -m napari_dca._cli_train ... (same as `napari-dca train ...`)
    import sys
    parser = argparse.ArgumentParser(prog="napari-dca")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    sys.exit(run(parser.parse_args(["train"] + sys.argv[1:])))
