"""GUI tests: a real napari viewer under Xvfb (`xvfb-run -a python -m pytest tests/gui`).

torch is imported before anything creates a QApplication (importing it afterwards has crashed CI
elsewhere). `make_napari_viewer` comes from napari's pytest plugin (registered by napari itself).
"""
import torch  # noqa: F401  (must come first)

import os
from pathlib import Path

import numpy as np
import pytest

# Without an X server napari cannot make its canvas: skip the GUI tests (run them with xvfb-run -a).
if not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
    collect_ignore_glob = ["test_*.py"]

# Slow machines: how long to wait for a worker before failing (seconds); NAPARI_DCA_TEST_TIMEOUT.
WORKER_TIMEOUT_MS = int(float(os.environ.get("NAPARI_DCA_TEST_TIMEOUT", "60")) * 1000)


@pytest.fixture(autouse=True)
def _config_dir(tmp_path, monkeypatch):
    """Keep the recent-files list out of the user's home."""
    monkeypatch.setenv("NAPARI_DCA_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny U-Net + DCA (random weights, width 0.125, tile 64) saved as a real checkpoint."""
    from src_models import build_model
    from src_models.checkpoints import card_for, save_checkpoint

    torch.manual_seed(0)
    model = build_model("unet", width=0.125).eval()
    card = card_for(model, task="nuclei", tile_size=64, trained_on="nothing (test model)",
                    instance_params={"threshold": 0.5, "min_size": 0}, licence="MIT")
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", card)


@pytest.fixture(scope="session")
def four_channel_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint for 4-channel images: must be refused for RGB input with a message."""
    from src_models import build_model
    from src_models.checkpoints import card_for, save_checkpoint

    model = build_model("unet", width=0.125, in_channels=4).eval()
    card = card_for(model, task="nuclei", tile_size=64, normalization={"mean": [0.5] * 4,
                                                                       "std": [0.25] * 4})
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt4") / "four.safetensors", card)


@pytest.fixture
def small_image() -> np.ndarray:
    """A 96 x 128 crop of the shipped nuclei sample (RGB uint8)."""
    from napari_dca._sample_data import nuclei_sample
    return nuclei_sample()[0][0][:96, :128].copy()


@pytest.fixture
def wait_for(qtbot):
    """wait_for(widget_or_panel): processes Qt events until its workers have finished (a widget's
    `busy`, else its JobPanel's); NAPARI_DCA_TEST_TIMEOUT seconds at most."""
    def wait(obj, timeout=WORKER_TIMEOUT_MS):
        def busy():
            return obj.busy if hasattr(obj, "busy") else obj.jobs.busy
        qtbot.waitUntil(lambda: not busy(), timeout=timeout)
        qtbot.wait(10)  # let queued returned/finished slots run
    return wait


@pytest.fixture
def messages(monkeypatch):
    """Collects what napari-dca shows the user [(kind, text)] instead of popping notifications up."""
    import importlib
    import sys

    import napari.utils.notifications as notifications

    for name in ("model", "segment", "finetune", "attention", "_jobs", "_common", "_state"):
        try:
            importlib.import_module(f"napari_dca._widgets.{name}")
        except ImportError:
            pass
    shown = []
    modules = [notifications] + [m for n, m in list(sys.modules.items())
                                 if n.startswith("napari_dca") and m is not None]
    for mod in modules:
        for kind in ("show_error", "show_warning", "show_info"):
            if hasattr(mod, kind):
                monkeypatch.setattr(mod, kind, lambda msg, _k=kind: shown.append((_k, str(msg))))
    return shown


def errors(shown) -> list[str]:
    return [text for kind, text in shown if kind in ("show_error", "show_warning")]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A tiny U-Net + DCA taught for a few steps on the nuclei sample's ground truth, so that its
    labels have structure (random weights give a near-constant probability); ~15 s once."""
    from napari_dca._sample_data import nuclei_sample
    from src_models import build_model
    from src_models.checkpoints import card_for, save_checkpoint
    from src_models.finetune import finetune

    sample = nuclei_sample()
    image, mask = sample[0][0], sample[1][0]
    torch.manual_seed(0)
    model = build_model("unet", width=0.125).eval()
    card = card_for(model, task="nuclei", tile_size=64, trained_on="nuclei sample (test model)",
                    instance_params={"threshold": 0.5, "min_size": 0}, licence="MIT")
    # train="all": the engine's default trains the decoder only on few objects (issue 16), which
    # leaves this 30-step model too weak to find nuclei on the test slide's region
    out = finetune(model, image[:192, :192], mask[:192, :192], steps=30, lr=1e-2, card=card,
                   batch_size=4, train="all")
    return save_checkpoint(out.model, tmp_path_factory.mktemp("trained") / "trained.safetensors", card)


@pytest.fixture(scope="session")
def other_checkpoint(trained_checkpoint, tmp_path_factory) -> Path:
    """The same weights with a 'glands' card that suggests other settings (threshold 0.8, min size
    40): loading it must not relabel results made before."""
    from src_models.checkpoints import card_for, load_checkpoint, save_checkpoint

    model, _ = load_checkpoint(trained_checkpoint)
    card = card_for(model, task="glands", tile_size=64, trained_on="test", licence="MIT",
                    instance_params={"threshold": 0.8, "min_size": 40})
    return save_checkpoint(model, tmp_path_factory.mktemp("other") / "other.safetensors", card)


# --- driving the canvas with real Qt events ------------------------------------------------------
def settle(qtbot, ms: int = 30) -> None:
    qtbot.wait(ms)


def canvas_widget(viewer):
    return viewer.window._qt_viewer.canvas.native


def canvas_point(viewer, y: float, x: float):
    """The canvas (widget) pixel showing world point (y, x) of a 2D view."""
    from qtpy.QtCore import QPoint

    native = canvas_widget(viewer)
    cy, cx = np.asarray(viewer.camera.center)[-2:]
    zoom = viewer.camera.zoom
    return QPoint(int(round((x - cx) * zoom + native.width() / 2)),
                  int(round((y - cy) * zoom + native.height() / 2)))


def drag(viewer, qtbot, points) -> None:
    """Mouse press at the first (y, x) world point, moves through the others, release at the last:
    what a user's brush stroke (or click, with one point) sends to the canvas."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    native = canvas_widget(viewer)
    QTest.mousePress(native, Qt.LeftButton, Qt.NoModifier, canvas_point(viewer, *points[0]))
    for p in points[1:]:
        QTest.mouseMove(native, canvas_point(viewer, *p))
        settle(qtbot, 5)
    QTest.mouseRelease(native, Qt.LeftButton, Qt.NoModifier, canvas_point(viewer, *points[-1]))
    settle(qtbot)


def paint(viewer, qtbot, layer, points, label: int, mode: str = "paint", brush: int = 6) -> None:
    """A brush stroke with napari's own paint tool: the layer active, in `mode`, real mouse events."""
    viewer.layers.selection.active = layer
    layer.mode = mode
    layer.brush_size = brush
    if mode == "paint":
        layer.selected_label = label
    settle(qtbot)
    drag(viewer, qtbot, points)


def shown_viewer(make_napari_viewer, qtbot):
    """A visible viewer whose canvas has its final size (so canvas_point is exact)."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 800)
    settle(qtbot, 50)
    return viewer


def fit(viewer, qtbot) -> None:
    viewer.reset_view()
    settle(qtbot, 50)



@pytest.fixture
def keep_every_round(monkeypatch):
    """Fine-tuning rounds of 2-3 test steps rarely beat the old model on the held-back check, so
    the engine rolls them back; tests of what the widget does with a kept round force the keep
    (the engine's own decision is tested in tests/test_finetune.py)."""
    import src_models.finetune as engine

    real = engine.finetune

    def kept(*args, **kwargs):
        out = real(*args, **kwargs)
        if not getattr(out, "kept", True):
            out.kept = True
            out.model = out.trained if getattr(out, "trained", None) is not None else out.model
            out.summary = "Kept the fine-tuned model (forced by the test)."
        return out
    monkeypatch.setattr(engine, "finetune", kept)
    return kept


def segmented_viewer(make_napari_viewer, checkpoint, image, wait_for):
    """A viewer with `image` as layer "he", `checkpoint` loaded and one Segment run finished:
    the starting point of the tests that go on from a first result. Returns (viewer, seg)."""
    from napari_dca._widgets._state import get_state, load_model_into
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(image, name="he")
    load_model_into(get_state(viewer), checkpoint)
    seg = SegmentWidget(viewer)
    seg.run()
    wait_for(seg)
    return viewer, seg
