"""Screenshots of each napari-dca widget in use, for the README (run under Xvfb):

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py [--checkpoint nuclei]

Writes docs/screenshots/{model,segment,finetune,attention}.png (whole window) and
docs/screenshots/widget_<name>.png (the dock widget alone). Uses the bundled "nuclei" checkpoint when
it is installed; otherwise a small demo model is trained for the pictures first (a U-Net + DCA,
width 0.25, a few hundred steps on one MoNuSeg image of the training split, never on the samples).
"""
import torch  # noqa: F401  (before Qt)

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "screenshots"


def _wait(app, cond, timeout=600.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("a napari-dca worker did not finish in time")
        app.processEvents()
        time.sleep(0.01)
    for _ in range(30):
        app.processEvents()
        time.sleep(0.01)


def _save(viewer, name: str, widget=None) -> None:
    import imageio.v3 as iio
    from qtpy.QtWidgets import QApplication

    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # pop-up messages would cover the canvas
    for _ in range(10):
        QApplication.instance().processEvents()
    viewer.window._qt_window.repaint()
    img = viewer.screenshot(canvas_only=False, flash=False)
    iio.imwrite(OUT / f"{name}.png", img)
    if widget is not None:
        widget.grab().save(str(OUT / f"widget_{name}.png"))
    print("wrote", OUT / f"{name}.png")


def demo_checkpoint(steps: int, folder: Path) -> Path:
    """A quickly trained small model, only so that the screenshots show something sensible."""
    from src_models import build_model
    from src_models.checkpoints import card_for, save_checkpoint
    from src_models.data import load_samples, split_names
    from src_models.finetune import finetune

    root = Path("/work/shared/data/MoNuSeg/train")
    train_names, _ = split_names(root)
    sample = load_samples(root, [sorted(train_names)[0]])[0]
    torch.manual_seed(0)
    model = build_model("unet", width=0.25).eval()
    card = card_for(model, task="nuclei", tile_size=128, licence="MIT (weights); data CC BY-NC-SA 4.0",
                    trained_on=f"screenshot demo only: {steps} steps on MoNuSeg {sample.name}",
                    instance_params={"threshold": 0.5, "min_size": 20})
    t0 = time.monotonic()
    out = finetune(model, sample.image, sample.mask, steps=steps, lr=2e-3, card=card, batch_size=4)
    print(f"demo model: {steps} steps in {time.monotonic() - t0:.0f} s, loss "
          f"{out.loss_history[0]:.3f} -> {out.loss_history[-1]:.3f}")
    return save_checkpoint(out.model, folder / "demo_nuclei.safetensors", card)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="nuclei")
    p.add_argument("--finetune-steps", type=int, default=10)
    p.add_argument("--demo-steps", type=int, default=300)
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)

    # napari saves settings changes; keep ours (no notification toasts) out of the user's file
    os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp()) / "settings.yaml"))
    import napari
    from napari.settings import get_settings
    from qtpy.QtWidgets import QApplication

    from napari_dca.launch import open_viewer
    from src_models.checkpoints import bundled_checkpoints

    checkpoint = args.checkpoint
    if checkpoint in ("nuclei", "glands") and checkpoint not in bundled_checkpoints():
        checkpoint = str(demo_checkpoint(args.demo_steps, Path(tempfile.mkdtemp())))
    get_settings().application.gui_notification_level = "none"  # no toasts over the pictures

    viewer = napari.Viewer(title="napari-dca", show=True)
    viewer, widgets = open_viewer(checkpoint, "nuclei", "cpu", viewer=viewer)
    app = QApplication.instance()
    model_w, seg, ft, att = (widgets[n] for n in ("Model", "Segment", "Fine-tune", "Attention"))
    _wait(app, lambda: not model_w.jobs.busy)
    if model_w.state.model is None:
        raise SystemExit(f"could not load {checkpoint}")
    image = next(layer for layer in viewer.layers if layer.name.startswith("H&E nuclei"))
    truth = next(layer for layer in viewer.layers if layer.name.endswith("ground truth"))

    def show_dock(name):
        dock, _ = viewer.window.add_plugin_dock_widget("napari-dca", name)
        dock.show()
        dock.raise_()
        for _ in range(20):
            app.processEvents()

    # 1. Model
    show_dock("Model")
    _save(viewer, "model", model_w)

    # 2. Segment (PyTorch runtime: the pictures need no one-off graph export)
    show_dock("Segment")
    runtime = getattr(seg, "runtime", None)
    if runtime is not None and runtime.findData("torch") >= 0:
        runtime.setCurrentIndex(runtime.findData("torch"))
    seg.image.select(image.name)
    seg.run()
    _wait(app, lambda: not seg.busy)
    viewer.layers.selection.active = seg.labels_layer()
    _save(viewer, "segment", seg)

    # 3. Fine-tune on the ground truth of the top half (standing in for a pathologist's corrections)
    show_dock("Fine-tune")
    h, w = image.data.shape[:2]
    region = viewer.add_shapes([np.array([[0, 0], [0, w - 1], [h // 2, w - 1], [h // 2, 0]])],
                               shape_type="rectangle", edge_color="yellow", face_color="transparent",
                               edge_width=3, name="reviewed region")
    ft.image.select(image.name)
    ft.labels.select(truth.name)
    ft.region.select(region.name)
    ft.steps.setValue(args.finetune_steps)
    ft.run()
    _wait(app, lambda: not ft.jobs.busy)
    _save(viewer, "finetune", ft)
    ft.revert()

    # 4. Attention: a query on a nucleus-rich spot
    show_dock("Attention")
    att.pick.setChecked(True)  # what a user ticks to click on the image
    for layer in list(viewer.layers):
        if (layer.name.endswith("probability") or "changes" in layer.name or layer is region
                or layer.__class__.__name__ == "Labels"):
            layer.visible = False
    seg_layer = seg.labels_layer()
    if seg_layer is not None:
        seg_layer.visible = False
    att.image.select(image.name)
    att.run(query=(h * 0.45, w * 0.55))
    _wait(app, lambda: not att.jobs.busy)
    viewer.layers.selection.active = image
    _save(viewer, "attention", att)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
