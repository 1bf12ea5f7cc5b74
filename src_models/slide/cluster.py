"""Many slides on dask.distributed: one task per slide, on an embedded LocalCluster or on an
existing cluster (`scheduler="tcp://host:8786"`, e.g. one started by dask-jobqueue on SLURM or by
the dask Kubernetes operator; see the README).

Each task runs `pipeline.segment_slide` on its worker (the model is loaded once per worker process
and reused; with options["runtime"] "onnx" / "auto" each worker runs the exported graph, made once
for all of them through the shared cache, see runtime.py). Tasks are idempotent: a slide whose outputs all exist is reported as done without
work, and a slide whose worker died mid-run is retried (`retries`) and resumes from its completed
chunks (the pipeline's run folder). A slide that fails is reported with its error; the others go on.

Scaling: slides are independent and each task is single-threaded torch, so throughput grows with
workers until the CPUs (or the disk holding the slides) are saturated; a slide's wall time does not
shrink with more workers (one task per slide), so a single very large slide still takes its own
time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

_WORKER_MODELS: dict[str, tuple[Any, Any]] = {}


@dataclass
class SlideOutcome:
    """What happened to one slide: status "done" / "skipped" (outputs existed) / "failed"."""
    slide: Path
    status: str
    summary: str
    n_objects: int | None = None
    seconds: float | None = None
    tissue_megapixels: float | None = None


def _model_for(checkpoint: Any, device: str):
    """(model, card): a checkpoint name/path loaded once per process, or a given (model, card)."""
    if isinstance(checkpoint, tuple):
        return checkpoint
    key = f"{checkpoint}@{device}"
    if key not in _WORKER_MODELS:
        from ..checkpoints import load_checkpoint
        _WORKER_MODELS[key] = load_checkpoint(checkpoint, device=device)
    return _WORKER_MODELS[key]


def segment_slide_task(slide: str, out_dir: str, checkpoint: Any, options: dict,
                       overwrite: bool = False) -> SlideOutcome:
    """One slide on whichever process runs it (a dask worker, or this one)."""
    import torch

    from .pipeline import is_done, segment_slide
    torch.set_num_threads(int(options.get("threads", 1) or 1))
    want_geojson, want_table = options.get("geojson", True), options.get("table", True)
    if not overwrite and is_done(slide, out_dir, want_geojson, want_table):
        return SlideOutcome(Path(slide), "skipped", f"{Path(slide).name}: already done "
                            f"(outputs exist; --overwrite to redo)")
    device = options.get("device", "cpu")
    model, card = _model_for(checkpoint, device)
    kwargs = {k: v for k, v in options.items() if k not in ("threads",)}
    result = segment_slide(slide, model, card, out_dir, **kwargs)
    return SlideOutcome(Path(slide), "done", result.summary(), result.n_objects, result.seconds,
                        result.tissue_megapixels)


def run_slides(slides: Sequence[str | Path], out_dir: str | Path, checkpoint: Any,
               options: dict | None = None, *, scheduler: str | None = None, workers: int = 1,
               retries: int = 2, overwrite: bool = False,
               report: Callable[[SlideOutcome], Any] | None = None) -> list[SlideOutcome]:
    """Segments `slides` on dask.distributed; returns one SlideOutcome per slide, in order.

    scheduler: address of an existing scheduler; None starts a LocalCluster of `workers`
    single-threaded worker processes for this call. retries: how many times a slide is
    resubmitted when its worker is lost (or it raises). report(outcome) is called as each slide
    finishes (in completion order)."""
    from distributed import Client, LocalCluster, as_completed

    options = dict(options or {})
    out_dir = str(Path(out_dir))
    cluster = None
    if scheduler is None:
        # processes, not threads: torch and the GIL; one thread each, the machine's cores
        # are the workers
        cluster = LocalCluster(n_workers=max(1, int(workers)), threads_per_worker=1,
                               processes=True, dashboard_address=None,
                               silence_logs=40)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    outcomes: dict[int, SlideOutcome] = {}
    try:
        futures = {}
        for i, slide in enumerate(slides):
            future = client.submit(segment_slide_task, str(slide), out_dir, checkpoint, options,
                                   overwrite, key=f"slide-{i}-{Path(slide).name}",
                                   retries=retries, pure=False)
            futures[future] = i
        for future in as_completed(list(futures)):
            i = futures[future]
            try:
                outcome = future.result()
            except Exception as err:  # noqa: BLE001 - one slide's failure is reported, not raised
                message = " ".join(str(err).split()) or type(err).__name__
                outcome = SlideOutcome(Path(slides[i]), "failed",
                                       f"{Path(slides[i]).name}: failed: {message}")
            outcomes[i] = outcome
            if report is not None:
                report(outcome)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return [outcomes[i] for i in range(len(slides))]


def slides_per_hour(outcomes: Sequence[SlideOutcome], wall_seconds: float) -> float:
    done = sum(1 for o in outcomes if o.status == "done")
    return 3600.0 * done / wall_seconds if wall_seconds > 0 else 0.0


def timed_run(*args, **kwargs) -> tuple[list[SlideOutcome], float]:
    start = time.perf_counter()
    outcomes = run_slides(*args, **kwargs)
    return outcomes, time.perf_counter() - start
