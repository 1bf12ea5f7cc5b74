"""One whole slide, end to end, in bounded memory, resumable:

    plan_slide: open_slide (lazy pyramid) -> tissue mask on a low level -> cores of `chunk` px
      that touch tissue
    core_part, per tissue core: inference.predict on the core's window (with its own context)
      -> instances' probabilities_to_labels -> the part the core contributes (chunked_instances)
    finish_slide: the seams (ownership / face joining) into a work label store (zarr)
      -> OME-Zarr label pyramid (renumbered) -> GeoJSON (QuPath) + object table (CSV)

`segment_slide` runs the three in this process; slide/cluster.py runs them as dask tasks (one
per chunk for a large slide, each storing its part in the run folder). A core's part depends on
nothing but the slide and the settings, so both give the same labels.

Outputs for slide <name> in `out_dir`: <name>.labels.ome.zarr, <name>.objects.geojson,
<name>.objects.csv. While it runs, .<name>.run/ holds the work labels, the parts chunk tasks
computed and one record per stitched core: a run killed at any point and started again with the
same settings continues from there and produces the same labels; it is removed when the slide is
complete.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..chunked_instances import (DEFAULT_CHUNK, DEFAULT_MARGIN, ChunkGrid, ChunkLog, Core,
                                 CorePart, PartStore, boxes_by_anchor, final_blocks, rule_for,
                                 stitch_cores, window_part)
from .geojson import CLASS_COLOURS, GeoJSONWriter, feature, object_uuid, window_polygons
from .object_table import ObjectTableWriter, measure_window
from .reader import Slide, open_slide
from .runtime import slide_runner
from .tissue import TissueMask, slide_tissue
from .zarr_labels import LabelPyramidWriter, open_labels, pyramid_levels

# progress(stage, done, total, seconds_left or None); stages: "segment", "write", "measure"
SlideProgress = Callable[[str, int, int, "float | None"], Any]
CLASS_NAMES = {"nuclei": "Nucleus", "glands": "Gland"}
LABELS_SUFFIX, GEOJSON_SUFFIX, TABLE_SUFFIX = ".labels.ome.zarr", ".objects.geojson", ".objects.csv"


@dataclass
class SlideResult:
    slide: Path
    labels: Path
    geojson: Path | None
    table: Path | None
    n_objects: int
    tissue_fraction: float
    tissue_mm2: float | None
    tissue_megapixels: float
    chunks: int
    chunks_segmented: int
    seconds: float
    shape: tuple[int, int]
    stages: dict | None = None     # seconds per stage: tissue, segment, write, objects
    region: tuple[int, int, int, int] | None = None   # only the cores meeting this box were done
    region_tissue_megapixels: float | None = None     # the tissue in those cores
    runtime: str = "torch"          # what ran the model: torch, onnx (exported / cached graph)
    chunks_resumed: int = 0         # cores found complete from an earlier, interrupted run

    def summary(self) -> str:
        area = (f"{self.tissue_mm2:.2f} mm²" if self.tissue_mm2 is not None
                else f"{self.tissue_megapixels:.1f} MP")
        return (f"{self.slide.name}: {self.n_objects} objects, tissue {area} "
                f"({self.tissue_fraction:.0%} of {self.shape[0]}x{self.shape[1]}), "
                f"{self.chunks_segmented}/{self.chunks} chunks segmented"
                + (f" ({self.chunks_resumed} from an earlier run)" if self.chunks_resumed else "")
                + (f" in region {self.region} ({self.region_tissue_megapixels:.1f} MP tissue)"
                   if self.region is not None else "")
                + f", {self.runtime}, {self.seconds:.1f} s"
                + (" (" + ", ".join(f"{k} {v:.0f} s" for k, v in self.stages.items()) + ")"
                   if self.stages else "")
                + f" -> {self.labels}")


def output_paths(slide_path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """The slide's outputs, named like `napari-dca segment`'s others (segment_outputs.py): the
    input's full file name plus a suffix, so x.svs and x.ndpi never collide."""
    name, out_dir = Path(slide_path).name, Path(out_dir)
    return {"labels": out_dir / f"{name}{LABELS_SUFFIX}",
            "geojson": out_dir / f"{name}{GEOJSON_SUFFIX}",
            "table": out_dir / f"{name}{TABLE_SUFFIX}",
            "run": out_dir / f".{name}.run"}


def is_done(slide_path: str | Path, out_dir: str | Path, geojson: bool = True,
            table: bool = True) -> bool:
    """Whether every requested output of this slide exists (each appears only when complete)."""
    paths = output_paths(slide_path, out_dir)
    wanted = ["labels"] + (["geojson"] if geojson else []) + (["table"] if table else [])
    return all(paths[k].exists() for k in wanted)


class _Eta:
    """Seconds left, from the time per segmented core (skipped cores cost nothing)."""

    def __init__(self, to_segment: int):
        self.to_segment, self.segmented, self.start = to_segment, 0, time.perf_counter()

    def tick(self, segmented: int) -> float | None:
        self.segmented = segmented
        if segmented <= 0:
            return None
        per = (time.perf_counter() - self.start) / segmented
        return per * max(0, self.to_segment - segmented)


@dataclass
class SlidePlan:
    """Everything the pieces of one slide's run need, small and picklable, so the pieces can run
    in other processes (slide/cluster.py: one dask task per chunk, then one for the seams and
    the writers): the chunk grid, the post-processing, which cores touch tissue and, for each,
    the box of its window the model runs on (None: the whole window)."""
    path: str
    out_dir: str
    shape: tuple[int, int]
    chunk: int
    margin: int
    rule: str
    mode: str
    settings: dict                     # post-processing overrides of the card's
    tile_size: int | None
    overlap: float
    tissue: bool
    region: tuple[int, int, int, int] | None
    signature: dict                    # what a resumed run must share with the run it continues
    boxes: dict[int, tuple[int, int, int, int] | None]   # core index -> model box, tissue cores only
    pending: list[int]                 # tissue cores neither stitched nor stored yet
    tissue_px: float
    tissue_um2: float | None
    region_tissue: float | None
    started: float                     # time.time() when the run began (any process)
    stages: dict

    @property
    def grid(self) -> ChunkGrid:
        return ChunkGrid(self.shape[0], self.shape[1], self.chunk, self.margin)

    @property
    def paths(self) -> dict[str, Path]:
        return output_paths(self.path, self.out_dir)

    @property
    def parts(self) -> PartStore:
        """Where chunk tasks leave their cores' parts for the seam step."""
        return PartStore(self.paths["run"] / "parts")

    def includes(self, core: Core) -> bool:
        return core.index in self.boxes

    def for_core(self, index: int) -> "SlidePlan":
        """This plan with only core `index`'s box: what its chunk task needs (small to send)."""
        return replace(self, boxes={index: self.boxes[index]}, pending=[index])


def plan_slide(path: str | Path, card: Any, out_dir: str | Path, *, mode: str | None = None,
               threshold: float | None = None, min_size: int | None = None,
               tile_size: int | None = None, overlap: float | None = None, tissue: bool = True,
               chunk: int = DEFAULT_CHUNK, margin: int = DEFAULT_MARGIN,
               region: tuple[int, int, int, int] | None = None, runtime: str = "torch",
               checkpoint_name: str | None = None) -> SlidePlan:
    """Opens the slide, finds its tissue and the cores to segment, and opens (or, to resume,
    reopens) its run folder. runtime: what runs the model, "torch" or "onnx" (resolved)."""
    from ..inference import card_value, overlap_for
    from ..instances import InstanceParams

    started = time.time()
    # resolved here (None: the card's), so a resumed run is checked against the tiling it used
    overlap = overlap_for(card, overlap)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(path, out_dir)
    mode = mode or card_value(card, "task", "nuclei")
    settings = {k: v for k, v in dict(mode=mode, threshold=threshold, min_size=min_size).items()
                if v is not None}
    params = InstanceParams.from_card(card, **settings)
    rule = rule_for(params)
    if region is not None:
        region = tuple(int(v) for v in region)
        if not (0 <= region[0] < region[1] and 0 <= region[2] < region[3]):
            raise ValueError(f"region must be (y0, y1, x0, x1) with y0 < y1, x0 < x1; got "
                             f"{region}")
    with open_slide(path) as slide:
        h, w = slide.shape
        mask = slide_tissue(slide) if tissue else TissueMask.everywhere((h, w))
        mpp = slide.mpp
    tissue_seconds = time.time() - started
    grid = ChunkGrid(h, w, chunk, margin)

    def in_region(core: Core) -> bool:
        return region is None or (core.y0 < region[1] and core.y1 > region[0]
                                  and core.x0 < region[3] and core.x1 > region[2])

    cores = grid.cores()
    boxes: dict[int, tuple[int, int, int, int] | None] = {}
    for core in cores:
        if in_region(core) and mask.touches(core.y0 - margin, core.y1 + margin,
                                            core.x0 - margin, core.x1 + margin):
            window = grid.window(core)
            # only the part of the window holding tissue goes through the model (glass around
            # it is background); the model still sees its own context around that part
            box = mask.box_within(*window, pad=margin) if tissue else None
            boxes[core.index] = None if box is None or box == window else box
    region_tissue = None if region is None else sum(
        mask.area_pixels((c.y0, c.y1, c.x0, c.x1)) for c in cores if in_region(c)) / 1e6
    signature = {"slide": Path(path).name, "shape": [h, w], "chunk": chunk, "margin": margin,
                 "rule": rule, "params": {k: getattr(params, k) for k in
                                          params.__dataclass_fields__},
                 "tile": tile_size, "overlap": overlap, "tissue": bool(tissue),
                 "region": None if region is None else list(region),
                 # torch and the graph agree within 1e-4, not bit for bit: a resumed run
                 # keeps the runtime its completed chunks were made with
                 "runtime": runtime,
                 "checkpoint": checkpoint_name or card_value(card, "architecture", "")}
    _open_work(paths["run"], (h, w), chunk, signature)
    log = ChunkLog(paths["run"] / "chunks", signature)
    store = PartStore(paths["run"] / "parts")
    pending = [i for i in boxes if i not in log.records and not store.has(i)]
    tissue_px = mask.area_pixels() if tissue else float(h * w)
    tissue_um2 = mask.area_um2(mpp) if tissue else (
        None if mpp is None else h * w * mpp[0] * mpp[1])
    return SlidePlan(str(path), str(out_dir), (h, w), chunk, margin, rule, mode, settings,
                     tile_size, overlap, bool(tissue), region, signature, boxes, pending,
                     tissue_px, tissue_um2, region_tissue, started, {"tissue": tissue_seconds})


def core_part(plan: SlidePlan, slide: Slide, core: Core, model: Any, card: Any, runner: Any,
              batch_size: int = 4) -> CorePart:
    """The per-core step of one tissue core: the model over its window, the instance step, and
    what the core contributes to the seams (chunked_instances.window_part). A pure function of
    the slide and the settings: any process computes the same part."""
    from ..inference import predict
    from ..instances import probabilities_to_labels
    window = plan.grid.window(core)
    box = plan.boxes[core.index] or window

    def predict_box(y0, y1, x0, x1):
        return predict(model, slide.levels[0], card, tile_size=plan.tile_size,
                       overlap=plan.overlap, batch_size=batch_size, region=(y0, y1, x0, x1),
                       runner=runner)
    prob = predict_box(*box)
    if box != window:
        y0, y1, x0, x1 = window
        out = np.zeros(prob.shape[:-2] + (y1 - y0, x1 - x0), np.float32)
        if out.ndim == 3:
            out[0] = 1.0   # multi-class: P(background) = 1 on the glass
        out[..., box[0] - y0:box[1] - y0, box[2] - x0:box[3] - x0] = prob
        prob = out
    labels = np.asarray(probabilities_to_labels(prob, card, **plan.settings))
    return window_part(labels, window, core, plan.rule)


def runtime_label(graph: str) -> str:
    """How the model ran, for the summary: "torch", "torch (fallback)", "onnx (cached graph)"."""
    return graph if graph.startswith("torch") else f"onnx ({graph} graph)"


def segment_slide(path: str | Path, model: Any, card: Any, out_dir: str | Path, *,
                  mode: str | None = None, threshold: float | None = None,
                  min_size: int | None = None, tile_size: int | None = None,
                  overlap: float | None = None, batch_size: int = 4, device: str = "cpu",
                  tta: bool = False, tissue: bool = True, chunk: int = DEFAULT_CHUNK,
                  margin: int = DEFAULT_MARGIN, geojson: bool = True, table: bool = True,
                  progress: SlideProgress | None = None, cancel: Callable[[], bool] | None = None,
                  runner: Any = None, checkpoint_name: str | None = None,
                  runtime: str = "torch", region: tuple[int, int, int, int] | None = None,
                  graph: str | None = None) -> SlideResult:
    """Segments one slide (any format open_slide reads) into `out_dir`, in this process; see the
    module docstring.

    mode / threshold / min_size: post-processing (default: the checkpoint's card). tissue: find
    the tissue first and segment only chunks touching it (False: every chunk). chunk: core size
    in level-0 pixels (a multiple of 64 so the label pyramid's levels align). margin: context
    around each core for the instance step (larger than the largest nucleus). runtime: "torch",
    "onnx" or "auto" (runtime_onnx; the exported graph is made once per process and shared
    through the cache, see slide/runtime.py); ignored when a `runner` is given (`graph`: how that
    runner got its graph, for the summary). region: a level-0 box (y0, y1, x0, x1); only the
    cores meeting it are segmented, the rest stay 0 (a drawn region, or a measured sample of a
    slide too large to time whole)."""
    if runner is None:
        runner, graph = slide_runner(model, card, device=device, runtime=runtime, tta=tta,
                                     batch_size=batch_size, tile_size=tile_size)
    # openvino runs the same exported graph: recorded as "onnx" (the plan's graph / torch marker)
    exported = runner.runtime in ("onnx", "openvino")
    graph = graph or ("onnx" if exported else "torch")
    plan = plan_slide(path, card, out_dir, mode=mode, threshold=threshold, min_size=min_size,
                      tile_size=tile_size, overlap=overlap, tissue=tissue, chunk=chunk,
                      margin=margin, region=region, checkpoint_name=checkpoint_name,
                      runtime="onnx" if exported else "torch")
    with open_slide(path) as slide:
        return finish_slide(plan, slide, lambda core: core_part(plan, slide, core, model, card,
                                                                runner, batch_size),
                            runtime_label(graph), geojson=geojson, table=table,
                            progress=progress, cancel=cancel)


def finish_slide(plan: SlidePlan, slide: Slide, part_for: Callable[[Core], CorePart],
                 ran_with: str, *, geojson: bool = True, table: bool = True,
                 progress: SlideProgress | None = None, cancel: Callable[[], bool] | None = None
                 ) -> SlideResult:
    """The seams and the writers of a planned slide: every tissue core's part (part_for: computed
    now, or stored by a chunk task) stitched into the work labels (resuming from the stitched
    cores' records), then the label pyramid, GeoJSON and object table; the run folder is removed
    once all are written. ran_with: how the model ran, for the summary."""
    paths, grid = plan.paths, plan.grid
    h, w = plan.shape
    stages = dict(plan.stages)
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        stages[name] = now - clock[0]
        clock[0] = now

    cores = grid.cores()
    work = _open_work(paths["run"], (h, w), plan.chunk, plan.signature)
    log = ChunkLog(paths["run"] / "chunks", plan.signature)
    resumed = sum(1 for r in log.records.values() if not r.skipped)
    eta = _Eta(len(plan.boxes) - resumed)

    def on_core(done, total):
        if progress is not None:
            segmented = sum(1 for r in log.records.values() if not r.skipped) - resumed
            progress("segment", done, total, eta.tick(segmented))

    result = stitch_cores(part_for, work, grid, plan.rule, include=plan.includes, log=log,
                          progress=on_core, cancel=cancel)
    lap("segment")

    levels = min(pyramid_levels((h, w)), _power_of_two_levels(plan.chunk))
    class_name = CLASS_NAMES.get(plan.mode, "Object")
    writer = LabelPyramidWriter(paths["labels"], (h, w), name=plan.mode, mpp=slide.mpp,
                                chunk=min(plan.chunk, 1024), levels=levels, colors=None)
    for i, (y0, x0, block) in enumerate(final_blocks(work, result.lut, grid), 1):
        writer.write(y0, x0, block)
        if progress is not None:
            progress("write", i, len(cores), None)
    writer.close()
    lap("write")

    wrote_geojson = wrote_table = None
    if plan.mode != "semantic" and (geojson or table):
        wrote_geojson, wrote_table = _write_objects(
            slide, open_labels(paths["labels"]), result.boxes, grid, paths, class_name,
            geojson, table, progress)
        lap("objects")

    shutil.rmtree(paths["run"], ignore_errors=True)
    return SlideResult(Path(plan.path), paths["labels"], wrote_geojson, wrote_table,
                       result.n_objects, plan.tissue_px / float(h * w),
                       None if plan.tissue_um2 is None else plan.tissue_um2 / 1e6,
                       plan.tissue_px / 1e6, len(cores), result.cores - result.skipped,
                       time.time() - plan.started, (h, w), stages, region=plan.region,
                       region_tissue_megapixels=plan.region_tissue, runtime=ran_with,
                       chunks_resumed=resumed)


def _power_of_two_levels(chunk: int) -> int:
    """Pyramid levels whose sampling step 2**k divides the chunk size (so blocks align)."""
    k = 0
    while chunk % (2 ** (k + 1)) == 0 and k < 16:
        k += 1
    return k + 1


def _open_work(run_dir: Path, shape: tuple[int, int], chunk: int, signature: dict):
    """The work label store of a run (created, or reopened to resume)."""
    import zarr
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "work.zarr"
    sig = run_dir / "signature.json"
    if path.exists() and sig.exists() and json.loads(sig.read_text()) == \
            json.loads(json.dumps(signature)):
        return zarr.open_array(str(path), mode="r+")
    # new settings (or no usable earlier run): start this slide afresh
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(run_dir / "chunks", ignore_errors=True)
    shutil.rmtree(run_dir / "parts", ignore_errors=True)
    sig.write_text(json.dumps(signature, sort_keys=True))
    # smaller chunks than the cores: an owned object reaching into a neighbour rewrites less
    side = max(256, chunk // 4)
    return zarr.open_array(str(path), mode="w", shape=shape, chunks=(side, side),
                           dtype=np.uint32, fill_value=0)


def _write_objects(slide: Slide, labels: Any, boxes: np.ndarray, grid: ChunkGrid,
                   paths: dict[str, Path], class_name: str, geojson: bool, table: bool,
                   progress: SlideProgress | None) -> tuple[Path | None, Path | None]:
    """GeoJSON features and table rows for every object, measured on the final labels one core
    at a time (objects grouped by the core holding their box's corner; each read once)."""
    colour = CLASS_COLOURS.get(class_name, (255, 200, 0))
    gj = GeoJSONWriter(paths["geojson"]) if geojson else None
    tb = ObjectTableWriter(paths["table"]) if table else None
    window_limit = 4 * (grid.chunk + 2 * grid.margin) ** 2
    groups = boxes_by_anchor(boxes, grid)
    try:
        for i, key in enumerate(sorted(groups), 1):
            group = groups[key]
            uy0, ux0 = int(group[:, 1].min()), int(group[:, 2].min())
            uy1, ux1 = int(group[:, 3].max()), int(group[:, 4].max())
            if (uy1 - uy0) * (ux1 - ux0) <= window_limit:
                windows = [(group, (uy0, uy1, ux0, ux1))]
            else:   # a very large object: read each box on its own
                windows = [(row[None], (int(row[1]), int(row[3]), int(row[2]), int(row[4])))
                           for row in group]
            for rows, (y0, y1, x0, x1) in windows:
                lab = np.asarray(labels[y0:y1, x0:x1])
                rgb = slide.read(0, y0, y1, x0, x1)
                measured = measure_window(lab, rgb, rows[:, 0], y0, x0, slide.mpp)
                outlines = window_polygons(lab, rows[:, 0], y0, x0) if gj is not None else {}
                for oid, by0, bx0, by1, bx1 in rows.tolist():
                    values = measured.get(oid)
                    if values is None:
                        continue
                    if tb is not None:
                        tb.add(oid, values)
                    rings = outlines.get(oid)
                    if rings:
                        gj.add(feature(rings, object_uuid(slide.path.name, oid), class_name,
                                       colour, _qupath_measurements(values), oid))
            if progress is not None:
                progress("measure", i, len(groups), None)
    except BaseException:
        for writer in (gj, tb):
            if writer is not None:
                writer.abort()
        raise
    return (gj.close() if gj else None), (tb.close() if tb else None)


def _qupath_measurements(values: dict) -> dict:
    names = {"area_um2": "Area µm^2", "perimeter_um": "Perimeter µm", "eccentricity": "Eccentricity",
             "mean_haematoxylin": "Hematoxylin OD mean", "mean_eosin": "Eosin OD mean",
             "area_px": "Area px"}
    return {label: values[key] for key, label in names.items()
            if values.get(key) is not None and math.isfinite(values[key])}
