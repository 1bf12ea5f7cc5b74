"""Many slides (or one large one) on dask.distributed, on an embedded LocalCluster or on an
existing cluster (`scheduler="tcp://host:8786"`, e.g. one started by dask-jobqueue on SLURM or by
the dask Kubernetes operator; see the README).

Each slide is a small graph of tasks:

    plan-<i>              pipeline.plan_slide: tissue, the cores to segment, the run folder
    chunk-<i>-<core>      pipeline.core_part for one tissue core, stored in the run folder
                          (only for a slide with more than `chunk_tasks_above` tissue cores)
    finish-<i>            pipeline.finish_slide: seams (ownership / face joining) and writers,
                          after all of the slide's chunk tasks; it computes any core not stored
                          (all of them for a small slide, which is then one task of work)

The model is loaded once per worker process and reused; with options["runtime"] "onnx" / "auto"
each worker runs the exported graph, made once for all of them through the shared cache (see
runtime.py). Every task is idempotent: a slide whose outputs all exist is reported as done without
work; a chunk task whose part is stored returns at once, and a retried one rewrites the same file;
the finish task resumes from the cores it already stitched. A task whose worker dies is run again
by the scheduler on another worker; one that raises is retried `retries` times. A slide that fails
(any of its tasks) is reported with its error; the other slides go on.

Scaling: tasks are single-threaded, so throughput grows with workers until the CPUs (or the disk
holding the slides) are saturated. With chunk tasks, one large slide's wall time shrinks with the
workers too, down to the serial part: planning, the seams and the writers (a small fraction of
the model's time per chunk).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

_WORKER_MODELS: dict[str, tuple[Any, Any]] = {}
_WORKER_RUNNERS: dict[tuple, tuple[Any, str]] = {}
CHUNK_TASKS_ABOVE = 8     # tissue cores: a slide with more runs one task per chunk
_PLAN_OPTIONS = ("mode", "threshold", "min_size", "tile_size", "overlap", "tissue", "chunk",
                 "margin", "region", "checkpoint_name")


@dataclass
class SlideOutcome:
    """What happened to one slide: status "done" / "skipped" (outputs existed) / "failed".
    chunk_tasks: how many of its cores ran as their own tasks, on how many worker processes."""
    slide: Path
    status: str
    summary: str
    n_objects: int | None = None
    seconds: float | None = None
    tissue_megapixels: float | None = None
    chunk_tasks: int = 0
    chunk_pids: tuple[int, ...] = ()       # the worker processes that completed them

    @property
    def chunk_workers(self) -> int:
        return len(self.chunk_pids)


def _model_for(checkpoint: Any, device: str):
    """(model, card): a checkpoint name/path loaded once per process, or a given (model, card)."""
    if isinstance(checkpoint, tuple):
        return checkpoint
    key = f"{checkpoint}@{device}"
    if key not in _WORKER_MODELS:
        from ..checkpoints import load_checkpoint
        _WORKER_MODELS[key] = load_checkpoint(checkpoint, device=device)
    return _WORKER_MODELS[key]


def _runner_for(checkpoint: Any, options: dict) -> tuple[Any, Any, Any, str]:
    """(model, card, runner, how its graph was obtained) in this worker process. A named
    checkpoint's runner is built once per process (a chunk task must not re-open and re-probe the
    graph); a (model, card) given by value arrives as a new object in every task, so it gets a
    new runner."""
    import torch

    from .runtime import slide_runner
    torch.set_num_threads(int(options.get("threads", 1) or 1))
    device = options.get("device", "cpu")
    model, card = _model_for(checkpoint, device)
    settings = dict(device=device, runtime=options.get("runtime", "torch"),
                    tta=bool(options.get("tta", False)), batch_size=options.get("batch_size", 4),
                    tile_size=options.get("tile_size"))
    key = None if isinstance(checkpoint, tuple) else (str(checkpoint), *settings.values())
    if key is not None and key in _WORKER_RUNNERS:
        runner, graph = _WORKER_RUNNERS[key]
        return model, card, runner, "cached" if graph == "exported" else graph
    runner, graph = slide_runner(model, card, **settings)
    if key is not None:
        _WORKER_RUNNERS[key] = (runner, graph)
    return model, card, runner, graph


def plan_slide_task(slide: str, out_dir: str, checkpoint: Any, options: dict,
                    overwrite: bool = False):
    """The first task of a slide: a SlideOutcome "skipped" when its outputs exist, else its
    pipeline.SlidePlan."""
    from ..inference import select_device
    from ..runtime_onnx import resolve_runtime
    from .pipeline import is_done, plan_slide
    if not overwrite and is_done(slide, out_dir, options.get("geojson", True),
                                 options.get("table", True)):
        return SlideOutcome(Path(slide), "skipped", f"{Path(slide).name}: already done "
                            f"(outputs exist; --overwrite to redo)")
    _, card = _model_for(checkpoint, options.get("device", "cpu"))
    # the runtime every worker resolves (the same installation everywhere), without exporting
    runtime = resolve_runtime(options.get("runtime", "torch"),
                              select_device(options.get("device", "cpu")).type, "auto")
    return plan_slide(slide, card, out_dir,
                      runtime="onnx" if runtime in ("onnx", "openvino") else "torch",
                      **{k: options[k] for k in _PLAN_OPTIONS if k in options})


def chunk_task(plan, index: int, checkpoint: Any, options: dict) -> tuple[int, str]:
    """One tissue core of a planned slide, stored as its part in the run folder; returns
    (this worker's process id, how the model ran). Idempotent: a stored part is not redone."""
    from .pipeline import core_part, runtime_label
    from .reader import open_slide
    if plan.parts.has(index):
        return os.getpid(), "stored"
    model, card, runner, graph = _runner_for(checkpoint, options)
    with open_slide(plan.path) as slide:
        part = core_part(plan, slide, plan.grid.core(index), model, card, runner,
                         options.get("batch_size", 4))
    plan.parts.save(index, part)
    return os.getpid(), runtime_label(graph)


def finish_slide_task(plan, checkpoint: Any, options: dict,
                      chunks: Sequence[tuple[int, str]] = ()) -> SlideOutcome:
    """The last task of a slide, after its chunk tasks (`chunks`: what they returned): the seams
    and the writers, computing here any core no chunk task stored."""
    from .pipeline import core_part, finish_slide, runtime_label
    from .reader import open_slide
    here: list[str] = []
    model = card = runner = None

    def part_for(core):
        nonlocal model, card, runner
        part = plan.parts.load(core.index)
        if part is None:
            if runner is None:
                model, card, runner, graph = _runner_for(checkpoint, options)
                here.append(runtime_label(graph))
            part = core_part(plan, slide, core, model, card, runner,
                             options.get("batch_size", 4))
        return part
    with open_slide(plan.path) as slide:
        result = finish_slide(plan, slide, part_for, "", geojson=options.get("geojson", True),
                              table=options.get("table", True))
    # how the model ran is known once the seams are done: in the chunk tasks and / or here
    ran = {how for _, how in chunks if how != "stored"} | set(here)
    result.runtime = ", ".join(sorted(ran)) or "parts of an earlier run"
    pids = tuple(sorted({pid for pid, how in chunks if how != "stored"}))
    summary = result.summary() + (f" ({len(chunks)} chunk tasks on {len(pids)} workers)"
                                  if chunks else "")
    return SlideOutcome(Path(plan.path), "done", summary, result.n_objects, result.seconds,
                        result.tissue_megapixels, len(chunks), pids)


def run_slides(slides: Sequence[str | Path], out_dir: str | Path, checkpoint: Any,
               options: dict | None = None, *, scheduler: str | None = None, workers: int = 1,
               retries: int = 2, overwrite: bool = False,
               chunk_tasks_above: int = CHUNK_TASKS_ABOVE,
               report: Callable[[SlideOutcome], Any] | None = None) -> list[SlideOutcome]:
    """Segments `slides` on dask.distributed; returns one SlideOutcome per slide, in order.

    scheduler: address of an existing scheduler; None starts a LocalCluster of `workers`
    single-threaded worker processes for this call. retries: how many times a task that raised is
    resubmitted (a task whose worker was lost is rerun by the scheduler in any case).
    chunk_tasks_above: a slide with more tissue cores than this runs one task per core (0: every
    slide). report(outcome) is called as each slide finishes (in completion order)."""
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

    def submit(fn, *args, key):
        return client.submit(fn, *args, key=key, retries=retries, pure=False)

    try:
        stage: dict[Any, tuple[str, int]] = {}
        for i, slide in enumerate(slides):
            stage[submit(plan_slide_task, str(slide), out_dir, checkpoint, options, overwrite,
                         key=f"plan-{i}-{Path(slide).name}")] = ("plan", i)
        running = as_completed(list(stage))
        for future in running:
            kind, i = stage.pop(future)
            name = Path(slides[i]).name
            try:
                value = future.result()
            except Exception as err:  # noqa: BLE001 - one slide's failure is reported, not raised
                message = " ".join(str(err).split()) or type(err).__name__
                value = SlideOutcome(Path(slides[i]), "failed", f"{name}: failed: {message}")
            if kind == "plan" and not isinstance(value, SlideOutcome):
                plan = value
                chunks = [] if len(plan.boxes) <= chunk_tasks_above else [
                    submit(chunk_task, plan.for_core(index), index, checkpoint, options,
                           key=f"chunk-{i}-{index}-{name}") for index in plan.pending]
                finish = submit(finish_slide_task, plan, checkpoint, options, chunks,
                                key=f"finish-{i}-{name}")
                stage[finish] = ("finish", i)
                running.add(finish)
                continue
            outcomes[i] = value
            if report is not None:
                report(value)
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
