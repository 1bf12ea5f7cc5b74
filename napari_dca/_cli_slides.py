"""`napari-dca segment` for whole-slide images (pyramidal TIFFs, SVS, NDPI, ... and huge tiled TIFFs):
their options and their run. The work is `src_models.slide` (pipeline for one slide, cluster for
many); this module only parses, shows progress and prints one summary line per slide.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ._cli_bounds import bounded_int


def add_slide_options(p) -> None:
    g = p.add_argument_group(
        "whole-slide images",
        "Slides (.svs .ndpi .scn .bif, pyramidal or huge tiled .tif/.tiff; .mrxs etc. with the "
        "openslide extra) are segmented chunk by chunk over their tissue in bounded memory and "
        "written as NAME.labels.ome.zarr (OME-Zarr label pyramid), NAME.objects.geojson (QuPath: "
        "File > Import objects) and NAME.objects.csv (one row per object). A killed run resumes "
        "from its completed chunks. Several slides run on dask.distributed.")
    g.add_argument("--no-tissue", action="store_true",
                   help="segment the whole slide, glass included (default: only chunks touching "
                        "the tissue found on a low-resolution level)")
    g.add_argument("--chunk", type=int, default=2048, metavar="PIXELS",
                   help="chunk edge in level-0 pixels, a multiple of 64 (memory grows with its square)")
    g.add_argument("--no-geojson", action="store_true", help="do not write NAME.objects.geojson")
    g.add_argument("--no-table", action="store_true", help="do not write NAME.objects.csv")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="dask scheduler of an existing cluster (tcp://host:8786); default: an "
                        "embedded LocalCluster when there are several slides")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="LocalCluster worker processes, one thread each (default: 1 per CPU, at "
                        "most one per slide; one slide with --workers 2 or more runs its chunks "
                        "in parallel)")
    g.add_argument("--chunk-tasks-above", type=int, default=None, metavar="CHUNKS",
                   help="on dask, a slide with more tissue chunks than this runs one task per "
                        "chunk, so its chunks spread over the workers (default: 8; 0: always)")


def split_slides(paths):
    """(slides, other images) of the inputs."""
    from src_models.slide.reader import is_slide
    slides, images = [], []
    for path in paths:
        (slides if is_slide(path) else images).append(path)
    return slides, images


def _options(args, mode: str) -> dict:
    chunk = bounded_int("--chunk", args.chunk, 256, 16384, "chunks hold a few windows in memory")
    if chunk % 64:
        raise ValueError(f"--chunk must be a multiple of 64 (the label pyramid's levels align on "
                         f"it), got {chunk}; try {max(256, chunk // 64 * 64)}")
    return {"mode": mode, "threshold": args.threshold, "min_size": args.min_size,
            "tile_size": args.tile, "overlap": args.overlap, "batch_size": args.batch_size,
            "tta": args.tta, "tissue": not args.no_tissue, "chunk": chunk,
            "geojson": not args.no_geojson, "table": not args.no_table,
            "checkpoint_name": str(args.checkpoint), "runtime": _runtime(args)}


def _runtime(args) -> str:
    """--runtime as `segment` resolved it (auto -> onnx on a CPU with ONNX Runtime), so every
    worker runs what a plain image would; each worker then makes or reuses the cached graph."""
    from src_models.runtime_onnx import default_runtime
    return getattr(args, "runtime", None) or default_runtime()


def segment_slides(slides, args, mode: str, model=None, card=None) -> list[Path]:
    """Segments the slides (in this process for one slide without --scheduler, else on dask);
    prints a line per slide; returns the slides that failed."""
    import os

    from src_models.slide.pipeline import is_done

    options = _options(args, mode)
    todo = []
    for slide in slides:
        if not args.overwrite and is_done(slide, args.out, options["geojson"], options["table"]):
            print(f"{Path(slide).name}: already done (outputs exist; --overwrite to redo)",
                  file=sys.stderr)
        else:
            todo.append(Path(slide))
    if not todo:
        return []
    workers = args.workers or min(len(todo), os.cpu_count() or 1)
    if args.scheduler is None and workers == 1:
        return _in_process(todo, args, options, model, card)
    from src_models.slide.cluster import CHUNK_TASKS_ABOVE, run_slides
    options.update(device=args.device if args.device != "auto" else "cpu",
                   threads=args.threads or 1)
    start = time.perf_counter()
    above = CHUNK_TASKS_ABOVE if args.chunk_tasks_above is None else bounded_int(
        "--chunk-tasks-above", args.chunk_tasks_above, 0, 10 ** 9, "a count of chunks")
    outcomes = run_slides(todo, args.out, str(args.checkpoint), options, scheduler=args.scheduler,
                          workers=workers, overwrite=args.overwrite, chunk_tasks_above=above,
                          report=BatchReport(len(todo), quiet=args.quiet))
    done = [o for o in outcomes if o.status == "done"]
    hours = (time.perf_counter() - start) / 3600
    print(f"{len(done)} of {len(todo)} slides in {hours * 3600:.0f} s "
          f"({len(done) / hours if hours else 0:.1f} slides/hour)", file=sys.stderr)
    return [o.slide for o in outcomes if o.status == "failed"]


class BatchReport:
    """Called with each slide's outcome as the cluster finishes it: prints its summary line
    (stdout; failures to stderr), then how many slides are done and roughly how long the rest
    will take (the mean time per finished slide so far times the slides left, spread over the
    workers as they ran: a rough figure when slides differ in size)."""

    def __init__(self, total: int, quiet: bool = False, clock=time.perf_counter):
        self.total, self.quiet, self.clock = total, quiet, clock
        self.start, self.finished = clock(), 0

    def __call__(self, outcome) -> str | None:
        print(outcome.summary, file=sys.stdout if outcome.status != "failed" else sys.stderr,
              flush=True)
        self.finished += 1
        left = self.total - self.finished
        if self.quiet or not left:
            return None
        per = (self.clock() - self.start) / self.finished
        line = f"{self.finished} of {self.total} slides finished, ~{per * left:.0f} s left"
        print(line, file=sys.stderr, flush=True)
        return line


def _in_process(slides, args, options, model, card) -> list[Path]:
    from tqdm import tqdm

    from src_models.slide.pipeline import segment_slide

    from .cli import one_line
    failures = []
    for slide in slides:
        bar = tqdm(total=0, desc=slide.name, unit="chunk", leave=False, disable=args.quiet,
                   file=sys.stderr, bar_format="{desc}: {n}/{total} {unit}s [{elapsed}{postfix}]")

        def progress(stage, done, total, seconds_left, bar=bar):
            bar.set_description_str(f"{slide.name} {stage}")
            bar.total, bar.n = total, done
            bar.set_postfix_str("" if seconds_left is None else f", ~{seconds_left:.0f} s left",
                                refresh=False)
            bar.refresh()
        try:
            result = segment_slide(slide, model, card, args.out, device=args.device,
                                   progress=progress, **options)
        except KeyboardInterrupt:
            bar.close()
            print(f"{slide.name}: interrupted; rerun the same command to continue from its "
                  f"completed chunks", file=sys.stderr)
            raise
        except Exception as err:  # noqa: BLE001 - one bad slide must not stop a batch
            bar.close()
            print(f"{slide.name}: failed: {one_line(err)}", file=sys.stderr)
            failures.append(slide)
            continue
        bar.close()
        tqdm.write(result.summary())
    return failures
