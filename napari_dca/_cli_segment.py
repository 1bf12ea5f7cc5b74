"""`napari-dca segment`: images in, instance label TIFFs out (tiled, blended, any size)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "segment", help="segment images (TIFF/PNG/JPEG files or folders) into instance label TIFFs",
        description="Segment H&E images with a DCA checkpoint. Each INPUT is an image file or a folder "
                    "of .tif/.tiff/.png/.jpg/.jpeg images (not recursive). For every image "
                    "OUTDIR/<stem>.tif holds its instance labels (0 = background; one id per nucleus "
                    "or gland; classes in semantic mode), and with --save-prob OUTDIR/<stem>_prob.tif "
                    "its float32 probabilities. Images of any size are processed in overlapping "
                    "tiles with smooth blending; large TIFFs are read tile by tile; 3D stacks / time "
                    "series are segmented plane by plane.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders of images")
    p.add_argument("-o", "--out", required=True, metavar="OUTDIR", help="folder for the results (created)")
    p.add_argument("-c", "--checkpoint", default="nuclei", metavar="NAME|PATH",
                   help="bundled model name (nuclei, glands) or a .safetensors checkpoint "
                        "(or an official DCA .pt/.pth with its .json card beside it)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the model runs; auto = CUDA, else Apple MPS, else CPU")
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="tile size in pixels (default: the checkpoint's training tile size)")
    p.add_argument("--overlap", type=float, default=0.25, metavar="F",
                   help="fraction of a tile shared with each neighbour (0 <= F < 1)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="tiles per model call")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the four flips (4x slower, slightly smoother)")
    p.add_argument("--save-prob", action="store_true", help="also write <stem>_prob.tif (float32)")
    p.add_argument("--mode", choices=["nuclei", "glands", "semantic"], default=None,
                   help="post-processing: nuclei (split touching objects), glands (connected "
                        "components), semantic (class map); default: the checkpoint's task")
    p.add_argument("--threshold", type=float, default=None,
                   help="foreground probability threshold (default: the checkpoint's, usually 0.5)")
    p.add_argument("--min-size", type=int, default=None, metavar="PIXELS",
                   help="drop objects smaller than this (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bar (summary lines only)")
    return p


def load_model(checkpoint: str, device: str):
    """(model, card) for a checkpoint name or path; kept separate so tests can substitute it."""
    from src_models.checkpoints import load_checkpoint
    return load_checkpoint(checkpoint, device=device)


def run(args) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from src_models.image_io import list_images, read_image, write_labels, write_probabilities
    from src_models.inference import card_value, image_layout, predict, select_device
    from src_models.instances import InstanceMaker

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        images = list_images(args.inputs)
        device = select_device(args.device)
        if not 0.0 <= args.overlap < 1.0:
            raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}")
        model, card = load_model(args.checkpoint, str(device))
    except (FileNotFoundError, ValueError) as err:  # CheckpointError is a ValueError
        print(f"napari-dca segment: error: {err}", file=sys.stderr)
        return 2
    if not images:
        print("napari-dca segment: error: no .tif/.tiff/.png/.jpg/.jpeg images in "
              + ", ".join(args.inputs), file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = args.mode or card_value(card, "task", "nuclei")
    failures = 0
    for path in images:
        label_path = out_dir / f"{path.stem}.tif"
        if label_path.resolve() == path.resolve():
            print(f"{path.name}: skipped, the labels would overwrite the input; choose another -o",
                  file=sys.stderr)
            failures += 1
            continue
        start = time.perf_counter()
        try:
            image = read_image(path)
            bar = tqdm(total=0, desc=path.name, unit="tile", leave=False, disable=args.quiet,
                       file=sys.stderr)

            def progress(done, total, bar=bar):
                bar.total = total
                bar.n = done
                bar.refresh()

            prob = predict(model, image, card, tile_size=args.tile, overlap=args.overlap,
                           batch_size=args.batch_size, device=device, tta=args.tta,
                           progress=progress)
            bar.close()
            maker = InstanceMaker(prob, card, stack=image_layout(image.shape).is_stack, mode=mode)
            labels = maker.labels(threshold=args.threshold, min_size=args.min_size)
            write_labels(label_path, labels)
            if args.save_prob:
                write_probabilities(out_dir / f"{path.stem}_prob.tif", prob)
        except Exception as err:  # noqa: BLE001 - one bad image must not stop a batch
            print(f"{path.name}: failed: {err}", file=sys.stderr)
            failures += 1
            continue
        seconds = time.perf_counter() - start
        n = int(np.count_nonzero(np.unique(labels)))
        what = ("class" if mode == "semantic" else "object") + ("" if n == 1 else
                                                                ("es" if mode == "semantic" else "s"))
        shape = "x".join(str(s) for s in image.shape)
        tqdm.write(f"{path.name}: {n} {what}, {shape}, {seconds:.1f} s -> {label_path}")
    return 1 if failures else 0

