"""Open napari with napari-dca ready: widgets docked, the nuclei sample open, the default model chosen.

    python -m napari_dca.launch [--checkpoint nuclei|glands|FILE] [--sample nuclei|glands|none]
    napari-dca launch ...
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

WIDGETS = ("Model", "Segment", "Fine-tune", "Attention")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "launch", help="open napari with the napari-dca widgets, a sample and a model",
        description="Open napari with the napari-dca widgets docked, an H&E sample open and a "
                    "checkpoint loaded.")
    _add_arguments(parser)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="nuclei",
                        help="bundled name (nuclei, glands) or a .safetensors file (default: nuclei)")
    parser.add_argument("--sample", default="nuclei", choices=["nuclei", "glands", "none"],
                        help="sample image to open (default: nuclei)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps (default: auto)")
    parser.add_argument("--screenshot", default=None, metavar="PNG",
                        help="save a screenshot of the window once the model is loaded, then quit "
                             "(a check that works without a display, under Xvfb)")


def open_viewer(checkpoint: str = "nuclei", sample: str = "nuclei", device: str = "auto",
                viewer=None, show: bool = True):
    """-> (viewer, {widget name: widget}). Loads the checkpoint in the Model widget's worker."""
    import torch  # noqa: F401  (before Qt creates its application)
    import napari

    from napari_dca._widgets._common import show_warning

    if viewer is None:
        viewer = napari.Viewer(title="napari-dca", show=show)
    widgets, docks = {}, {}
    for i, name in enumerate(WIDGETS):
        # one tabbed dock: four stacked docks would squeeze the canvas and the window's height
        docks[name], widgets[name] = viewer.window.add_plugin_dock_widget("napari-dca", name,
                                                                          tabify=i >= 1)
    arrange_window(viewer, list(docks.values()))
    from qtpy.QtCore import QTimer
    QTimer.singleShot(0, docks["Segment"].raise_)  # once docking settles: the tab needed first
    QTimer.singleShot(0, lambda: arrange_window(viewer, list(docks.values())))
    if sample != "none":
        viewer.open_sample("napari-dca", sample)
    model = widgets["Model"]
    idx = model.device.findData(device)
    if idx >= 0:
        model.device.setCurrentIndex(idx)
    from src_models.checkpoints import bundled_checkpoints
    from napari_dca._widgets.model import NEW_MODEL
    from pathlib import Path
    if checkpoint in bundled_checkpoints() or Path(checkpoint).is_file():
        model.select_checkpoint(checkpoint)
    else:
        show_warning(f"napari-dca: no checkpoint {checkpoint!r} (not a bundled name, not a file); "
                     f"starting with a new untrained model. Open a .safetensors file in the Model "
                     f"widget, or train one (napari-dca train).")
        model.select_checkpoint(NEW_MODEL)
    model.load()
    return viewer, widgets


def arrange_window(viewer, docks, width_fraction: float = 0.99, height_fraction: float = 0.95) -> None:
    """Fits the main window on its screen and keeps the docks narrow, so that the canvas has most
    of the width (at least 60% at 1600 x 1000 and 1920 x 1080)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from napari_dca._widgets._layout import DOCK_MIN_WIDTH

    window = getattr(viewer.window, "_qt_window", None)
    if window is None:
        return
    screen = window.screen() if hasattr(window, "screen") else None
    screen = screen or QApplication.primaryScreen()
    width = window.width()
    if screen is not None:
        area = screen.availableGeometry()
        width = int(area.width() * width_fraction)
        height = int(area.height() * height_fraction)
        window.resize(width, height)
        window.move(area.x() + (area.width() - width) // 2, area.y() + (area.height() - height) // 2)
    if docks:
        # napari's layer controls need ~340 px on the left; ours get about a sixth of the window
        dock_width = max(DOCK_MIN_WIDTH, min(380, int(width * 0.165)))
        window.resizeDocks(docks, [dock_width] * len(docks), Qt.Horizontal)
    qt_viewer = getattr(viewer.window, "_qt_viewer", None)
    left = [d for d in (getattr(qt_viewer, "dockLayerList", None),
                        getattr(qt_viewer, "dockLayerControls", None)) if d is not None]
    if left:
        window.resizeDocks(left, [230] * len(left), Qt.Horizontal)


def _screenshot_when_loaded(viewer, widgets, path: str, timeout_s: float = 120.0) -> None:
    """Let the Qt loop run until the Model widget's worker is done, then save the window."""
    import time

    from qtpy.QtWidgets import QApplication

    jobs = getattr(widgets["Model"], "jobs", None)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        QApplication.processEvents()
        if jobs is None or getattr(jobs, "worker", None) is None:
            break
        time.sleep(0.05)
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(path, canvas_only=False)
    print(f"saved {path}")
    viewer.close()


def run(args: argparse.Namespace) -> int:
    import napari

    viewer, widgets = open_viewer(args.checkpoint, args.sample, args.device)
    if getattr(args, "screenshot", None):
        _screenshot_when_loaded(viewer, widgets, args.screenshot)
        return 0
    napari.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_dca.launch", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
