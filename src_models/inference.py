"""Image -> tiles -> model -> blended probabilities: the one inference path every caller uses.

    image (H, W[, C]) or stack (Z, H, W[, C]), numpy or lazy (dask, zarr, anything with
    shape / dtype / __getitem__)
      -> tiles of card.tile_size, read one batch at a time (a big image is never loaded whole)
      -> preprocess.prepare (the same normalisation as training, from card.normalization)
      -> model on CUDA / MPS / CPU (optional flip test-time augmentation)
      -> sigmoid (1 output) or softmax (K outputs)
      -> blended with a smooth window into one row-band of tiles at a time
      -> written into `out` (numpy, memmap or zarr): float32 (H, W) for binary models, (K, H, W)
         for multi-class ones, with a leading Z axis for stacks.

Blending: tile j of an axis carries a Gaussian profile (flat towards the image border when it is
the first or last tile). The sum of the profiles over a full grid of tiles factorises per axis, so
each tile's 2D weight is divided by the per-axis sums before accumulation: the weights of every
pixel sum to exactly one (a constant model gives a constant output) and no weight image is kept.
Only a (K, tile, W) float32 band is held besides the output.

torch is imported where it is used, not with this module: `predict` with a runner that runs a
cached exported graph (runtime_onnx.GraphRunner) needs numpy only, so `napari-dca segment` can
start without importing torch (several seconds).
"""
from __future__ import annotations

import contextlib
import copy
import math
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from . import runtime_onnx
from .preprocess import DEFAULT_NORMALIZATION, prepare

if TYPE_CHECKING:  # annotations only; imported where used (see the module docstring)
    import torch
    import torch.nn as nn

DEFAULT_TILE_SIZE = 256
DEFAULT_OVERLAP = 0.25
ROW_BYTES = 64 * 1024 ** 2  # largest normalised row of tiles kept (float32), else tile by tile

ProgressCallback = Callable[[int, int], Any]


SUPPORTED_SHAPES = ("(H, W) grayscale, (H, W, 3) RGB, (H, W, 4) RGBA (alpha dropped), "
                    "(Z, H, W) grayscale stack, (Z, H, W, 3|4) colour stack")


class Cancelled(Exception):
    """Raised by `predict` when its `cancel` check answers True between two batches of tiles.
    Whatever was already written into `out` is incomplete and should be discarded."""


# ----------------------------------------------------------------------------------------------
# Small helpers: card values, devices, image layout
# ----------------------------------------------------------------------------------------------

def card_value(card: Any, key: str, default: Any = None) -> Any:
    """A field of a ModelCard, or of a plain dict standing in for one; default when absent/None."""
    if card is None:
        return default
    value = card.get(key) if isinstance(card, Mapping) else getattr(card, key, None)
    return default if value is None else value


def select_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): CUDA if available, else Apple MPS, else CPU. An explicit device that is
    not available raises ValueError saying so."""
    import torch
    if isinstance(device, torch.device):
        device = str(device)
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but this PyTorch sees no CUDA GPU; "
                         "use --device auto or cpu")
    if kind == "mps" and not _mps_available():
        raise ValueError("device 'mps' was asked for but Apple MPS is not available; use auto or cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda[:N] or mps")
    return torch.device(device)


def _mps_available() -> bool:
    import torch
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@dataclass(frozen=True)
class ImageLayout:
    """Where the axes of an input are: `planes` is None for a single 2D image, else Z."""
    planes: int | None
    height: int
    width: int
    channels: int | None  # None: grayscale without a channel axis

    @property
    def is_stack(self) -> bool:
        return self.planes is not None


def image_layout(shape: Sequence[int]) -> ImageLayout:
    """Reads an input's shape as one of SUPPORTED_SHAPES; ValueError naming the shape otherwise.
    A trailing axis of 1, 3 or 4 is read as channels; (3, H, W) is a 3-plane stack."""
    shape = tuple(int(s) for s in shape)
    bad = ValueError(f"cannot segment an image of shape {shape}; supported: {SUPPORTED_SHAPES}")
    if any(s == 0 for s in shape):
        raise bad
    if len(shape) == 2:
        return ImageLayout(None, shape[0], shape[1], None)
    if len(shape) == 3:
        if shape[2] in (1, 3, 4):
            return ImageLayout(None, shape[0], shape[1], shape[2])
        if shape[2] == 2:
            raise bad  # 2 trailing values: neither a colour image nor a plausible image width
        return ImageLayout(shape[0], shape[1], shape[2], None)
    if len(shape) == 4 and shape[3] in (1, 3, 4):
        return ImageLayout(shape[0], shape[1], shape[2], shape[3])
    raise bad


def _check_image(image: Any) -> None:
    for attr in ("shape", "dtype", "__getitem__"):
        if not hasattr(image, attr):
            raise TypeError(f"expected a numpy, dask or zarr array (anything with shape, dtype and "
                            f"indexing), got {type(image).__name__}")


def _is_float(dtype: Any) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def intensity_range(image: Any, band_rows: int = 1024) -> tuple[float, float] | None:
    """The (lo, hi) pixel values that map to 0 and 1, when the dtype alone would scale wrongly;
    None when dividing by the dtype's maximum (uint8, full-range ints) or keeping [0, 1] floats is
    right. Read over the WHOLE image (band by band for lazy ones), so every tile is scaled alike.

    floats outside [0, 1]: their finite min/max; NaN/inf pixels (replaced per tile by lo / hi,
        with a warning); integers wider than 8 bits whose values use fewer bits (12-bit data in a
        16-bit file): (0, 2**bits - 1), with a warning; signed integers with negative values: their
        min/max, with a warning. ValueError when no pixel is finite."""
    dtype = np.dtype(image.dtype)
    if dtype == np.bool_ or (np.issubdtype(dtype, np.integer) and dtype.itemsize == 1
                             and not np.issubdtype(dtype, np.signedinteger)):
        return None
    floating = _is_float(dtype)
    lo, hi, nonfinite = _scan_range(image, floating, band_rows)
    if floating:
        if not math.isfinite(lo):
            raise ValueError("the image has no finite pixel values (all NaN or inf)")
        if nonfinite:
            warnings.warn(f"{nonfinite} NaN/inf pixel(s) replaced by the image's finite range "
                          f"[{lo:g}, {hi:g}]", RuntimeWarning, stacklevel=3)
        if lo >= 0.0 and hi <= 1.0:
            return (0.0, 1.0) if nonfinite else None
        return lo, hi
    if not np.issubdtype(dtype, np.integer):
        return None
    if lo < 0:
        warnings.warn(f"negative pixel values: scaled by the image's range [{lo:g}, {hi:g}]",
                      RuntimeWarning, stacklevel=3)
        return lo, hi
    dtype_bits = dtype.itemsize * 8 - (1 if np.issubdtype(dtype, np.signedinteger) else 0)
    bits = max(8, int(hi).bit_length())
    if bits >= dtype_bits or hi <= 0:  # an all-zero image needs no scaling (and no warning)
        return None
    warnings.warn(f"{dtype.itemsize * 8}-bit pixels use only {bits} bits (max {hi:g}): scaled as "
                  f"{bits}-bit data", RuntimeWarning, stacklevel=3)
    return 0.0, float(2 ** bits - 1)


def _block_range(block: np.ndarray, floating: bool) -> tuple[float, float, int]:
    if block.size == 0:
        return math.inf, -math.inf, 0
    if not floating:
        return float(block.min()), float(block.max()), 0
    finite = np.isfinite(block)
    count = int(block.size - np.count_nonzero(finite))
    if count == block.size:
        return math.inf, -math.inf, count
    values = block[finite] if count else block
    return float(values.min()), float(values.max()), count


def _scan_range(image: Any, floating: bool, band_rows: int) -> tuple[float, float, int]:
    """(finite min, finite max, number of non-finite pixels) of the whole image."""
    if isinstance(image, np.ndarray):
        return _block_range(image, floating)
    lay = image_layout(image.shape)
    lo, hi, count = math.inf, -math.inf, 0
    for z in range(lay.planes or 1):
        for y in range(0, lay.height, band_rows):
            key = (z, slice(y, y + band_rows)) if lay.is_stack else (slice(y, y + band_rows),)
            b_lo, b_hi, b_count = _block_range(np.asarray(image[key]), floating)
            lo, hi, count = min(lo, b_lo), max(hi, b_hi), count + b_count
    return lo, hi, count


# ----------------------------------------------------------------------------------------------
# Tiling and blending geometry
# ----------------------------------------------------------------------------------------------

def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis: evenly spaced with at least `overlap` (fraction of the tile)
    shared between neighbours, the last one flush with the end. An axis shorter than the tile
    gets one tile at 0 (the image is padded)."""
    if length <= tile:
        return [0]
    step = max(1, int(round(tile * (1.0 - overlap))))
    n = math.ceil((length - tile) / step) + 1
    # Spread the tiles evenly instead of leaving a thin sliver for the last one.
    return [int(round(i * (length - tile) / (n - 1))) for i in range(n)]


def window_1d(tile: int, kind: str = "gaussian") -> np.ndarray:
    """The blending profile along one tile axis, peak 1 at the centre, strictly positive."""
    u = np.arange(tile, dtype=np.float64) + 0.5 - tile / 2.0
    if kind == "gaussian":
        w = np.exp(-0.5 * (u / (tile / 8.0)) ** 2)
    elif kind == "cosine":
        w = np.cos(np.pi * u / tile) ** 2
    elif kind == "constant":
        w = np.ones(tile)
    else:
        raise ValueError(f"unknown blending window {kind!r}; expected gaussian, cosine or constant")
    return np.maximum(w, 1e-4)


def axis_weights(length: int, tile: int, starts: Sequence[int], kind: str = "gaussian"
                 ) -> list[np.ndarray]:
    """Per tile along one axis: its profile divided by the sum of all profiles at each position,
    so the weights of every position sum to one. Profiles are flat towards the image border."""
    base = window_1d(tile, kind)
    half = tile // 2
    profiles = []
    for j, s in enumerate(starts):
        w = base.copy()
        if j == 0:
            w[:half] = 1.0
        if j == len(starts) - 1:
            w[half:] = 1.0
        profiles.append(w)
    total = np.zeros(max(length, tile) if len(starts) == 1 else starts[-1] + tile)
    for s, w in zip(starts, profiles):
        total[s:s + tile] += w
    return [(w / total[s:s + tile]).astype(np.float32) for s, w in zip(starts, profiles)]


# ----------------------------------------------------------------------------------------------
# Running the model: devices, precision, OOM fallback, test-time augmentation
# ----------------------------------------------------------------------------------------------

def is_out_of_memory(error: BaseException) -> bool:
    import torch
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Eval-mode copy of `model` in which every Conv2d directly followed by a BatchNorm2d inside an
    nn.Sequential has the BatchNorm folded into its weights (the BatchNorm becomes Identity).
    Same outputs up to float rounding; one memory pass less per folded layer."""
    import torch
    import torch.nn as nn
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module._modules.items())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.running_var is not None and bn.running_mean is not None):
                continue
            with torch.no_grad():
                scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) \
                    / torch.sqrt(bn.running_var + bn.eps)
                shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) \
                    - bn.running_mean * scale
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                if conv.bias is None:
                    conv.bias = nn.Parameter(shift.clone())
                else:
                    conv.bias.mul_(scale).add_(shift)
            module._modules[bn_name] = nn.Identity()
    return fused


def _autocast(device: torch.device, precision: str):
    import torch
    if precision == "auto":
        precision = "float16" if device.type == "cuda" else "float32"
    if precision == "float32":
        return contextlib.nullcontext()
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise ValueError(f"unknown precision {precision!r}; expected auto, float32, float16, bfloat16")
    try:
        return torch.autocast(device_type=device.type, dtype=dtype)
    except (RuntimeError, ValueError):  # e.g. float16 autocast unsupported on this backend
        return contextlib.nullcontext()


class ModelRunner:
    """(B, C, T, T) float32 numpy -> (B, K, T, T) float32 probabilities on `device`.

    Splits batches to at most `max_batch`; on a GPU out-of-memory error halves `max_batch` and
    retries, and when one tile still does not fit, moves to the CPU (with a warning) and goes on.
    runtime: "torch", "onnx", "openvino" or "auto" (see runtime_onnx.resolve_runtime); with the
    exported graph, the torch model stays ready for any input shape whose graph cannot be used.
    """

    def __init__(self, model: nn.Module, device: torch.device, *, precision: str = "auto",
                 channels_last: bool | None = None, tta: bool = False, max_batch: int = 4,
                 fuse: bool = True, runtime: str = "torch", graph_workers: int | None = None):
        import torch
        self.source_model = model
        self.device = device
        self.precision = precision
        # channels_last: measured faster for these U-Nets on x86 CPUs (oneDNN) and CUDA (cuDNN).
        self.channels_last = (device.type in ("cpu", "cuda")) if channels_last is None else channels_last
        self.tta = tta
        self.max_batch = max(1, int(max_batch))
        self.fuse = fuse
        # "onnx" / "openvino": the forward pass runs through an exported graph (runtime_onnx), one
        # per input shape, made on first use; a shape whose graph cannot be used stays in torch.
        self.runtime = runtime_onnx.resolve_runtime(runtime, device.type, precision)
        self._graphs: dict[tuple[int, ...], runtime_onnx.ExportedGraph | None] = {}
        # Exported graph: batches run side by side, one ONNX Runtime thread each (run_batches).
        self.graph_workers, self.graph_threads = runtime_onnx.thread_plan(
            torch.get_num_threads(), graph_workers)
        self._graph_lock = threading.Lock()
        self._prepare_model()

    @property
    def uses_graph(self) -> bool:
        """True once a batch has run through an exported graph (not torch)."""
        return any(g is not None for g in self._graphs.values())

    @property
    def graphs(self) -> dict:
        """{input shape (C, T, T): runtime_onnx.ExportedGraph} of the graphs this runner ran."""
        return {shape: g for shape, g in self._graphs.items() if g is not None}

    @property
    def exported_graph(self) -> bool:
        """True when this runner exported a graph into the cache (False: found it there)."""
        return any(g is not None and g.exported for g in self._graphs.values())

    def _graph(self, shape: tuple[int, ...]) -> "runtime_onnx.ExportedGraph | None":
        with self._graph_lock:  # workers of run_batches may ask at once: export/open only once
            if shape not in self._graphs:
                variant = "fused" if self.fuse else "plain"
                key = runtime_onnx.key_for_model(self.source_model, shape, variant=variant)
                self._graphs[shape] = runtime_onnx.graph_for(
                    self.model, shape, key=key, threads=self.graph_threads, runtime=self.runtime,
                    workers=self.graph_workers)
            return self._graphs[shape]

    def _run_graph(self, graph: "runtime_onnx.ExportedGraph", batch: np.ndarray) -> np.ndarray:
        return runtime_onnx.graph_probabilities(graph, batch, self.tta)

    def _prepare_model(self) -> None:
        import torch
        model = self.source_model.eval()
        if self.fuse:
            model = fuse_conv_bn(model)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    def to_cpu(self) -> None:
        import torch
        warnings.warn(f"out of memory on {self.device} even for one tile; continuing on the CPU",
                      RuntimeWarning, stacklevel=3)
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.device = torch.device("cpu")
        self._prepare_model()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch
        logits = self.model(x)
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch
        if self.runtime in runtime_onnx.GRAPH_RUNTIMES:
            graph = self._graph(tuple(batch.shape[1:]))
            if graph is not None:
                return self._run_graph(graph, batch)
        x = torch.from_numpy(batch).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), _autocast(self.device, self.precision):
            prob = self._forward(x).float()
            if self.tta:
                for dims in ((-1,), (-2,), (-2, -1)):
                    prob += torch.flip(self._forward(torch.flip(x, dims)).float(), dims)
                prob /= 4.0
        return prob.cpu().numpy()

    def run_batches(self, batches):
        """(tag, batch) pairs in -> (tag, probabilities) pairs out, in the same order.

        With the exported graph and `graph_workers` > 1, that many batches run at once, each on
        one ONNX Runtime thread (the session is thread-safe and releases the GIL), while this
        thread prepares the next inputs and blends the finished ones; the outputs are the same
        as one at a time. Otherwise one batch at a time, the input read only when the previous
        output has been consumed (so a cancel check in `batches` is seen at once)."""
        workers = self.graph_workers if self.runtime in runtime_onnx.GRAPH_RUNTIMES else 1
        return runtime_onnx.run_side_by_side(self, batches, workers)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        outputs = []
        i = 0
        while i < len(batch):
            chunk = batch[i:i + self.max_batch]
            try:
                outputs.append(self._run(chunk))
            except Exception as error:  # noqa: BLE001 - only memory errors are handled
                if not is_out_of_memory(error):
                    raise
                if self.device.type == "cuda":
                    import torch
                    torch.cuda.empty_cache()
                if self.max_batch > 1:
                    self.max_batch = max(1, len(chunk) // 2)
                elif self.device.type != "cpu":
                    self.to_cpu()
                else:
                    raise
                continue
            i += len(chunk)
        return np.concatenate(outputs, axis=0)


def weights_version(model: "nn.Module") -> tuple:
    """Changes whenever a parameter or buffer of `model` is replaced or changed in place
    (optimizer steps, load_state_dict, BatchNorm statistics): each tensor's storage and version
    counter. Cheap (no data is read)."""
    return tuple((name, t.data_ptr(), t._version) for name, t in model.state_dict().items())


# The runner of the latest `predict` call without one: the Segment widget calls `predict` once per
# click, and building a runner (copying the model, folding BatchNorm, hashing the weights for
# the graph's key) each time cost a noticeable part of a 1000x1000 run. Reused only for the same
# model object with unchanged weights and the same settings; one entry (one model copy) at most.
_recent: dict[str, Any] = {}
_recent_lock = threading.Lock()


def _recent_runner(model: "nn.Module", device: "torch.device", **settings) -> "ModelRunner":
    import torch
    key = (id(model), weights_version(model), str(device), torch.get_num_threads(),
           tuple(sorted(settings.items())))
    with _recent_lock:
        entry = _recent.get("runner")
        if entry is not None and entry[0] == key and entry[1].source_model is model:
            runner = entry[1]
            runner.max_batch = max(1, int(settings["max_batch"]))
            return runner
    runner = ModelRunner(model, device, **settings)
    with _recent_lock:
        _recent["runner"] = (key, runner)
    return runner


# ----------------------------------------------------------------------------------------------
# The path: image -> tiles -> model -> blended probabilities
# ----------------------------------------------------------------------------------------------

def _cancel_requested(cancel: Any) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event) or hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


class _Window:
    """A (y0:y1, x0:x1) window of a 2D image or stack that indexes like an array (no copy)."""

    def __init__(self, image: Any, layout: ImageLayout, y0: int, y1: int, x0: int, x1: int):
        self.image, self.layout = image, layout
        self.y0, self.x0 = y0, x0
        shape = list(image.shape)
        axis = 1 if layout.is_stack else 0
        shape[axis], shape[axis + 1] = y1 - y0, x1 - x0
        self.shape = tuple(shape)
        self.dtype = image.dtype

    def __getitem__(self, key):
        key = list(key)
        axis = 1 if self.layout.is_stack else 0
        ys, xs = key[axis], key[axis + 1]
        key[axis] = slice(ys.start + self.y0, ys.stop + self.y0)
        key[axis + 1] = slice(xs.start + self.x0, xs.stop + self.x0)
        return self.image[tuple(key)]


def predict(model: nn.Module, image: Any, card: Any = None, *,
            tile_size: int | None = None, overlap: float | None = None, batch_size: int = 4,
            device: str | torch.device | None = "auto", tta: bool = False,
            region: Sequence[int] | None = None, out: Any = None,
            progress: ProgressCallback | None = None, cancel: Any = None,
            normalization: Mapping[str, Sequence[float]] | None = None,
            precision: str = "auto", channels_last: bool | None = None, blend: str = "gaussian",
            fuse: bool = True, runner: ModelRunner | None = None,
            value_range: Sequence[float] | None = None, runtime: str = "torch") -> Any:
    """Blended per-pixel probabilities of `model` on `image`.

    image: (H, W), (H, W, 3|4), (Z, H, W) or (Z, H, W, 3|4); uint8, uint16, other ints, bool or
        float; numpy or anything lazy with shape/dtype/__getitem__ (dask, zarr, tifffile's zarr
        store) - it is read one batch of tiles at a time. Stacks are segmented plane by plane.
    card: the checkpoint's ModelCard (or a dict with the same keys): `normalization`,
        `tile_size` and `overlap` come from it unless given here.
    tile_size: tile edge in pixels (default: card.tile_size, else 256). overlap: fraction of a tile
        shared by neighbours, 0 <= overlap < 1 (default: card.overlap, else DEFAULT_OVERLAP).
        Images smaller than a tile are reflect-padded.
    batch_size: tiles per model call. device: "auto" (CUDA > MPS > CPU), "cpu", "cuda", "mps".
    tta: average the four flips (4x the compute).
    region: (y0, y1, x0, x1): segment only that window of the image (the tiles read a margin of
        context around it); the output then has the window's size.
    out: preallocated float array (numpy, memmap, zarr) of the output shape to write into.
    progress: called as progress(tiles_done, tiles_total) after every batch.
    cancel: a callable returning True, or a threading.Event, checked before every batch; when set,
        `Cancelled` is raised.
    precision: "auto" (float16 autocast on CUDA, float32 elsewhere), "float32", "float16",
        "bfloat16" (bfloat16 on a CPU with AVX512-BF16 is ~1.3x faster but moves probabilities
        by up to ~0.05). channels_last: NHWC memory layout (default: on for CPU and CUDA).
        fuse: fold BatchNorm into convolutions on an inference copy of the model.
    runtime: "torch" (the default here: training, fine-tuning and evaluation change the weights
        between calls, and each new set of weights would be exported again), "onnx" (the exported
        graph, see runtime_onnx; the first call with new weights or a new tile size exports it into
        the user's cache), "openvino" (the same graph in OpenVINO, when installed) or "auto" (the exported graph on the CPU when ONNX Runtime is installed
        and the graph matches torch, else torch; what `segment` and the Segment widget use).
    runner: a ModelRunner to reuse across calls (skips copying/fusing the model each time; its
        device, precision and TTA settings then apply instead of the arguments here).
    value_range: (lo, hi) pixel values mapped to 0 and 1 (e.g. `image_io.tiff_value_range` from a
        TIFF's tags); default: `intensity_range` of the data (NaN/inf, 12-bit, negative values).

    Returns `out` (or a new float32 numpy array): (H, W) for a 1-output model (sigmoid), (K, H, W)
    for K outputs (softmax), with a leading Z for stacks.
    """
    _check_image(image)
    layout = image_layout(image.shape)
    overlap = overlap_for(card, overlap)
    tile = tile_for(layout, card, tile_size)
    norm = normalization or card_value(card, "normalization", None) or DEFAULT_NORMALIZATION
    config = getattr(model, "config", None) or card_value(card, "model_kwargs", {}) or {}
    in_channels = int(config.get("in_channels", 3))
    scale = (float(value_range[0]), float(value_range[1])) if value_range is not None \
        else intensity_range(image)

    if runner is None:
        runner = _recent_runner(model, select_device(device), precision=precision,
                                channels_last=channels_last, tta=tta, max_batch=batch_size,
                                fuse=fuse, runtime=runtime)
    run = dict(tile=tile, overlap=overlap, batch_size=batch_size, in_channels=in_channels,
               normalization=norm, scale=scale, progress=progress, cancel=cancel, blend=blend)
    if region is None:
        return _predict_tiles(runner, image, layout, out=out, **run)

    y0, y1, x0, x1 = (int(v) for v in region)
    y0, x0, y1, x1 = max(0, y0), max(0, x0), min(layout.height, y1), min(layout.width, x1)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"region {tuple(region)} does not overlap the image "
                         f"({layout.height} x {layout.width})")
    # A margin of context so the region's border is not a tile border; floats keep the whole
    # image's intensity range (`scale` above).
    margin = max(16, int(round(tile * overlap)))
    wy0, wx0 = max(0, y0 - margin), max(0, x0 - margin)
    wy1, wx1 = min(layout.height, y1 + margin), min(layout.width, x1 + margin)
    window = _Window(image, layout, wy0, wy1, wx0, wx1)
    window_layout = ImageLayout(layout.planes, wy1 - wy0, wx1 - wx0, layout.channels)
    full = _predict_tiles(runner, window, window_layout, out=None, **run)
    crop = (Ellipsis, slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0))
    if out is None:
        return np.ascontiguousarray(full[crop])
    out[...] = full[crop]
    return out


def overlap_for(card: Any = None, overlap: float | None = None) -> float:
    """The tile overlap `predict` uses: overlap, else card.overlap, else DEFAULT_OVERLAP."""
    value = float(overlap if overlap is not None else card_value(card, "overlap", DEFAULT_OVERLAP))
    if not 0.0 <= value < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {value}")
    return value


def tile_for(layout: ImageLayout, card: Any = None, tile_size: int | None = None) -> int:
    """The tile edge `predict` uses for an image: tile_size, else card.tile_size, else 256, never
    more than the image (rounded up to 16) needs, so a 4096 tile on a 300 px image does not cost
    5 GB. ValueError below 16."""
    tile = int(tile_size or card_value(card, "tile_size", DEFAULT_TILE_SIZE))
    if tile < 16:
        raise ValueError(f"tile_size must be at least 16 pixels, got {tile}")
    return min(tile, max(32, -(-max(layout.height, layout.width) // 16) * 16))


def _read_tile(image: Any, layout: ImageLayout, z: int, y: int, x: int, tile: int) -> np.ndarray:
    """One (tile, tile[, C]) block; reflect-padded where the image is smaller than a tile."""
    ys = slice(y, min(y + tile, layout.height))
    xs = slice(x, min(x + tile, layout.width))
    key = (z, ys, xs) if layout.is_stack else (ys, xs)
    block = np.asarray(image[key])
    ph, pw = tile - block.shape[0], tile - block.shape[1]
    if ph or pw:
        pad = [(0, ph), (0, pw)] + [(0, 0)] * (block.ndim - 2)
        block = np.pad(block, pad, mode="reflect")
    return block


def _read_rows(image: Any, layout: ImageLayout, z: int, y: int, tile: int) -> np.ndarray:
    """Rows y .. y + tile of plane z, all columns: (tile, max(W, tile)[, C]), reflect-padded where
    the image is smaller than a tile (as `_read_tile` pads each of its tiles)."""
    ys = slice(y, min(y + tile, layout.height))
    block = np.asarray(image[(z, ys) if layout.is_stack else (ys,)])
    ph, pw = tile - block.shape[0], max(0, tile - block.shape[1])
    if ph or pw:
        pad = [(0, ph), (0, pw)] + [(0, 0)] * (block.ndim - 2)
        block = np.pad(block, pad, mode="reflect")
    return block


def _prepare_tile(block: np.ndarray, in_channels: int, normalization, scale) -> np.ndarray:
    if scale is not None:
        lo, hi = scale
        # float64 where float32 would overflow (values beyond ~3e38)
        wide = block.dtype == np.float64 or max(abs(lo), abs(hi)) > 1e38
        block = block.astype(np.float64 if wide else np.float32)
        if not np.isfinite(block).all():  # NaN -> lo, inf -> hi (intensity_range warned)
            block = np.nan_to_num(block, nan=lo, posinf=hi, neginf=lo)
        block = np.clip((block - lo) / max(hi - lo, 1e-300), 0.0, 1.0).astype(np.float32)
    return prepare(block, in_channels, normalization)


def _predict_tiles(runner: ModelRunner, image: Any, layout: ImageLayout, *, tile: int,
                   overlap: float, batch_size: int, in_channels: int, normalization, scale,
                   out: Any, progress, cancel, blend: str) -> Any:
    h, w = layout.height, layout.width
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    wy, wx = axis_weights(h, tile, ys, blend), axis_weights(w, tile, xs, blend)
    planes = layout.planes or 1
    tasks = [(z, r, c) for z in range(planes) for r in range(len(ys)) for c in range(len(xs))]
    total = len(tasks)
    width_padded = max(w, tile)

    state: dict[str, Any] = {"out": out, "band": None, "zr": None}

    def output_for(k: int):
        if state["out"] is None:
            shape = ((planes,) if layout.is_stack else ()) + ((k,) if k > 1 else ()) + (h, w)
            state["out"] = np.zeros(shape, dtype=np.float32)
        else:
            expected = ((planes,) if layout.is_stack else ()) + ((k,) if k > 1 else ()) + (h, w)
            if tuple(state["out"].shape) != expected:
                raise ValueError(f"out has shape {tuple(state['out'].shape)}, expected {expected}")
        return state["out"]

    def flush(z: int, r: int, rows: int) -> None:
        """Write the band's first `rows` rows (image rows ys[r] ...) and shift the band up."""
        band = state["band"]
        y0 = ys[r]
        y1 = min(h, y0 + rows)
        if y1 > y0:
            block = band[:, :y1 - y0, :w]
            target = state["out"]
            key = ((z,) if layout.is_stack else ())
            if band.shape[0] == 1:
                target[key + (slice(y0, y1), slice(None))] = block[0]
            else:
                target[key + (slice(None), slice(y0, y1), slice(None))] = block
        if rows < tile:
            band[:, :tile - rows] = band[:, rows:].copy()
        band[:, max(0, tile - rows):] = 0.0

    def finish_band(z: int, r: int, next_zr) -> None:
        if next_zr is not None and next_zr[0] == z:
            flush(z, r, ys[next_zr[1]] - ys[r])
        else:
            flush(z, r, tile)

    # An in-memory image: each row of tiles normalises its rows of the image once (tiles are then
    # views into it), the same arithmetic as tile by tile without redoing the overlaps. A lazy
    # input (or a very wide row) is still read and normalised one tile at a time.
    rows: dict[str, Any] = {"key": None, "data": None}
    by_rows = isinstance(image, np.ndarray) and \
        tile * width_padded * max(in_channels, layout.channels or 1) * 4 <= ROW_BYTES

    def tile_input(z: int, r: int, c: int) -> np.ndarray:
        if not by_rows:
            return _prepare_tile(_read_tile(image, layout, z, ys[r], xs[c], tile), in_channels,
                                 normalization, scale)
        if rows["key"] != (z, r):
            rows["key"] = (z, r)
            rows["data"] = _prepare_tile(_read_rows(image, layout, z, ys[r], tile), in_channels,
                                         normalization, scale)
        return rows["data"][:, :, xs[c]:xs[c] + tile]

    def batches():
        for start in range(0, total, batch_size):
            if _cancel_requested(cancel):
                raise Cancelled(f"cancelled after {start} of {total} tiles")
            chunk = tasks[start:start + batch_size]
            yield chunk, np.stack([tile_input(z, r, c) for z, r, c in chunk])

    done = 0
    for batch_tasks, prob in runner.run_batches(batches()):
        if state["band"] is None:
            output_for(prob.shape[1])
            state["band"] = np.zeros((prob.shape[1], tile, width_padded), dtype=np.float32)
        band = state["band"]
        for (z, r, c), p in zip(batch_tasks, prob):
            if state["zr"] is not None and state["zr"] != (z, r):
                finish_band(*state["zr"], (z, r))
            state["zr"] = (z, r)
            p *= wy[r][:, None] * wx[c][None, :]   # in place: p is this call's own output
            band[:, :, xs[c]:xs[c] + tile] += p
        done += len(batch_tasks)
        if progress is not None:
            progress(done, total)
    finish_band(*state["zr"], None)
    return state["out"]


def predict_full(model: nn.Module, image: np.ndarray, card: Any = None,
                        normalization=None) -> np.ndarray:
    """One whole-image forward pass without tiling (small images, tests, reference results).
    Same output convention as `predict`."""
    import torch
    layout = image_layout(image.shape)
    if layout.is_stack:
        return np.stack([predict_full(model, plane, card, normalization) for plane in image])
    norm = normalization or card_value(card, "normalization", None) or DEFAULT_NORMALIZATION
    config = getattr(model, "config", None) or card_value(card, "model_kwargs", {}) or {}
    scale = intensity_range(image)
    x = _prepare_tile(np.asarray(image), int(config.get("in_channels", 3)), norm, scale)
    with torch.inference_mode():
        logits = model.eval()(torch.from_numpy(x)[None])
        prob = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
    prob = prob[0].float().numpy()
    return prob[0] if prob.shape[0] == 1 else prob
