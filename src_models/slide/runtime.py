"""The model runner of a slide run: which runtime runs the model (torch or the exported ONNX graph,
see src_models/runtime_onnx.py) in this process, with the exported graph shared through the cache
folder by every process that segments slides (dask workers included).

The graph is exported at most once across processes: runtime_onnx.graph_for exports under a lock
in the cache folder (runtime_onnx.export_lock), so here the runner is only made ready and asked
whether this process wrote the file or found it there.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def slide_runner(model: Any, card: Any, *, device: str = "cpu", runtime: str = "torch",
                 tta: bool = False, batch_size: int = 4, tile_size: int | None = None
                 ) -> tuple[Any, str]:
    """(ModelRunner, how its graph was obtained) for segmenting slides in this process.

    runtime: "torch", "onnx" or "auto" (runtime_onnx.resolve_runtime). With the graph, it is made
    ready now: the second string is "exported" (this process wrote the cache file), "cached"
    (it was there), "torch" (runtime torch) or "torch (fallback)" (the graph could
    not be used; runtime_onnx warned why)."""
    from ..inference import DEFAULT_TILE_SIZE, ModelRunner, card_value, select_device
    runner = ModelRunner(model, select_device(device), tta=tta, max_batch=batch_size,
                         runtime=runtime)
    from ..runtime_onnx import GRAPH_RUNTIMES
    if runner.runtime not in GRAPH_RUNTIMES:
        return runner, "torch"
    tile = int(tile_size or card_value(card, "tile_size", DEFAULT_TILE_SIZE))
    config = getattr(model, "config", None) or card_value(card, "model_kwargs", {}) or {}
    channels = int(config.get("in_channels", 3))
    runner(np.zeros((1, channels, tile, tile), np.float32))   # exports or opens, and probes
    if not runner.uses_graph:
        return runner, "torch (fallback)"
    return runner, "exported" if runner.exported_graph else "cached"
