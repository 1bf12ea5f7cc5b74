"""The model runner of a slide run: which runtime runs the model (torch or the exported ONNX graph,
see src_models/runtime_onnx.py) in this process, with the exported graph shared through the cache
folder by every process that segments slides (dask workers included).

Why a lock on top of runtime_onnx's atomic write: the write itself is already safe (each process
writes its own `.<key>.onnx.<pid>.partial` and renames it into place, so a reader never sees half
a file), but two workers that start together on an empty cache would both spend the 20-60 s
export and both write the file. Here the first process to need a graph takes an exclusive lock on
`<cache>/.export.lock`, exports, and releases it; the others wait on the lock, then find the file
and only open and probe it. The lock is an advisory `flock`, released by the kernel when its holder
dies (a killed worker never leaves the others waiting), and also held across hosts on file
systems that support it (NFS v4, Lustre); where `fcntl` is missing (Windows) the atomic write
alone applies.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

LOCK_NAME = ".export.lock"


@contextlib.contextmanager
def export_lock(folder: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on `folder`/.export.lock for the block (blocks until free)."""
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


def slide_runner(model: Any, card: Any, *, device: str = "cpu", runtime: str = "torch",
                 tta: bool = False, batch_size: int = 4, tile_size: int | None = None
                 ) -> tuple[Any, str]:
    """(ModelRunner, how its graph was obtained) for segmenting slides in this process.

    runtime: "torch", "onnx" or "auto" (runtime_onnx.resolve_runtime). With the graph, it is made
    ready now, under export_lock: the second string is "exported" (this process wrote the cache
    file), "cached" (it was there), "torch" (runtime torch) or "torch (fallback)" (the graph could
    not be used; runtime_onnx warned why)."""
    from .. import runtime_onnx
    from ..inference import DEFAULT_TILE_SIZE, ModelRunner, card_value, select_device
    runner = ModelRunner(model, select_device(device), tta=tta, max_batch=batch_size,
                         runtime=runtime)
    if runner.runtime != "onnx":
        return runner, "torch"
    tile = int(tile_size or card_value(card, "tile_size", DEFAULT_TILE_SIZE))
    config = getattr(model, "config", None) or card_value(card, "model_kwargs", {}) or {}
    channels = int(config.get("in_channels", 3))
    folder = runtime_onnx.cache_dir()
    with export_lock(folder):
        before = set(folder.glob("*.onnx"))
        runner(np.zeros((1, channels, tile, tile), np.float32))   # exports or opens, and probes
        exported = bool(set(folder.glob("*.onnx")) - before)
    if not runner.uses_graph:
        return runner, "torch (fallback)"
    return runner, "exported" if exported else "cached"
