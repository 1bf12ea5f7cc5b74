"""The Model widget shows each model's measured 1000x1000 time (card.metrics["speed_1000"]) and
whether it is the fast or the accurate variant, in the checkpoint picker and in the card, so a
user can trade speed for quality knowingly; a model without the measurement shows no time."""
import torch  # noqa: F401  (before Qt)

import pytest

from conftest import errors

pytestmark = pytest.mark.gui


def _speed(seconds, cpu):
    return {"seconds": seconds, "probabilities_s": seconds - 0.1, "instances_s": 0.1, "threads": 1,
            "runtime": "onnx", "cpu": cpu, "command": "python benchmarks/time_1000.py X --threads 1"}


def _save(folder, name, task, speed=None):
    from src_models import build_model
    from src_models.checkpoints import card_for, save_checkpoint

    model = build_model("unet", width=0.125).eval()
    metrics = {"dice": 0.8}
    if speed is not None:
        metrics["speed_1000"] = speed
    card = card_for(model, task=task, tile_size=64, trained_on="test", licence="MIT", metrics=metrics)
    return save_checkpoint(model, folder / f"{name}.safetensors", card)


@pytest.fixture
def bundled_dir(tmp_path, monkeypatch):
    """A stand-in for src_models/pretrained/: nuclei and nuclei_accurate measured on this CPU,
    glands_accurate on another CPU, glands without a measurement, plus a broken field."""
    import src_models.checkpoints as checkpoints
    from napari_dca._widgets._speed import this_cpu

    folder = tmp_path / "pretrained"
    folder.mkdir()
    _save(folder, "nuclei", "nuclei", _speed(0.72, this_cpu()))
    _save(folder, "nuclei_accurate", "nuclei", _speed(1.94, this_cpu()))
    _save(folder, "glands", "glands")
    _save(folder, "glands_accurate", "glands", _speed(12.4, "Some Other CPU 9000"))
    _save(folder, "odd", "glands", {"seconds": "n/a"})
    monkeypatch.setattr(checkpoints, "PRETRAINED_DIR", folder)
    return folder


def _texts(combo):
    return [combo.itemText(i) for i in range(combo.count())]


def _pick_and_load(widget, name, qtbot, wait_for, messages) -> str:
    """What a user does: pick `name` in the list, press Load model; the card's text once loaded."""
    from qtpy.QtCore import Qt
    widget.checkpoint.setCurrentIndex(widget.checkpoint.findData(name))
    qtbot.mouseClick(widget.load_button, Qt.LeftButton)
    wait_for(widget)
    assert not errors(messages), messages
    return widget.card.text()


def test_picker_and_card_show_each_variants_measured_time(
        make_napari_viewer, qtbot, wait_for, messages, bundled_dir):
    from qtpy.QtCore import Qt

    from napari_dca._widgets.model import ModelWidget

    viewer = make_napari_viewer()
    widget = ModelWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Model")
    texts = _texts(widget.checkpoint)
    assert texts[:4] == ["nuclei (fast, 0.7 s per 1000×1000 on this CPU)",
                         "nuclei_accurate (accurate, 1.9 s per 1000×1000 on this CPU)",
                         "glands (bundled)",
                         "glands_accurate (accurate, 12 s per 1000×1000 on Some Other CPU 9000)"]
    assert "odd (bundled)" in texts, "an unreadable measurement shows no time"
    tip = widget.checkpoint.itemData(1, Qt.ToolTipRole)
    assert "accurate variant" in tip and "1 thread" in tip and "onnx" in tip
    assert "time_1000.py" in tip

    # the user picks the accurate variant in the list and presses Load model
    card = _pick_and_load(widget, "nuclei_accurate", qtbot, wait_for, messages)
    assert "<b>Speed</b>: accurate variant: 1.9 s per 1000×1000 image on this CPU" in card
    assert "1.8 s model + 0.1 s objects" in card
    assert "speed_1000" not in card and "dice 0.800" in card, "other metrics as before"

    # a model without the measurement: no speed row, no crash
    assert "Speed" not in _pick_and_load(widget, "glands", qtbot, wait_for, messages)


def test_a_recent_file_shows_its_measured_time_and_a_file_without_one_just_its_name(
        make_napari_viewer, tmp_path, bundled_dir):
    from napari_dca._widgets._speed import this_cpu
    from napari_dca._widgets._state import add_recent_checkpoint
    from napari_dca._widgets.model import ModelWidget

    mine = tmp_path / "mine"
    mine.mkdir()
    timed = _save(mine, "my_model", "nuclei", _speed(0.65, this_cpu()))
    plain = _save(mine, "plain", "nuclei")
    add_recent_checkpoint(timed)
    add_recent_checkpoint(plain)
    widget = ModelWidget(make_napari_viewer())
    texts = _texts(widget.checkpoint)
    assert "my_model.safetensors (0.7 s per 1000×1000 on this CPU)" in texts
    assert "plain.safetensors" in texts


def test_the_shipped_glands_accurate_is_listed_beside_glands_and_loads(
        make_napari_viewer, qtbot, wait_for, messages):
    # the real bundled models: the user sees both glands variants with their times and loads the
    # accurate one, which is the wider network its card describes
    from napari_dca._widgets.model import ModelWidget
    from src_models.checkpoints import bundled_checkpoints, load_checkpoint

    if "glands_accurate" not in bundled_checkpoints():
        pytest.skip("no glands_accurate in this checkout")
    widget = ModelWidget(make_napari_viewer())
    texts = _texts(widget.checkpoint)
    fast = next(t for t in texts if t.startswith("glands ("))
    accurate = next(t for t in texts if t.startswith("glands_accurate ("))
    assert fast.startswith("glands (fast, ") and accurate.startswith("glands_accurate (accurate, ")
    assert texts.index(accurate) == texts.index(fast) + 1, "each model next to its accurate variant"
    card = _pick_and_load(widget, "glands_accurate", qtbot, wait_for, messages)
    assert "<b>Speed</b>: accurate variant: 2.1 s per 1000×1000 image" in card
    _, shipped = load_checkpoint("glands_accurate")
    assert shipped.model_kwargs["width"] == 0.25 and shipped.metrics["validation"]["object_f1"] > 0.87
