"""Measures how responsive the viewer stays while the Segment widget's worker runs torch.

    xvfb-run -a python tests/gui/responsiveness.py [--width 0.5] [--size 512] [--threads N]

A 5 ms QTimer runs on the GUI thread during one segmentation; the report gives the largest and the
99th-percentile delay between its ticks (what a user would feel as a frozen canvas), with the
worker's torch threads limited to cores - 1 (the plugin's default) or to --threads.
"""
import torch  # noqa: F401  (before Qt)

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def measure(width: float = 0.5, size: int = 512, threads: int | None = None, tile: int = 256) -> dict:
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from src_models import build_model
    from src_models.checkpoints import card_for
    from napari_dca._sample_data import nuclei_sample
    from napari_dca._widgets import _common
    from napari_dca._widgets._state import get_state
    from napari_dca._widgets.segment import SegmentWidget

    if threads is not None:  # override the plugin's "cores - 1" for comparison
        class fixed(_common.worker_threads):
            def __enter__(self):
                self._old = torch.get_num_threads()
                torch.set_num_threads(threads)
                return self
        import napari_dca._widgets._jobs as jobs
        jobs.worker_threads = fixed

    viewer = napari.Viewer(show=True)
    image = nuclei_sample()[0][0]
    reps = max(1, size // image.shape[0])
    image = np.tile(image, (reps, reps, 1))[:size, :size]
    viewer.add_image(image, name="he")
    model = build_model("unet", width=width).eval()
    card = card_for(model, task="nuclei", tile_size=tile)
    get_state(viewer).set_model(model, card, "")
    widget = SegmentWidget(viewer)
    widget.show_probabilities.setChecked(False)
    app = QApplication.instance()
    shown = {}
    original_show = widget._show

    def timed_show(result):
        t = time.perf_counter()
        original_show(result)
        shown["show_result_ms"] = round((time.perf_counter() - t) * 1000.0, 1)
    widget._show = timed_show

    runs = []
    for _ in range(2):  # first run adds the layers, the second updates them in place
        ticks = []
        timer = QTimer()
        timer.setInterval(5)
        timer.timeout.connect(lambda ticks=ticks: ticks.append(time.perf_counter()))
        for _ in range(20):
            app.processEvents()
        timer.start()
        t0 = time.perf_counter()
        widget.run()
        while widget.jobs.busy:
            app.processEvents()
            time.sleep(0.001)
        run_s = time.perf_counter() - t0
        end = time.perf_counter() + 0.3  # keep ticking a little: the result reaches the canvas
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.001)
        timer.stop()
        gaps = np.diff(ticks) * 1000.0
        worst = int(np.argmax(gaps))
        runs.append({"run_s": round(run_s, 2), "ticks": len(ticks),
                     "max_gap_ms": round(float(gaps.max()), 1),
                     "p99_gap_ms": round(float(np.percentile(gaps, 99)), 1),
                     "median_gap_ms": round(float(np.median(gaps)), 1),
                     "worst_gap_at_s": round(ticks[worst] - t0, 2), **shown})
    viewer.close()
    return {"model": f"unet width {width} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M)",
            "image": f"{size} x {size}", "tile": tile, "cores": os.cpu_count(),
            "worker torch threads": threads if threads is not None else max(1, (os.cpu_count() or 2) - 1),
            "first run (adds layers)": runs[0], "second run (updates layers)": runs[1]}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    print(measure(a.width, a.size, a.threads))
