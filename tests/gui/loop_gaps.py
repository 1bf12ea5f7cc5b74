"""What a user feels as a frozen viewer, measured on the GUI thread, and what caused it.

`LoopGaps` runs a 5 ms QTimer on the GUI thread: the gaps between its ticks are the event-loop
stalls. With `profile=True` a sampling thread looks at the GUI thread's Python stack every few ms
while a tick is late, so each long stall comes with the code that held the GUI thread (the frames
of napari-dca, napari and vispy that were on the stack most often). A stall whose stack is only
Qt's event loop (`wait`, `processEvents`) was not Python work on the GUI thread: rendering in C++
or another thread holding the GIL.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
import traceback

import numpy as np

INTERESTING = ("napari_dca", "src_models", "napari", "vispy", "numpy", "scipy", "skimage", "torch")


class LoopGaps:
    def __init__(self, profile: bool = False, stall_ms: float = 60.0, sample_ms: float = 3.0):
        from qtpy.QtCore import QTimer
        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(self._tick)
        self.profile = profile
        self.stall_s = stall_ms / 1000.0
        self.sample_s = sample_ms / 1000.0
        self.stalls: list[dict] = []  # {"at": t, "samples": Counter(stack -> n)}
        self.marks: list[tuple[float, str]] = []  # (time, name): the end of each named step
        self._stop = threading.Event()
        self._gui = threading.get_ident()

    def mark(self, step: str) -> None:
        """Ends the step named `step`: the stalls since the previous mark are reported as in it."""
        self.marks.append((time.perf_counter(), step))

    def _step_of(self, at: float) -> str:
        return next((name for t, name in self.marks if t >= at), "")

    def _tick(self) -> None:
        self.ticks.append(time.perf_counter())

    def __enter__(self):
        self.timer.start()
        if self.profile:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()
        self._stop.set()
        if self.profile:
            self._thread.join(1.0)

    def _sample(self) -> None:
        current = None
        while not self._stop.wait(self.sample_s):
            if not self.ticks:
                continue
            late = time.perf_counter() - self.ticks[-1]
            if late < self.stall_s:
                current = None
                continue
            if current is None or current["tick"] != self.ticks[-1]:
                current = {"tick": self.ticks[-1], "samples": collections.Counter()}
                self.stalls.append(current)
            frame = sys._current_frames().get(self._gui)
            if frame is not None:
                current["samples"][_short_stack(frame)] += 1

    def report(self) -> dict:
        gaps = np.diff(self.ticks) * 1000.0
        return {"ticks": len(self.ticks), "p50_ms": round(float(np.median(gaps)), 1),
                "p99_ms": round(float(np.percentile(gaps, 99)), 1),
                "max_ms": round(float(gaps.max()), 1),
                "over_100_ms": int((gaps > 100).sum()), "over_1_s": int((gaps > 1000).sum())}

    def worst(self, n: int = 8) -> list[str]:
        """The `n` longest stalls, each with its duration and the stack seen most often in it."""
        ticks = np.asarray(self.ticks)
        out = []
        for stall in self.stalls:
            i = int(np.searchsorted(ticks, stall["tick"]))
            gap = (ticks[i + 1] - ticks[i]) * 1000.0 if i + 1 < len(ticks) else float("nan")
            if stall["samples"]:
                stack, count = stall["samples"].most_common(1)[0]
                total = sum(stall["samples"].values())
                step = self._step_of(stall["tick"])
                where = f" in '{step}'" if step else ""
                out.append((gap, f"{gap:7.0f} ms{where} ({count}/{total} samples) {stack}"))
        out.sort(key=lambda item: -item[0] if item[0] == item[0] else 0)
        return [text for _, text in out[:n]]


def _short_stack(frame) -> str:
    """Where the GUI thread was: the innermost frame of napari-dca or of the test that led there
    ('origin'), then the innermost frames below it ('file:function:line > ...')."""
    frames = traceback.extract_stack(frame)
    origin = ""
    for summary in frames:
        path = summary.filename.replace("\\", "/")
        if "napari_dca/" in path or "/tests/gui/" in path:
            origin = f"{path.split('/')[-1]}:{summary.name}:{summary.lineno}"
    leaf = [f"{s.filename.replace(chr(92), '/').split('/')[-1]}:{s.name}:{s.lineno}"
            for s in frames[-5:]]
    return f"[{origin or '?'}] " + (" > ".join(leaf))
