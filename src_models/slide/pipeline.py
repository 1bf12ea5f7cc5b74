"""One whole slide, end to end, in bounded memory, resumable:

    open_slide (lazy pyramid) -> tissue mask on a low level -> cores of `chunk` px that touch tissue
      -> inference.predict on each core's window (with its own context) -> instances'
         probabilities_to_labels -> chunked_instances stitching into a work label store (zarr)
      -> OME-Zarr label pyramid (renumbered) -> GeoJSON (QuPath) + object table (CSV)

Outputs for slide <stem> in `out_dir`: <stem>.ome.zarr, <stem>.geojson, <stem>_objects.csv.
While it runs, <stem>.run/ holds the work labels and one record per completed core: a run killed
at any point and started again with the same settings continues from there and produces the
same labels; it is removed when the slide is complete.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..chunked_instances import (DEFAULT_CHUNK, DEFAULT_MARGIN, ChunkGrid, ChunkLog, Core,
                                 boxes_by_anchor, final_blocks, label_cores, rule_for)
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


def segment_slide(path: str | Path, model: Any, card: Any, out_dir: str | Path, *,
                  mode: str | None = None, threshold: float | None = None,
                  min_size: int | None = None, tile_size: int | None = None,
                  overlap: float = 0.25, batch_size: int = 4, device: str = "cpu",
                  tta: bool = False, tissue: bool = True, chunk: int = DEFAULT_CHUNK,
                  margin: int = DEFAULT_MARGIN, geojson: bool = True, table: bool = True,
                  progress: SlideProgress | None = None, cancel: Callable[[], bool] | None = None,
                  runner: Any = None, checkpoint_name: str | None = None,
                  runtime: str = "torch", region: tuple[int, int, int, int] | None = None
                  ) -> SlideResult:
    """Segments one slide (any format open_slide reads) into `out_dir`; see the module docstring.

    mode / threshold / min_size: post-processing (default: the checkpoint's card). tissue: find
    the tissue first and segment only chunks touching it (False: every chunk). chunk: core size
    in level-0 pixels (a multiple of 64 so the label pyramid's levels align). margin: context
    around each core for the instance step (larger than the largest nucleus). runtime: "torch",
    "onnx" or "auto" (runtime_onnx; the exported graph is made once per process and shared
    through the cache, see slide/runtime.py); ignored when a `runner` is given. region: a level-0
    box (y0, y1, x0, x1); only the cores meeting it are segmented, the rest stay 0 (a drawn
    region, or a measured sample of a slide too large to time whole)."""
    from ..inference import card_value, predict
    from ..instances import InstanceParams, probabilities_to_labels

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(path, out_dir)
    mode = mode or card_value(card, "task", "nuclei")
    settings = {k: v for k, v in dict(mode=mode, threshold=threshold, min_size=min_size).items()
                if v is not None}
    params = InstanceParams.from_card(card, **settings)
    rule = rule_for(params)
    if runner is None:
        runner, graph = slide_runner(model, card, device=device, runtime=runtime, tta=tta,
                                     batch_size=batch_size, tile_size=tile_size)
    else:
        graph = "onnx" if runner.runtime == "onnx" else "torch"
    ran_with = graph if graph.startswith("torch") else f"onnx ({graph} graph)"

    stages: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        stages[name] = now - clock[0]
        clock[0] = now

    with open_slide(path) as slide:
        h, w = slide.shape
        mask = slide_tissue(slide) if tissue else TissueMask.everywhere((h, w))
        lap("tissue")
        grid = ChunkGrid(h, w, chunk, margin)

        if region is not None:
            region = tuple(int(v) for v in region)
            if not (0 <= region[0] < region[1] and 0 <= region[2] < region[3]):
                raise ValueError(f"region must be (y0, y1, x0, x1) with y0 < y1, x0 < x1; got "
                                 f"{region}")

        def in_region(core: Core) -> bool:
            return region is None or (core.y0 < region[1] and core.y1 > region[0]
                                      and core.x0 < region[3] and core.x1 > region[2])

        def include(core: Core) -> bool:
            return in_region(core) and mask.touches(core.y0 - margin, core.y1 + margin,
                                                    core.x0 - margin, core.x1 + margin)

        cores = grid.cores()
        region_tissue = None if region is None else sum(
            mask.area_pixels((c.y0, c.y1, c.x0, c.x1)) for c in cores if in_region(c)) / 1e6
        to_segment = sum(1 for c in cores if include(c))
        signature = {"slide": Path(path).name, "shape": [h, w], "chunk": chunk, "margin": margin,
                     "rule": rule, "params": {k: getattr(params, k) for k in
                                              params.__dataclass_fields__},
                     "tile": tile_size, "overlap": overlap, "tissue": bool(tissue),
                     "region": None if region is None else list(region),
                     # torch and the graph agree within 1e-4, not bit for bit: a resumed run
                     # keeps the runtime its completed chunks were made with
                     "runtime": "onnx" if runner.runtime == "onnx" else "torch",
                     "checkpoint": checkpoint_name or card_value(card, "architecture", "")}
        work = _open_work(paths["run"], (h, w), chunk, signature)
        log = ChunkLog(paths["run"] / "chunks", signature)
        resumed = sum(1 for r in log.records.values() if not r.skipped)
        eta = _Eta(to_segment - resumed)

        def predict_box(y0, y1, x0, x1):
            return predict(model, slide.levels[0], card, tile_size=tile_size, overlap=overlap,
                           batch_size=batch_size, region=(y0, y1, x0, x1), runner=runner)

        def prob_for(y0, y1, x0, x1):
            # only the part of the window holding tissue goes through the model (glass around
            # it is background); the model still sees its own context around that part
            box = mask.box_within(y0, y1, x0, x1, pad=margin) if tissue else None
            if box is None or box == (y0, y1, x0, x1):
                return predict_box(y0, y1, x0, x1)
            part = predict_box(*box)
            out = np.zeros(part.shape[:-2] + (y1 - y0, x1 - x0), np.float32)
            if out.ndim == 3:
                out[0] = 1.0   # multi-class: P(background) = 1 on the glass
            out[..., box[0] - y0:box[1] - y0, box[2] - x0:box[3] - x0] = part
            return out

        def label_fn(prob):
            return probabilities_to_labels(prob, card, **settings)

        def on_core(done, total):
            if progress is not None:
                segmented = sum(1 for r in log.records.values() if not r.skipped) - resumed
                progress("segment", done, total, eta.tick(segmented))

        result = label_cores(prob_for, label_fn, work, grid, rule, include=include, log=log,
                             progress=on_core, cancel=cancel)
        lap("segment")

        levels = min(pyramid_levels((h, w)), _power_of_two_levels(chunk))
        class_name = CLASS_NAMES.get(mode, "Object")
        writer = LabelPyramidWriter(paths["labels"], (h, w), name=mode, mpp=slide.mpp,
                                    chunk=min(chunk, 1024), levels=levels,
                                    colors=None)
        for i, (y0, x0, block) in enumerate(final_blocks(work, result.lut, grid), 1):
            writer.write(y0, x0, block)
            if progress is not None:
                progress("write", i, len(cores), None)
        writer.close()
        lap("write")

        wrote_geojson = wrote_table = None
        if mode != "semantic" and (geojson or table):
            wrote_geojson, wrote_table = _write_objects(
                slide, open_labels(paths["labels"]), result.boxes, grid, paths, class_name,
                geojson, table, progress)
            lap("objects")

        tissue_px = mask.area_pixels() if tissue else float(h * w)
        tissue_um2 = mask.area_um2(slide.mpp) if tissue else (
            None if slide.mpp is None else h * w * slide.mpp[0] * slide.mpp[1])
        fraction = tissue_px / float(h * w)
        shape = (h, w)

    shutil.rmtree(paths["run"], ignore_errors=True)
    return SlideResult(Path(path), paths["labels"], wrote_geojson, wrote_table, result.n_objects,
                       fraction, None if tissue_um2 is None else tissue_um2 / 1e6,
                       tissue_px / 1e6, len(cores), result.cores - result.skipped,
                       time.perf_counter() - start, shape, stages, region=region,
                       region_tissue_megapixels=region_tissue, runtime=ran_with,
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
