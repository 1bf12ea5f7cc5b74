"""The exported-graph runtime: a model's forward pass exported to ONNX and run by ONNX Runtime.

Why ONNX Runtime by default, and OpenVINO only when asked (`runtime="openvino"`, which runs the
same exported file): measured in one run, alternating, on this project's 2-core CPU
(`benchmarks/bench_runtime.py --openvino`, benchmarks/results/runtime_openvino_loaded.md), the two
are within 0-7% of each other as `predict` runs them (two batches side by side, one thread each):
OpenVINO a few percent faster on the bundled models, ONNX Runtime as fast at the paper
configuration; one batch at a time OpenVINO is 7-21% faster. OpenVINO costs more to start (import
1.2 s against 0.5 s, compiling a graph 0.7 s against 0.1 s), which a fresh `segment` process pays,
and is a larger dependency (180 MB against 78 MB), so it is an optional extra and `auto` stays
ONNX Runtime. One quiet run at the end of session 6 had OpenVINO ahead in every row (whole
2048x2048 segment warmed 1.66x / 1.45x torch against ONNX Runtime's 1.37x / 1.20x;
benchmarks/results/quiet_session6.md); the default changes only if a second quiet run agrees.
Both engines are probed against torch the same way.

    model (+ its input shape) --sha256 of weights, architecture, config, shape, exporter--> key
    key -> <cache>/<key>.onnx  (exported once: torch.onnx.export(dynamo=True), dynamic batch)
        -> a probe batch through both torch and the graph: max |diff| of the logits <= 1e-4
        -> an onnxruntime.InferenceSession
    Anything that fails on the way (exporter missing, export error, disagreement) gives None and
    one RuntimeFallbackWarning; the caller keeps running torch.

The spatial size is fixed in each exported graph: the exporter cannot make H and W dynamic
because the token grid is `round(H / patch)` (control flow on a symbolic size). Every tile that
`inference.predict` sends has the tile size (smaller images are reflect-padded to it), so one graph
per checkpoint and tile size is exported; another size gets its own graph.

The cache folder is the user's cache (platformdirs: ~/.cache/napari-dca/onnx on Linux), or
$NAPARI_DCA_CACHE/onnx; never a folder beside a bundled checkpoint. Files are written under a
temporary name and renamed when complete, so a crashed export never leaves a half file behind.
A fine-tuned model has new weights, hence a new key and a fresh export.

Exporting once across processes: two `segment` commands, napari and a command, or dask workers
that start together on an empty cache would otherwise all spend the 20-60 s export and all write
the file. The atomic rename already keeps readers safe; on top of it, `graph_for` exports while
holding an exclusive lock on `<cache>/.export.lock` and looks for the file again once it holds
it, so whoever waited only opens and probes what the first one wrote. The lock is an advisory
`flock`, released by the kernel when its holder dies (a killed process never leaves the others
waiting), and also held across hosts on file systems that support it (NFS v4, Lustre); where
`fcntl` is missing (Windows) the atomic write alone applies.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from .safe_write import write_atomic

RUNTIMES = ("auto", "torch", "onnx", "openvino")
# The runtimes that run the exported file (the same graph, cache, probe and fallback); "onnx" is
# ONNX Runtime, "openvino" OpenVINO's CPU plugin (an optional extra: pip install openvino).
GRAPH_RUNTIMES = ("onnx", "openvino")
CACHE_ENV = "NAPARI_DCA_CACHE"
RUNTIME_ENV = "NAPARI_DCA_RUNTIME"  # the default of user-facing entry points (tests set "torch")
PROBE_TOLERANCE = 1e-4
# Bumped whenever what goes into an exported file changes (wrapper, opset, fusion), so old cache
# entries are never reused for a different graph.
EXPORT_FORMAT = 1
OPSET = 18
INSTALL_HINT = "pip install onnxruntime onnx onnxscript"
OPENVINO_HINT = "pip install 'napari-dca[openvino]' (openvino)"
# How many batches of tiles the exported graph runs at once (each on threads // workers threads);
# 1 = one batch at a time on all threads.
GRAPH_WORKERS_DEFAULT = 2
LOCK_NAME = ".export.lock"  # in the cache folder: held by whoever is exporting


class RuntimeFallbackWarning(RuntimeWarning):
    """The exported graph could not be used; inference goes on in PyTorch. One line, says why."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def runtime_available() -> bool:
    """ONNX Runtime can run a cached graph."""
    return _installed("onnxruntime")


def openvino_available() -> bool:
    """OpenVINO can run a cached graph (`--runtime openvino`)."""
    return _installed("openvino")


def engine_available(runtime: str) -> bool:
    """The package that runs the exported file for a graph runtime is installed."""
    return openvino_available() if runtime == "openvino" else runtime_available()


def exporter_available() -> bool:
    """torch.onnx's dynamo exporter has what it needs (onnx and onnxscript)."""
    return _installed("onnx") and _installed("onnxscript")


def default_runtime() -> str:
    """What `segment` and the Segment widget use unless told: $NAPARI_DCA_RUNTIME, else auto."""
    return check_runtime(os.environ.get(RUNTIME_ENV) or "auto")


def check_runtime(runtime: str) -> str:
    runtime = (runtime or "auto").lower()
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    return runtime


def resolve_runtime(runtime: str, device_type: str, precision: str = "auto") -> str:
    """"torch", "onnx" or "openvino" for a runtime choice on a device.

    auto: the exported graph in ONNX Runtime on the CPU when it and the exporter are installed and
    the precision is float32; torch on CUDA / MPS, for reduced precision, or when a package is
    missing. (auto does not pick OpenVINO yet: in the loaded runs it was 0-15% faster, in one
    quiet run about 20% faster warmed up and 1-3% in a fresh process, end to end
    (benchmarks/results/runtime_openvino_loaded.md,
    quiet_session6.md); the default waits for a second quiet run.)
    onnx / openvino: the exported graph in that engine; ValueError when it cannot apply (GPU
    device, reduced precision, package missing)."""
    runtime = check_runtime(runtime)
    float32 = precision in ("auto", "float32")
    if runtime == "torch":
        return "torch"
    if runtime == "auto":
        ok = device_type == "cpu" and float32 and runtime_available() and exporter_available()
        return "onnx" if ok else "torch"
    if device_type != "cpu":
        raise ValueError(f"runtime {runtime!r} runs on the CPU, but the device is {device_type!r}; "
                         "use device cpu, or runtime torch / auto")
    if not float32:
        raise ValueError(f"runtime {runtime!r} runs float32 only, not precision {precision!r}")
    if runtime == "openvino" and not openvino_available():
        raise ValueError(f"runtime 'openvino' needs OpenVINO: {OPENVINO_HINT}")
    if runtime == "onnx" and not runtime_available():
        raise ValueError(f"runtime 'onnx' needs ONNX Runtime: {INSTALL_HINT}")
    return runtime


def cache_dir() -> Path:
    """Where exported graphs live: $NAPARI_DCA_CACHE/onnx, else the user's cache folder."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        try:
            from platformdirs import user_cache_dir
            root = user_cache_dir("napari-dca", appauthor=False)
        except ImportError:  # platformdirs comes with napari; without it, the XDG default
            root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                "napari-dca")
    return Path(root) / "onnx"


# ----------------------------------------------------------------------------------------------
# What identifies an exported graph
# ----------------------------------------------------------------------------------------------

def weights_digest(named_arrays) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order. `named_arrays`
    yields (name, numpy array); the same digest comes from a model's state dict or from the
    checkpoint file read with numpy (so a cached graph can be found without PyTorch)."""
    h = hashlib.sha256()
    for name, array in sorted(named_arrays, key=lambda item: item[0]):
        array = np.ascontiguousarray(array)
        h.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        h.update(array.tobytes())
    return h.hexdigest()


def model_digest(model) -> str:
    """weights_digest of a torch model's state dict (parameters and buffers)."""
    return weights_digest((name, tensor.detach().cpu().numpy())
                          for name, tensor in model.state_dict().items())


def graph_key(weights: str, architecture: str, config: dict, input_shape: tuple[int, int, int],
              torch_version: str, variant: str = "fused") -> str:
    """The cache key: everything that changes the exported graph (`variant`: how the model was
    transformed before export, e.g. BatchNorm folded). Normalisation, thresholds and other card
    fields act outside the graph and are left out."""
    spec = {"format": EXPORT_FORMAT, "opset": OPSET, "weights": weights,
            "architecture": architecture, "config": config, "input": list(input_shape),
            "torch": torch_version, "variant": variant}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:32]


def key_for_model(model, input_shape: tuple[int, int, int], variant: str = "fused") -> str:
    """graph_key of a torch model as it is before any export-time transformation."""
    import torch
    architecture = getattr(model, "registry_name", type(model).__name__)
    config = getattr(model, "config", None) or {}
    return graph_key(model_digest(model), architecture, config, tuple(input_shape),
                     torch.__version__.split("+")[0], variant)


# ----------------------------------------------------------------------------------------------
# Export (torch) and session (ONNX Runtime)
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_logger(name: str):
    """Errors only from logger `name` (the exporter logs a warning per optional package absent)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def export_graph(model, input_shape: tuple[int, int, int], path: Path) -> None:
    """Exports `model` (eval, CPU, float32; BatchNorm already folded by the caller if wanted) for
    inputs (B, *input_shape) with a dynamic batch, to `path` via a temporary file and a rename."""
    import torch
    c, h, w = input_shape
    example = torch.zeros(2, c, h, w)
    with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=["x"], output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
    # One self-contained file (no external weights file), written under a temporary name.
    write_atomic(path, lambda tmp: program.save(str(tmp), external_data=False))


def open_session(path: Path, threads: int | None = None, runtime: str = "onnx",
                 workers: int = 1):
    """A session on the exported file `path` with `.run(None, {"x": batch})` -> [logits].

    onnx: an ONNX Runtime CPU session, `threads` intra-op threads (None: its default), shared by
    the `workers` threads that call it. openvino: an OpenVINOSession with `workers` streams of
    `threads` threads each."""
    if runtime == "openvino":
        return OpenVINOSession(path, streams=workers, threads=threads)
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OpenVINOSession:
    """The exported file compiled by OpenVINO's CPU plugin, called like an ONNX Runtime session.

    `streams` infer requests, one per OpenVINO stream of `threads` threads (None: 1), wait in a
    queue: each call takes a free one, so up to `streams` Python threads run batches side by side
    (OpenVINO releases the GIL while it infers), as run_side_by_side does with one shared ONNX
    Runtime session. Compiled float32 (no reduced-precision hint), so the probe's 1e-4 applies
    as to ONNX Runtime. The output is copied out of the request before the request is reused."""

    def __init__(self, path: Path, streams: int = 1, threads: int | None = None):
        import queue
        import openvino as ov
        streams = max(1, int(streams))
        per_stream = max(1, int(threads or 1))
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": streams,
                  "INFERENCE_NUM_THREADS": streams * per_stream,
                  "PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY"}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self._free: "queue.Queue" = queue.Queue()
        for _ in range(streams):
            self._free.put(self.compiled.create_infer_request())

    def run(self, _output_names, feeds: dict) -> list[np.ndarray]:
        (batch,) = feeds.values()
        request = self._free.get()
        try:
            logits = np.array(request.infer({0: batch})[0], dtype=np.float32, copy=True)
        finally:
            self._free.put(request)
        return [logits]


@contextlib.contextmanager
def export_lock(folder: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on `folder`/.export.lock for the block (blocks until free;
    see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:   # no flock: the atomic rename alone keeps the cache consistent
        yield
        return
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # closing the descriptor releases the lock


class ExportedGraph:
    """(B, C, H, W) float32 numpy -> (B, K, H, W) logits, through an ONNX Runtime session.
    `exported`: this call of graph_for wrote the cache file (False: it was there already)."""

    def __init__(self, session, path: Path, input_shape: tuple[int, int, int],
                 exported: bool = False):
        self.session = session
        self.path = path
        self.input_shape = tuple(input_shape)
        self.exported = exported

    def reused(self) -> "ExportedGraph":
        """The same session, as found in the cache by a later call (exported False)."""
        return ExportedGraph(self.session, self.path, self.input_shape, exported=False)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(batch, dtype=np.float32)})[0]


def probe_batch(input_shape: tuple[int, int, int], batch: int = 2, seed: int = 0) -> np.ndarray:
    """A fixed, normalised-image-like batch (values around 0, a few units wide)."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, (batch, *input_shape)).astype(np.float32)


def max_difference(model, graph: ExportedGraph, batch: np.ndarray) -> float:
    import torch
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch)).float().numpy()
    return float(np.max(np.abs(graph(batch) - expected)))


def _notice(message: str) -> None:
    warnings.warn(message, RuntimeFallbackWarning, stacklevel=4)


def graph_for(model, input_shape: tuple[int, int, int], *, key: str | None = None,
              threads: int | None = None, folder: Path | None = None, runtime: str = "onnx",
              workers: int = 1) -> ExportedGraph | None:
    """The exported graph of `model` (eval, CPU, float32) for inputs (B, *input_shape): from the
    cache, else exported now and cached. `key` names the cache entry (default: key_for_model of
    `model` itself). Checked against torch on a probe batch either way (a cache file could be
    damaged or stale). None, with one RuntimeFallbackWarning, when it cannot be used.
    runtime: the engine that runs the file ("onnx" or "openvino"; see open_session for threads
    and workers); each engine's session is probed on its own.
    The export runs under export_lock, so processes sharing the cache export each graph once."""
    input_shape = tuple(int(s) for s in input_shape)
    try:
        key = key or key_for_model(model, input_shape, variant="as-given")
        path = (folder or cache_dir()) / f"{key}.onnx"
        opened_as = (path, threads, runtime, int(workers))
        checked = _checked_sessions.get(opened_as)
        if checked is not None and path.is_file():  # already probed in this process
            return checked.reused()
        exported = False
        if not path.is_file():
            if not exporter_available():
                _notice(f"exported-graph runtime unavailable (exporter missing: {INSTALL_HINT}); "
                        "running PyTorch")
                return None
            with export_lock(path.parent):
                if not path.is_file():  # else another process exported it while this one waited
                    export_graph(model, input_shape, path)
                    exported = True
        graph = ExportedGraph(open_session(path, threads, runtime, workers), path, input_shape,
                              exported=exported)
        diff = max_difference(model, graph, probe_batch(input_shape))
    except Exception as error:  # noqa: BLE001 - any failure means: stay in torch
        first = (str(error).strip().splitlines() or [""])[0][:200]
        _notice(f"exported-graph runtime failed ({type(error).__name__}: {first}); running PyTorch")
        return None
    if not diff <= PROBE_TOLERANCE:  # also catches NaN
        _notice(f"exported graph disagrees with PyTorch (max |diff| {diff:.2e} > "
                f"{PROBE_TOLERANCE:.0e}); running PyTorch")
        return None
    _checked_sessions[opened_as] = graph
    return graph


# Graphs already opened and probed by this process, so that segmenting many images (one `predict`
# each) opens and checks each graph once. A few entries at most: one per checkpoint and tile size.
_checked_sessions: dict[tuple, ExportedGraph] = {}


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Sigmoid for one output channel, softmax over channels otherwise (numpy, float32)."""
    logits = logits.astype(np.float32, copy=False)
    if logits.shape[1] == 1:
        return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # sigmoid without overflow
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def graph_probabilities(graph: ExportedGraph, batch: np.ndarray, tta: bool = False) -> np.ndarray:
    """Probabilities of one batch through `graph`; tta: averaged over the four flips (as
    inference.ModelRunner does them in torch)."""
    prob = probabilities(graph(batch))
    if tta:
        for axes in ((-1,), (-2,), (-2, -1)):
            flipped = np.ascontiguousarray(np.flip(batch, axes))
            prob += np.flip(probabilities(graph(flipped)), axes)
        prob /= 4.0
    return prob


def run_side_by_side(call, batches, workers: int):
    """(tag, batch) pairs in -> (tag, call(batch)) pairs out, in the same order.

    workers > 1: that many calls run at once on a thread pool (an ONNX Runtime session is
    thread-safe and releases the GIL) while the caller prepares the next inputs and uses the
    finished outputs; the outputs are the same as one at a time. workers <= 1: one at a time, the
    next input read only once the previous output has been consumed (so a cancel check inside
    `batches` is seen at once)."""
    if workers <= 1:
        for tag, batch in batches:
            yield tag, call(batch)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="napari-dca-graph") as pool:
        try:
            for tag, batch in batches:
                pending.append((tag, pool.submit(call, batch)))
                if len(pending) > workers:
                    tag0, future = pending.popleft()
                    yield tag0, future.result()
            while pending:
                tag0, future = pending.popleft()
                yield tag0, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def thread_plan(threads: int, workers: int | None = None) -> tuple[int, int]:
    """(batches run at once, ONNX Runtime intra-op threads per batch) for `threads` CPU threads.
    workers None: GRAPH_WORKERS_DEFAULT; the threads are shared out among the workers."""
    threads = max(1, int(threads))
    workers = GRAPH_WORKERS_DEFAULT if workers is None else int(workers)
    workers = max(1, min(workers, threads)) if workers > 0 else 1
    return workers, max(1, threads // workers)


def torch_imported() -> bool:
    return "torch" in sys.modules


def default_threads() -> int | None:
    """The torch thread count when torch is loaded (so --threads applies to both), else None."""
    if torch_imported():
        return int(sys.modules["torch"].get_num_threads())
    return None


__all__ = ["RUNTIMES", "GRAPH_RUNTIMES", "OpenVINOSession", "openvino_available",
           "engine_available", "CACHE_ENV", "PROBE_TOLERANCE", "RuntimeFallbackWarning", "ExportedGraph",
           "check_runtime", "default_runtime", "resolve_runtime", "cache_dir", "graph_for", "probabilities",
           "runtime_available", "exporter_available", "weights_digest", "model_digest",
           "key_for_model", "graph_key", "export_graph", "export_lock", "open_session",
           "default_threads"]
