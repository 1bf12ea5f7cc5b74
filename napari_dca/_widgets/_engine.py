"""Where the widgets meet src_models: one call per job, each usable from a worker thread.

Progress is reported through `progress(done, total)`; raising `Cancelled` from it stops the job.
PROVISIONAL fallbacks below stand in for engine modules that have not landed yet.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ProgressFn = Callable[[int, int], None]


try:  # one cancellation exception for the engine and the widgets
    from src_models.inference import Cancelled
except ImportError:  # pragma: no cover - engine module not there yet
    class Cancelled(Exception):
        """Raised from a progress callback to stop a job the user cancelled."""


def predict(model, card, image, device: str, progress: ProgressFn | None = None,
            region: tuple[slice, slice] | None = None) -> np.ndarray:
    """Image (H, W[, C]) (or its `region`) -> (K, h, w) float32 probabilities, via
    src_models.inference.predict (tiled, blended; the region gets context from around it)."""
    from src_models.inference import predict as engine_predict

    box = None
    if region is not None:
        box = (region[0].start, region[0].stop, region[1].start, region[1].stop)
    probs = engine_predict(model, image, card, device=device, region=box, progress=progress)
    return probs[None] if probs.ndim == 2 else probs


class InstanceMaker:
    """Probabilities -> labels, re-run cheaply for a new threshold / minimum size."""

    def __init__(self, probabilities: np.ndarray, task: str):
        self.probabilities = probabilities
        self.task = task

    def __call__(self, threshold: float = 0.5, min_size: int = 0) -> np.ndarray:
        from scipy import ndimage
        p = self.probabilities
        if self.task == "semantic" and p.shape[0] > 1:
            return p.argmax(0).astype(np.int32)
        fg = (p[0] if p.shape[0] == 1 else 1.0 - p[0]) > threshold
        labels, n = ndimage.label(fg)
        if min_size > 0 and n:
            sizes = np.bincount(labels.ravel())
            small = sizes < min_size
            small[0] = False
            labels[small[labels]] = 0
        return labels.astype(np.int32)
