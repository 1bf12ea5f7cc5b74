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
