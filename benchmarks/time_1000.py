"""How long one checkpoint takes to segment a 1000x1000 H&E image, as the Segment widget does it.

    python benchmarks/time_1000.py CHECKPOINT [--threads 2] [--repeats 5] [--runtime auto]
        [--json OUT.json]

CHECKPOINT: a bundled name (nuclei, glands) or a .safetensors path. The image is a real H&E
image from the shared training data, chosen by the card's task: MoNuSeg for nuclei (its images
are 1000x1000; the first one by name), GlaS for glands (the first one by name, 775x522, mirrored
out to 1000x1000). Without the shared data (NAPARI_DCA_SHARED, else ../shared beside the
repository) a synthetic H&E-like image is used, and the JSON says so.

What is timed is the Segment widget's job on a whole image, on the CPU:
`inference.predict(model, image, card, device="cpu", runtime=...)` (tiles, normalisation, model,
blending; a fresh call each time, as the widget makes one per click), then
`InstanceMaker(probabilities, card, mode=card.task).labels()` with the card's settings.
One warm-up run first (it also exports the ONNX graph into the cache when it is not there yet),
then --repeats runs; each number is a median over those runs.

--json OUT.json writes {"seconds", "probabilities_s", "instances_s", "threads", "runtime", "cpu",
"command", ...}: only numbers and strings, so it can go into a model card's `metrics` as is
(e.g. card.metrics["speed_1000"]). "runtime" is what ran the model ("onnx" or "torch"; "torch"
also when --runtime auto/onnx fell back), "runtime_requested" what was asked for. The machine
may be shared: "load_average" says how busy it was (1-minute average, start and end).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATASET_FOR_TASK = {"glands": "GlaS", "nuclei": "MoNuSeg"}


def shared_dir() -> Path:
    return Path(os.environ.get("NAPARI_DCA_SHARED", REPO.parent / "shared"))


def he_image(size: int, dataset: str) -> tuple[np.ndarray, str]:
    """(size x size uint8 RGB, what it is): the first training image of `dataset` by name,
    cropped to size, mirrored out where it is smaller; synthetic H&E-like without the data."""
    folder = shared_dir() / "data" / dataset / "train" / "images"
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not files:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_inference import he_like
        return he_like(size, size), "synthetic H&E-like (shared data not found)"
    import imageio.v3 as iio
    image = np.asarray(iio.imread(files[0]))[..., :3]
    h, w = image.shape[:2]
    how = "cropped" if h >= size and w >= size else "mirrored"
    image = np.pad(image, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="symmetric")
    return (np.ascontiguousarray(image[:size, :size]),
            f"{dataset} {files[0].name} ({w}x{h}) {how} to {size}x{size}")


def cpu_name() -> str:
    """lscpu's model name (what the CPU is), else the platform's answer."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                              env=dict(os.environ, LC_ALL="C")).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def segment_once(model, card, image, runtime: str, overlap: float | None = None,
                 tile: int | None = None) -> tuple[float, float, int]:
    """(probabilities s, instances s, objects) of one whole-image Segment-widget job (the card's
    tile size and overlap unless `tile` / `overlap` are given)."""
    from src_models.inference import predict
    from src_models.instances import InstanceMaker
    t0 = time.perf_counter()
    probs = predict(model, image, card, device="cpu", runtime=runtime, overlap=overlap,
                    tile_size=tile)
    t1 = time.perf_counter()
    labels = InstanceMaker(probs, card, mode=card.task).labels()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, int(len(np.unique(labels)) - 1)


def measure(checkpoint: str, *, threads: int, repeats: int, runtime: str, size: int = 1000,
            command: str = "", overlap: float | None = None, tile: int | None = None) -> dict:
    import torch
    from src_models import runtime_onnx
    from src_models.checkpoints import load_checkpoint
    from src_models.inference import overlap_for, tile_for, image_layout, tile_starts
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    model, card = load_checkpoint(checkpoint)
    image, source = he_image(size, DATASET_FOR_TASK.get(card.task, "MoNuSeg"))
    used = runtime_onnx.resolve_runtime(runtime, "cpu")
    with warnings.catch_warnings(record=True) as caught:  # warm-up (exports the graph if needed)
        warnings.simplefilter("always", runtime_onnx.RuntimeFallbackWarning)
        _, _, objects = segment_once(model, card, image, runtime, overlap, tile)
    fallback = [w for w in caught if issubclass(w.category, runtime_onnx.RuntimeFallbackWarning)]
    if fallback:
        used = "torch"
        print(f"note: {fallback[0].message}", file=sys.stderr)
    runs = [segment_once(model, card, image, runtime, overlap, tile) for _ in range(repeats)]
    used_overlap = overlap_for(card, overlap)
    used_tile = tile_for(image_layout(image.shape), card, tile)
    return {
        "seconds": round(statistics.median(p + i for p, i, _ in runs), 4),
        "probabilities_s": round(statistics.median(p for p, _, _ in runs), 4),
        "instances_s": round(statistics.median(i for _, i, _ in runs), 4),
        "threads": int(threads),
        "runtime": used,
        "runtime_requested": runtime,
        "cpu": cpu_name(),
        "command": command,
        "repeats": int(repeats),
        "image": source,
        "size": int(size),
        "objects": objects,
        "overlap": used_overlap,
        "tile": used_tile,
        "tiles": len(tile_starts(size, used_tile, used_overlap)) ** 2,
        "task": card.task,
        "load_average": f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", metavar="CHECKPOINT", help="bundled name or .safetensors path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "openvino"])
    ap.add_argument("--json", default=None, metavar="OUT.json", help="write the result here")
    ap.add_argument("--overlap", type=float, default=None,
                    help="tile overlap (default: the checkpoint card's)")
    ap.add_argument("--tile", type=int, default=None, help="tile size (default: the checkpoint card's)")
    ap.add_argument("--size", type=int, default=1000, help=argparse.SUPPRESS)  # tests only
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be at least 1")
    warnings.simplefilter("ignore", FutureWarning)
    result = measure(args.checkpoint, threads=args.threads, repeats=args.repeats,
                     runtime=args.runtime, size=args.size, overlap=args.overlap, tile=args.tile,
                     command=" ".join(["python", "benchmarks/time_1000.py"]
                                      + [shlex.quote(a) for a in argv]))
    print(f"{args.checkpoint}: {result['seconds']:.3f} s for {args.size}x{args.size} "
          f"(probabilities {result['probabilities_s']:.3f} s, instances {result['instances_s']:.3f} s; "
          f"{result['runtime']}, {args.threads} threads, median of {args.repeats}; "
          f"load {result['load_average']}; {result['image']})")
    if args.json:
        from src_models.safe_write import write_atomic
        text = json.dumps(result, indent=1) + "\n"
        write_atomic(Path(args.json), lambda tmp: Path(tmp).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
