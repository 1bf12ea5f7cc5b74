"""Running a checkpoint's cached exported graph without importing torch (the fast start of
`napari-dca segment`).

Importing torch takes several seconds, longer than segmenting a small image through a cached
graph. runtime_onnx finds a graph by a key computed from the torch model (weights, architecture,
config, torch version), so it needs the model, hence torch. This module keeps a second index, by
checkpoint file:

    <cache>/checkpoints/<sha256 of the checkpoint file (+ its .json card)>.json  ($NAPARI_DCA_INDEX/)
        {"card": the card as load_checkpoint validated it,
         "graphs": {"3x256x256": {"file": "<key>.onnx", "sha256": "<of that file>"}, ...}}

written (`remember`) after a run in which torch loaded the checkpoint, checked it, and ran
`ModelRunner` batches through graphs that agreed with torch on the probe batch. A later run
(`find`) hashes the checkpoint file, reads the entry, and runs the graph with ONNX Runtime and
numpy alone (`GraphRunner`), after checking the graph file's sha256 (the file that was probed,
unchanged). Anything missing or different (another file, another card, another tile size, a
changed or removed graph) gives None, and the caller takes the torch path, which also writes the
entry for next time. Same graph, same ONNX Runtime threads per batch: the same probabilities as
the torch path's `runtime="onnx"` (tests/test_runtime_cached.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import runtime_onnx

INDEX_FORMAT = 1
# Another folder for the entries than <cache>/checkpoints (the graphs stay in the cache): e.g. each
# test its own entries over one shared set of exported graphs (tests/conftest.py).
INDEX_ENV = "NAPARI_DCA_INDEX"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"   # as checkpoints.PRETRAINED_DIR


def checkpoint_file(name_or_path: str | Path) -> Path | None:
    """The .safetensors file a --checkpoint value names (a bundled name first, as
    checkpoints.resolve_checkpoint), or None for anything else (official .pt, missing files)."""
    bundled = PRETRAINED_DIR / f"{name_or_path}.safetensors"
    path = bundled if isinstance(name_or_path, str) and bundled.is_file() else \
        Path(name_or_path).expanduser()
    return path if path.suffix.lower() == ".safetensors" and path.is_file() else None


def _file_sha256(path: Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_digest(path: Path) -> str:
    """sha256 of the checkpoint file and, when there is one, the .json card beside it (the card
    load_checkpoint falls back to)."""
    h = hashlib.sha256()
    _file_sha256(path, h)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        h.update(b"\0card\0")
        _file_sha256(sidecar, h)
    return h.hexdigest()


def index_dir() -> Path:
    """Where the entries live: $NAPARI_DCA_INDEX, else <cache>/checkpoints (beside the graphs)."""
    root = os.environ.get(INDEX_ENV)
    return Path(root) if root else runtime_onnx.cache_dir() / "checkpoints"


def _index_path(digest: str) -> Path:
    return index_dir() / f"{digest}.json"


def shape_name(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def remember(checkpoint: str | Path, card: dict, runner: Any, torch_threads: int | None = None
             ) -> Path | None:
    """Records the graphs `runner` (an inference.ModelRunner) ran for this checkpoint file, with
    its validated `card` (a dict) and torch's default thread count here (`torch_threads`, when
    known: a later run without --threads uses as many, hence the same ONNX Runtime threads and
    the same probabilities); None when there is nothing to record. Never raises for a cache that
    cannot be written (the fast start is an optimisation)."""
    path = checkpoint_file(checkpoint)
    graphs = getattr(runner, "graphs", {})
    if path is None or not graphs:
        return None
    try:
        index = _index_path(checkpoint_digest(path))
        entry = {"format": INDEX_FORMAT, "card": card, "graphs": {}, "torch_threads": None}
        if index.is_file():
            old = json.loads(index.read_text())
            if old.get("format") == INDEX_FORMAT:
                entry["graphs"].update(old.get("graphs", {}))
                entry["torch_threads"] = old.get("torch_threads")
        if torch_threads:
            entry["torch_threads"] = int(torch_threads)
        for shape, graph in graphs.items():
            entry["graphs"][shape_name(shape)] = {"file": graph.path.name,
                                                  "sha256": _file_sha256(graph.path)}
        text = json.dumps(entry, sort_keys=True, default=str)
        from .safe_write import write_atomic
        write_atomic(index, lambda tmp: Path(tmp).write_text(text))
        return index
    except (OSError, ValueError, TypeError):
        return None


class CachedCheckpoint:
    """A checkpoint file whose graphs are in the cache: its validated card, and a GraphRunner
    per input shape that has a graph."""

    def __init__(self, path: Path, card: dict, graphs: dict[str, dict],
                 torch_threads: int | None = None):
        self.path, self.card, self.graphs = path, card, graphs
        self.torch_threads = torch_threads

    def default_threads(self) -> int:
        """Threads when none are asked for: $OMP_NUM_THREADS, else torch's default as recorded,
        else the CPUs this process may run on."""
        try:
            value = int(os.environ.get("OMP_NUM_THREADS", ""))
            if value > 0:
                return value
        except ValueError:
            pass
        if self.torch_threads:
            return int(self.torch_threads)
        try:
            return len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return os.cpu_count() or 1

    def runner(self, shape, *, threads: int, tta: bool = False, max_batch: int = 4,
               runtime: str = "onnx") -> "GraphRunner | None":
        """A GraphRunner for inputs (B, *shape), or None when no unchanged graph is cached.
        runtime: the engine that runs the file, "onnx" (ONNX Runtime) or "openvino"."""
        info = self.graphs.get(shape_name(shape))
        if not info:
            return None
        graph_path = runtime_onnx.cache_dir() / str(info.get("file", ""))
        key = (graph_path, int(threads), runtime)
        if key not in _opened:
            if not graph_path.is_file() or _file_sha256(graph_path) != info.get("sha256"):
                return None
            workers, per_worker = runtime_onnx.thread_plan(threads)
            session = runtime_onnx.open_session(graph_path, per_worker, runtime, workers)
            _opened[key] = (runtime_onnx.ExportedGraph(session, graph_path, tuple(shape)), workers)
        graph, workers = _opened[key]
        return GraphRunner(graph, tta=tta, max_batch=max_batch, workers=workers, runtime=runtime)


_opened: dict[tuple[Path, int, str], tuple[runtime_onnx.ExportedGraph, int]] = {}


def find(checkpoint: str | Path) -> CachedCheckpoint | None:
    """The cached graphs of a --checkpoint value, or None (nothing cached, unreadable entry)."""
    path = checkpoint_file(checkpoint)
    if path is None:
        return None
    try:
        index = _index_path(checkpoint_digest(path))
        if not index.is_file():
            return None
        entry = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    if entry.get("format") != INDEX_FORMAT or not isinstance(entry.get("card"), dict) \
            or not isinstance(entry.get("graphs"), dict):
        return None
    threads = entry.get("torch_threads")
    return CachedCheckpoint(path, entry["card"], entry["graphs"],
                            int(threads) if isinstance(threads, int) else None)


class GraphRunner:
    """(B, C, T, T) float32 numpy -> (B, K, T, T) probabilities through one cached graph, numpy
    and ONNX Runtime (or OpenVINO) only: what inference.ModelRunner does with runtime "onnx" /
    "openvino" (same chunks of max_batch, same batches side by side), for
    `inference.predict(..., runner=...)`."""

    uses_graph = True
    exported_graph = False

    def __init__(self, graph: runtime_onnx.ExportedGraph, *, tta: bool = False,
                 max_batch: int = 4, workers: int = 1, runtime: str = "onnx"):
        self.graph, self.tta, self.runtime = graph, tta, runtime
        self.max_batch = max(1, int(max_batch))
        self.graph_workers = max(1, int(workers))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if tuple(batch.shape[1:]) != self.graph.input_shape:
            raise ValueError(f"this graph takes inputs (B, {shape_name(self.graph.input_shape)}), "
                             f"not {tuple(batch.shape)}")
        return np.concatenate([runtime_onnx.graph_probabilities(self.graph, batch[i:i + self.max_batch],
                                                                self.tta)
                               for i in range(0, len(batch), self.max_batch)], axis=0)

    def run_batches(self, batches):
        return runtime_onnx.run_side_by_side(self, batches, self.graph_workers)

