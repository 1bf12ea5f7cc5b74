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


def open_viewer(checkpoint: str = "nuclei", sample: str = "nuclei", device: str = "auto",
                viewer=None, show: bool = True):
    """-> (viewer, {widget name: widget}). Loads the checkpoint in the Model widget's worker."""
    import torch  # noqa: F401  (before Qt creates its application)
    import napari

    from napari_dca._widgets._common import show_warning

    if viewer is None:
        viewer = napari.Viewer(title="napari-dca", show=show)
    widgets = {}
    for i, name in enumerate(WIDGETS):
        _, widget = viewer.window.add_plugin_dock_widget("napari-dca", name, tabify=i >= 2)
        widgets[name] = widget
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


def run(args: argparse.Namespace) -> int:
    import napari

    open_viewer(args.checkpoint, args.sample, args.device)
    napari.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_dca.launch", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
