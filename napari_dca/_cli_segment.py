"""`napari-dca segment`: images in, instance label TIFFs out (tiled, blended, any size).

The command line only parses and reports: which files to write and whether to skip them is
`src_models.segment_outputs`, writing is `src_models.image_io` (atomic, see safe_write).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ._cli_bounds import MAX_INFERENCE_TILE as MAX_TILE, bounded_int, check_inference_options

MAX_BATCH = 64


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "segment", help="segment images (TIFF/PNG/JPEG files or folders) into instance label TIFFs",
        description="Segment H&E images with a DCA checkpoint. Each INPUT is an image file or a folder "
                    "of .tif/.tiff/.png/.jpg/.jpeg images (not recursive). For every image NAME.EXT "
                    "(its full file name is kept, so x.png and x.tif never collide) "
                    "OUTDIR/NAME.EXT.labels.tif holds its instance labels (0 = background; one id per "
                    "nucleus or gland; classes in semantic mode), and with --save-prob "
                    "OUTDIR/NAME.EXT.prob.tif its float32 probabilities. Files are written under a "
                    "temporary name and renamed when complete; images whose outputs already exist are "
                    "skipped (a rerun after an interruption resumes) unless --overwrite. An output "
                    "that would replace an input, two inputs that would write the same output, or a "
                    "symlink at an output path stop the run before any work. Images of any size are "
                    "processed in overlapping tiles with smooth blending; large TIFFs are read tile by "
                    "tile; 3D stacks / time series are segmented plane by plane. Exit code: 0 all "
                    "done, 1 some images failed (listed), 2 a usage or input error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders of images")
    p.add_argument("-o", "--out", required=True, metavar="OUTDIR", help="folder for the results (created)")
    p.add_argument("-c", "--checkpoint", default="nuclei", metavar="NAME|PATH",
                   help="bundled model name (nuclei, glands) or a .safetensors checkpoint "
                        "(or an official DCA .pt/.pth with its .json card beside it)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the model runs; auto = CUDA, else Apple MPS, else CPU")
    p.add_argument("--runtime", default=None, choices=["auto", "torch", "onnx", "openvino"],
                   help="what runs the model: onnx = the model exported once into your cache folder "
                        "and run by ONNX Runtime (faster on a CPU; see the README's Performance), "
                        "openvino = the same exported graph run by OpenVINO (pip install openvino), "
                        "torch = PyTorch, auto = onnx on the CPU when installed and matching "
                        "PyTorch, else torch (default: $NAPARI_DCA_RUNTIME, else auto)")
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help=f"tile size in pixels, 32..{MAX_TILE} (default: the checkpoint's training "
                        f"tile size; never larger than the image needs)")
    p.add_argument("--overlap", type=float, default=None, metavar="F",
                   help="fraction of a tile shared with each neighbour (0 <= F <= 0.9; default: the "
                        "checkpoint's, else 0.25)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B",
                   help=f"tiles per model call, 1..{MAX_BATCH}")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the four flips (4x slower, slightly smoother)")
    p.add_argument("--save-prob", action="store_true", help="also write NAME.EXT.prob.tif (float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute and replace outputs that already exist (default: skip those images)")
    p.add_argument("--mode", choices=["nuclei", "glands", "semantic"], default=None,
                   help="post-processing: nuclei (split touching objects), glands (connected "
                        "components), semantic (class map); default: the checkpoint's task")
    p.add_argument("--threshold", type=float, default=None,
                   help="foreground probability threshold, 0..1 (default: the checkpoint's, usually 0.5)")
    p.add_argument("--min-size", type=int, default=None, metavar="PIXELS",
                   help="drop objects smaller than this (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (1..number of CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (summary lines only)")
    from ._cli_slides import add_slide_options
    add_slide_options(p)
    return p


def load_model(checkpoint: str, device: str):
    """(model, card) for a checkpoint name or path; kept separate so tests can substitute it."""
    from src_models.checkpoints import load_checkpoint
    return load_checkpoint(checkpoint, device=device)


def check_options(args) -> None:
    """ValueError (one line: what is wrong, what to do) for an option out of its bounds."""
    args.batch_size = bounded_int("--batch-size", args.batch_size, 1, MAX_BATCH,
                                  "larger batches only use more memory")
    check_inference_options(args)


def run(args) -> int:
    from src_models.image_io import IMAGE_SUFFIXES, list_images
    from src_models.inference import card_value
    from src_models.segment_outputs import plan_outputs
    from src_models.slide.reader import SLIDE_SUFFIXES

    from ._cli_slides import segment_slides, split_slides

    check_options(args)
    # whole-slide images (pyramids, huge tiled TIFFs) go through the slide pipeline
    slides, images = split_slides(list_images(args.inputs, IMAGE_SUFFIXES + SLIDE_SUFFIXES))
    if not images and not slides:
        raise ValueError("no .tif/.tiff/.png/.jpg/.jpeg images in " + ", ".join(args.inputs))
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"-o {out_dir} is a file, not a folder; give a folder for the results")
    jobs = plan_outputs(images, out_dir, save_prob=args.save_prob, overwrite=args.overwrite)
    todo = [job for job in jobs if not job.done]
    for job in jobs:
        if job.done:
            print(f"{job.source.name}: already done ({job.outputs['labels'].name} exists; "
                  f"--overwrite to redo)", file=sys.stderr)
    if not todo and not slides:
        print(f"all {len(jobs)} images already segmented in {out_dir}", file=sys.stderr)
        return 0
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output folder {out_dir}: {err.strerror or err}; "
                         f"choose a folder you can write to") from err
    engine = _Engine(args, fast_start=not slides)
    card = engine.card
    mode = args.mode or card_value(card, "task", "nuclei")
    failures = []
    for job in todo:
        try:
            line = _segment_one(job, engine, mode, args)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one bad image must not stop a batch
            from .cli import one_line
            print(f"{job.source.name}: failed: {one_line(err)}", file=sys.stderr)
            failures.append(job.source)
            continue
        from tqdm import tqdm
        tqdm.write(line)
    if slides:
        engine.load_torch()
        failures += segment_slides(slides, args, mode, engine.model, engine.card)
        todo = todo + slides
    if failures:
        print(f"{len(failures)} of {len(todo)} images failed: "
              + ", ".join(p.name for p in failures[:10]) + (" ..." if len(failures) > 10 else ""),
              file=sys.stderr)
        return 1
    return 0


class _Engine:
    """What runs the model in one `segment` run. With a cached exported graph for the checkpoint
    file (src_models.runtime_cached: recorded by an earlier run) and the CPU, ONNX Runtime and
    numpy alone: torch is never imported. Otherwise, or as soon as an image needs a tile size
    that has no cached graph, torch loads and checks the checkpoint and one ModelRunner serves
    every image (its graphs are then recorded for the next run's fast start)."""

    def __init__(self, args, fast_start: bool = True):
        from src_models import runtime_onnx
        self.args = args
        self.model = self.runner = self.cached = None
        self.torch_default_threads = None
        self.remembered: set = set()
        self.choice = args.runtime or runtime_onnx.default_runtime()
        # The engine a cached graph runs in without torch: what auto resolves to, or the one asked.
        self.graph_engine = "openvino" if self.choice == "openvino" else "onnx"
        if fast_start and self._cpu_only() and self.choice != "torch" \
                and runtime_onnx.engine_available(self.graph_engine):
            from src_models import runtime_cached
            self.cached = runtime_cached.find(args.checkpoint)
        if self.cached is not None:
            self.card = self.cached.card
        else:
            self.load_torch()

    def _cpu_only(self) -> bool:
        """The device is the CPU without asking torch: --device cpu, or auto with a CPU-only
        build of torch installed (its version ends in +cpu: no CUDA; no MPS off macOS)."""
        if self.args.device == "cpu":
            return True
        if self.args.device != "auto":
            return False
        try:
            from importlib.metadata import version
            return version("torch").endswith("+cpu")
        except Exception:  # noqa: BLE001 - unknown: let torch decide
            return False

    def load_torch(self) -> None:
        if self.model is not None:
            return
        import torch
        from src_models.inference import ModelRunner, select_device
        from src_models.runtime_onnx import resolve_runtime
        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        else:
            self.torch_default_threads = torch.get_num_threads()
        self.device = select_device(self.args.device)
        self.args.runtime = resolve_runtime(self.choice, self.device.type)
        self.model, self.card = load_model(self.args.checkpoint, str(self.device))
        self.cached = None
        self.runner = ModelRunner(self.model, self.device, tta=self.args.tta,
                                  max_batch=self.args.batch_size, runtime=self.args.runtime)

    def runner_for(self, image) -> object:
        """The runner for one image: the cached graph of its tile size, else the torch runner."""
        if self.cached is not None:
            from src_models.inference import image_layout, tile_for
            tile = tile_for(image_layout(image.shape), self.card, self.args.tile)
            channels = int((self.card.get("model_kwargs") or {}).get("in_channels", 3))
            runner = self.cached.runner((channels, tile, tile),
                                        threads=self.args.threads or self.cached.default_threads(),
                                        tta=self.args.tta, max_batch=self.args.batch_size,
                                        runtime=self.graph_engine)
            if runner is not None:
                return runner
            self.load_torch()
        return self.runner

    def remember(self) -> None:
        """After an image: record the torch runner's graphs for the next run's fast start."""
        if self.runner is None or not self.runner.uses_graph or not hasattr(self.card, "to_dict"):
            return
        shapes = set(self.runner.graphs)
        if shapes - self.remembered:   # once per new graph, not per image
            from src_models import runtime_cached
            runtime_cached.remember(self.args.checkpoint, self.card.to_dict(), self.runner,
                                    self.torch_default_threads)
            self.remembered |= shapes


def _count_ids(labels) -> int:
    """Distinct non-zero ids: a bincount when the ids are small (much faster than np.unique on a
    big image), np.unique otherwise."""
    import numpy as np
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0
    low, top = int(labels.min()), int(labels.max())
    if low >= 0 and top < 4 * labels.size + 1024:
        return int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
    return int(np.count_nonzero(np.unique(labels)))


def _segment_one(job, engine: _Engine, mode: str, args) -> str:
    """Segment one image and write its missing outputs; the summary line."""
    import warnings

    from tqdm import tqdm

    from src_models.image_io import read_image, tiff_value_range, TIFF_SUFFIXES, write_labels, \
        write_probabilities
    from src_models.inference import image_layout, predict
    from src_models.instances import InstanceMaker

    start = time.perf_counter()
    path = job.source
    image = read_image(path)
    value_range = tiff_value_range(path) if path.suffix.lower() in TIFF_SUFFIXES else None
    bar = tqdm(total=0, desc=path.name, unit="tile", leave=False, disable=args.quiet, file=sys.stderr)

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = engine.runner_for(image)
        prob = predict(engine.model, image, engine.card, tile_size=args.tile, overlap=args.overlap,
                       batch_size=args.batch_size, progress=progress, value_range=value_range,
                       runner=runner)
    bar.close()
    engine.remember()
    card = engine.card
    for warning in caught:
        print(f"{path.name}: warning: {warning.message}", file=sys.stderr)
    maker = InstanceMaker(prob, card, stack=image_layout(image.shape).is_stack, mode=mode)
    labels = maker.labels(threshold=args.threshold, min_size=args.min_size)
    if "prob" in job.todo:
        write_probabilities(job.todo["prob"], prob)
    if "labels" in job.todo:
        write_labels(job.todo["labels"], labels)
    seconds = time.perf_counter() - start
    n = _count_ids(labels)
    if mode == "semantic":
        what = "class" if n == 1 else "classes"
    else:
        what = "object" if n == 1 else "objects"
    shape = "x".join(str(s) for s in image.shape)
    return f"{path.name}: {n} {what}, {shape}, {seconds:.1f} s -> {job.outputs['labels']}"
