"""Probabilities -> instance labels chunk by chunk, in memory that does not grow with the image.

The image is cut into square cores of `chunk` pixels; each core is labelled from the probabilities
of its window (the core plus `margin` pixels of context on every side) by
`instances.probabilities_to_labels`, the same per-tile function the whole-image path uses (so every
head / post-processing it knows works here unchanged). Objects that cross a core border are
stitched so that each comes out once, whole, with one id unique across the image:

  "own"  (objects split by a watershed: nuclei) - overlapping windows and an ownership rule, as
         StarDist's big-image prediction does: an object belongs to the core holding the top-left
         corner of its bounding box and is written whole from that core's window (it may reach into
         the neighbours' cores); objects anchored in another core are left to it. Where two
         windows segmented a border object slightly differently, the first written keeps its
         pixels and a later object that would keep less than half of its own is dropped, so
         nothing is counted twice. Exact for objects smaller than the margin.
  "join" (connected components that may be larger than any overlap: glands) - each core keeps
         the crop of its window's labels; labels that touch across a core face (4-neighbours on
         the two sides of the face) are joined with a union-find over the whole image, as
         cellpose's distributed segmentation does, and a final pass renumbers them 1..n.
  "tile" (semantic class maps) - each core keeps its crop; nothing to join.

Each core's work has two steps. The per-core step (`window_part`: probabilities -> labels -> the
part of them the core contributes: its owned objects, or its crop) needs nothing from any other
core, so cores can run anywhere, in any order, in parallel (slide/cluster.py runs them as dask
tasks, each storing its part in a `PartStore`). The seam step (`stitch_cores`) then resolves
ownership conflicts and joins faces in raster order of cores, writing into the work labels; it only
reads stored parts and the work array, so it costs little next to the model. `label_cores` does
both, core after core, in one process. Either way a core's part is a pure function of its window,
so the labels are the same.

After each stitched core, a small record (ids it used, bounding boxes, face pairs) is kept (on
disk when a `ChunkLog` folder is given), so a run that was killed resumes from its completed cores
and produces the same labels: re-running a core is idempotent.
Peak memory: a few windows of probabilities and labels, plus 4 bytes per object for the
renumbering table.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from scipy import ndimage as ndi

RULES = ("own", "join", "tile")
DEFAULT_CHUNK = 2048
DEFAULT_MARGIN = 64       # > a nucleus diameter at 0.25-0.5 µm/px
# Images with more pixels than this go through the chunked step in InstanceMaker.
CHUNKED_ABOVE_PIXELS = 4096 * 4096

ProbabilitySource = Callable[[int, int, int, int], np.ndarray]   # (y0, y1, x0, x1) -> (..., h, w)
LabelFunction = Callable[[np.ndarray], np.ndarray]               # probabilities -> int labels


def rule_for(params: Any) -> str:
    """The stitching rule for an InstanceParams: "tile" for semantic maps, "own" when touching
    objects are split (nuclei), "join" for connected components (glands)."""
    if getattr(params, "mode", None) == "semantic":
        return "tile"
    return "own" if getattr(params, "splits", False) else "join"


@dataclass(frozen=True)
class Core:
    index: int
    y0: int
    y1: int
    x0: int
    x1: int


@dataclass(frozen=True)
class ChunkGrid:
    """Square cores of `chunk` pixels over an (height, width) image, windows `margin` wider."""
    height: int
    width: int
    chunk: int = DEFAULT_CHUNK
    margin: int = DEFAULT_MARGIN

    def cores(self) -> list[Core]:
        out = []
        for y in range(0, self.height, self.chunk):
            for x in range(0, self.width, self.chunk):
                out.append(Core(len(out), y, min(self.height, y + self.chunk), x,
                                min(self.width, x + self.chunk)))
        return out

    def core(self, index: int) -> Core:
        """The core cores()[index], without listing them all."""
        cols = -(-self.width // self.chunk)
        y0, x0 = (index // cols) * self.chunk, (index % cols) * self.chunk
        if not (0 <= index and y0 < self.height):
            raise IndexError(f"core {index} is outside a grid of {len(self.cores())} cores")
        return Core(index, y0, min(self.height, y0 + self.chunk), x0,
                    min(self.width, x0 + self.chunk))

    def window(self, core: Core) -> tuple[int, int, int, int]:
        m = self.margin
        return (max(0, core.y0 - m), min(self.height, core.y1 + m),
                max(0, core.x0 - m), min(self.width, core.x1 + m))


@dataclass
class ChunkRecord:
    """What one completed core contributed: ids first_id+1 .. first_id+count, their bounding
    boxes (id, y0, x0, y1, x1) in image pixels, and (id, id) pairs touching across its top and
    left faces (rule "join")."""
    index: int
    first_id: int
    count: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.int64))
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    skipped: bool = False


class ChunkLog:
    """Completed cores, in memory and (with a folder) on disk, one small .npz per core written
    to a temporary name and renamed: a killed run leaves only complete records."""

    def __init__(self, folder: str | Path | None = None, signature: dict | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.records: dict[int, ChunkRecord] = {}
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        sig_path = self.folder / "signature.json"
        signature = signature or {}
        if sig_path.exists():
            old = json.loads(sig_path.read_text())
            if old != json.loads(json.dumps(signature)):
                raise ValueError(f"{self.folder} holds a run with other settings ({old}); remove it "
                                 f"or use a fresh output folder")
        else:
            _write_text(sig_path, json.dumps(signature, sort_keys=True))
        for path in sorted(self.folder.glob("chunk_*.npz")):
            with np.load(path, allow_pickle=False) as z:
                meta = z["meta"]
                self.records[int(meta[0])] = ChunkRecord(int(meta[0]), int(meta[1]), int(meta[2]),
                                                         z["boxes"], z["pairs"], bool(meta[3]))

    def add(self, record: ChunkRecord) -> None:
        self.records[record.index] = record
        if self.folder is None:
            return
        path = self.folder / f"chunk_{record.index:07d}.npz"
        tmp = path.with_name(path.name + ".part.npz")
        np.savez(tmp, meta=np.array([record.index, record.first_id, record.count,
                                     int(record.skipped)], np.int64),
                 boxes=record.boxes, pairs=record.pairs)
        os.replace(tmp, path)

    def next_id(self) -> int:
        return max((r.first_id + r.count for r in self.records.values()), default=0)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class ChunkedResult:
    """lut: old id -> final id (None when ids are already final); boxes: (final id, y0, x0, y1, x1)
    sorted by id; n_objects; cores done and skipped."""
    lut: np.ndarray | None
    boxes: np.ndarray
    n_objects: int
    cores: int
    skipped: int


def label_cores(prob_for: ProbabilitySource, label_fn: LabelFunction, work: Any,
                grid: ChunkGrid, rule: str, *, include: Callable[[Core], bool] | None = None,
                log: ChunkLog | None = None, progress: Callable[[int, int], Any] | None = None,
                cancel: Callable[[], bool] | None = None) -> ChunkedResult:
    """Labels every core of `grid` into `work` (an (H, W) integer array: numpy, memmap, zarr;
    zeros where nothing was written yet) following `rule`, then works out the renumbering.

    prob_for(y0, y1, x0, x1): probabilities of that window, (h, w) or (K, h, w).
    label_fn(prob): int labels of a window (instances.probabilities_to_labels with settings).
    include(core): False to skip a core (no tissue): it stays 0 and costs nothing.
    """
    def part_for(core: Core) -> "CorePart":
        window = grid.window(core)
        return window_part(np.asarray(label_fn(prob_for(*window))), window, core, rule)
    return stitch_cores(part_for, work, grid, rule, include=include, log=log, progress=progress,
                        cancel=cancel)


@dataclass
class CorePart:
    """What one core contributes before the seams are resolved: `labels` (local ids) over the
    level-0 box `box` (y0, y1, x0, x1). Rule "own": the core's window, holding only the objects
    the core owns; "join" / "tile": the core's own crop."""
    labels: np.ndarray
    box: tuple[int, int, int, int]


def window_part(labels: np.ndarray, window: tuple[int, int, int, int], core: Core,
                rule: str) -> CorePart:
    """The per-core step after labelling a window: keep what `core` contributes under `rule`."""
    wy0, wy1, wx0, wx1 = window
    if rule != "own":
        crop = labels[core.y0 - wy0:core.y1 - wy0, core.x0 - wx0:core.x1 - wx0]
        return CorePart(np.ascontiguousarray(crop), (core.y0, core.y1, core.x0, core.x1))
    # ownership: the object's box has its top-left corner in the core (see the module docstring);
    # the others belong to a neighbour and are dropped here, ids unchanged
    keep = np.zeros(int(labels.max(initial=0)) + 1, bool)
    for lab, sl in enumerate(ndi.find_objects(labels), 1):
        if sl is not None:
            keep[lab] = (core.y0 <= wy0 + sl[0].start < core.y1
                         and core.x0 <= wx0 + sl[1].start < core.x1)
    return CorePart(np.where(keep[labels], labels, 0), (wy0, wy1, wx0, wx1))


class PartStore:
    """Per-core parts on disk, one compressed .npz per core written to a temporary name and
    renamed: a core computed twice (a retried task) just rewrites the same file, and a reader
    never sees half of one."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, index: int) -> Path:
        return self.folder / f"part_{index:07d}.npz"

    def has(self, index: int) -> bool:
        return self.path(index).exists()

    def save(self, index: int, part: CorePart) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(index)
        # the temporary name is unique per process: two attempts at one core never share a file
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.part.npz")
        np.savez_compressed(tmp, labels=part.labels, box=np.array(part.box, np.int64))
        os.replace(tmp, path)

    def load(self, index: int) -> CorePart | None:
        if not self.has(index):
            return None
        with np.load(self.path(index), allow_pickle=False) as z:
            return CorePart(z["labels"], tuple(int(v) for v in z["box"]))


def stitch_cores(part_for: Callable[[Core], CorePart], work: Any, grid: ChunkGrid, rule: str, *,
                 include: Callable[[Core], bool] | None = None, log: ChunkLog | None = None,
                 progress: Callable[[int, int], Any] | None = None,
                 cancel: Callable[[], bool] | None = None) -> ChunkedResult:
    """The seam step: every core's part (part_for(core): computed now, or loaded from a
    PartStore) written into `work` in raster order of cores, with ids unique across the image,
    ownership conflicts resolved (rule "own") and labels touching across faces joined ("join")."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    log = log or ChunkLog()
    cores = grid.cores()
    next_id = log.next_id()
    skipped = sum(1 for r in log.records.values() if r.skipped)
    for done, core in enumerate(cores, 1):
        if core.index in log.records:
            continue
        if cancel is not None and cancel():
            raise InterruptedError(f"cancelled after {len(log.records)} of {len(cores)} chunks")
        if include is not None and not include(core):
            log.add(ChunkRecord(core.index, next_id, 0, skipped=True))
            skipped += 1
        else:
            # every rule labels with context: "join"/"tile" then see an object cut by the core
            # border as the larger part of itself the margin holds (filled, size-filtered as such)
            part = part_for(core)
            if rule == "own":
                record = _write_owned(work, part.labels, part.box, core, next_id)
            else:
                record = _write_core(work, part.labels, part.box, core, next_id,
                                     faces=(rule == "join"))
            log.add(record)
            next_id = record.first_id + record.count
        if progress is not None:
            progress(done, len(cores))
    return _finish(log, rule, next_id, len(cores), skipped)


def _write_owned(work: Any, labels: np.ndarray, window, core: Core, first_id: int) -> ChunkRecord:
    wy0, wy1, wx0, wx1 = window
    region = np.asarray(work[wy0:wy1, wx0:wx1]).copy()
    boxes = []
    new_id = first_id
    for lab, sl in enumerate(ndi.find_objects(labels), 1):
        if sl is None:
            continue
        ay, ax = wy0 + sl[0].start, wx0 + sl[1].start   # the anchor: top-left of the box
        if not (core.y0 <= ay < core.y1 and core.x0 <= ax < core.x1):
            continue
        mine = labels[sl] == lab
        current = region[sl]
        # pixels already holding this id come from an interrupted earlier attempt at this core
        free = mine & ((current == 0) | (current == new_id + 1))
        if 2 * int(free.sum()) < int(mine.sum()):
            continue   # another core already wrote (most of) this object
        new_id += 1
        current[free] = new_id
        ys, xs = np.nonzero(free)
        boxes.append((new_id, wy0 + sl[0].start + ys.min(), wx0 + sl[1].start + xs.min(),
                      wy0 + sl[0].start + ys.max() + 1, wx0 + sl[1].start + xs.max() + 1))
    work[wy0:wy1, wx0:wx1] = region
    return ChunkRecord(core.index, first_id, new_id - first_id,
                       np.array(boxes, np.int64).reshape(-1, 5))


def _write_core(work: Any, labels: np.ndarray, window, core: Core, first_id: int,
                faces: bool) -> ChunkRecord:
    wy0, _, wx0, _ = window
    crop = labels[core.y0 - wy0:core.y1 - wy0, core.x0 - wx0:core.x1 - wx0]
    present, inverse = np.unique(crop, return_inverse=True)
    inverse = inverse.reshape(crop.shape)
    if present[0] == 0:
        ids = np.concatenate([[0], np.arange(first_id + 1, first_id + len(present))])
    else:
        ids = np.arange(first_id + 1, first_id + 1 + len(present))
    ids = ids.astype(np.int64)
    out = ids[inverse]
    count = int(np.count_nonzero(ids))
    boxes = []
    # find_objects numbers from 1: slot k holds the box of present[k]
    for k, sl in enumerate(ndi.find_objects(inverse + 1)):
        if sl is None or ids[k] == 0:
            continue
        boxes.append((ids[k], core.y0 + sl[0].start, core.x0 + sl[1].start,
                      core.y0 + sl[0].stop, core.x0 + sl[1].stop))
    pairs = np.zeros((0, 2), np.int64)
    if faces:
        found = []
        if core.y0 > 0:
            found.append(_touching(np.asarray(work[core.y0 - 1, core.x0:core.x1]), out[0]))
        if core.x0 > 0:
            found.append(_touching(np.asarray(work[core.y0:core.y1, core.x0 - 1]), out[:, 0]))
        if found:
            pairs = np.unique(np.concatenate(found), axis=0)
    work[core.y0:core.y1, core.x0:core.x1] = out
    return ChunkRecord(core.index, first_id, count, np.array(boxes, np.int64).reshape(-1, 5),
                       pairs)


def _touching(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    both = (a > 0) & (b > 0)
    return np.stack([a[both], b[both]], 1).astype(np.int64).reshape(-1, 2)


def _finish(log: ChunkLog, rule: str, next_id: int, n_cores: int, skipped: int) -> ChunkedResult:
    records = list(log.records.values())
    boxes = np.concatenate([r.boxes for r in records] + [np.zeros((0, 5), np.int64)])
    if rule != "join":
        order = np.argsort(boxes[:, 0], kind="stable")
        return ChunkedResult(None, boxes[order], int(next_id), n_cores, skipped)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    pairs = np.concatenate([r.pairs for r in records] + [np.zeros((0, 2), np.int64)])
    n = next_id + 1
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    # components are numbered in order of their smallest id, and id 0 (background) is alone: the
    # component numbers are the final ids 0..n_objects, in order of first appearance
    lut = comp.astype(np.uint32)
    n_objects = int(lut.max()) if len(lut) else 0
    final = lut[boxes[:, 0]] if len(boxes) else np.zeros(0, np.int64)
    merged = np.zeros((n_objects, 5), np.int64)
    if n_objects:
        merged[:, 0] = np.arange(1, n_objects + 1)
        merged[:, 1:3] = np.iinfo(np.int64).max
        np.minimum.at(merged[:, 1], final - 1, boxes[:, 1])
        np.minimum.at(merged[:, 2], final - 1, boxes[:, 2])
        np.maximum.at(merged[:, 3], final - 1, boxes[:, 3])
        np.maximum.at(merged[:, 4], final - 1, boxes[:, 4])
    return ChunkedResult(lut, merged, n_objects, n_cores, skipped)


def final_blocks(work: Any, lut: np.ndarray | None, grid: ChunkGrid, dtype=np.uint32
                 ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(y0, x0, block) of final labels, one core at a time: work renumbered through `lut`."""
    for core in grid.cores():
        block = np.asarray(work[core.y0:core.y1, core.x0:core.x1])
        yield core.y0, core.x0, (lut[block] if lut is not None else block).astype(dtype, copy=False)


def chunked_labels(prob: np.ndarray, label_fn: LabelFunction, rule: str, *,
                   chunk: int = DEFAULT_CHUNK, margin: int = DEFAULT_MARGIN,
                   dtype=np.int32) -> np.ndarray:
    """In-memory convenience: (H, W) or (K, H, W) probabilities -> (H, W) labels, labelled core by
    core (the whole-image path for large images). Memory besides input and output: a few windows."""
    prob = np.asarray(prob)
    h, w = prob.shape[-2:]
    grid = ChunkGrid(h, w, chunk, margin)
    work = np.zeros((h, w), np.int64 if dtype == np.int64 else np.int32)
    result = label_cores(lambda y0, y1, x0, x1: prob[..., y0:y1, x0:x1], label_fn, work, grid, rule)
    if result.lut is not None:
        lut = result.lut.astype(work.dtype)
        for core in grid.cores():
            block = work[core.y0:core.y1, core.x0:core.x1]
            block[...] = lut[block]
    return work.astype(dtype, copy=False)


def boxes_by_anchor(boxes: np.ndarray, grid: ChunkGrid) -> dict[int, np.ndarray]:
    """Objects (rows of `boxes`) grouped by the core holding their box's top-left corner."""
    if not len(boxes):
        return {}
    cols = -(-grid.width // grid.chunk)
    index = (boxes[:, 1] // grid.chunk) * cols + boxes[:, 2] // grid.chunk
    order = np.argsort(index, kind="stable")
    keys, starts = np.unique(index[order], return_index=True)
    groups = np.split(boxes[order], starts[1:])
    return {int(k): g for k, g in zip(keys, groups)}
