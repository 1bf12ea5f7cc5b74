"""Fine-tune and Attention on a stack, driven with real Qt events: the user moves the dims slider to
plane k, paints in plane k of the labels, fine-tunes (the engine gets plane k of the image and plane
k of the corrections) and clicks on plane k for attention (the plane k image is analysed, and the
overlay lies on plane k only)."""
import torch  # noqa: F401  (before Qt)

import numpy as np
import pytest

from conftest import errors, fit, paint, settle, shown_viewer, drag

pytestmark = pytest.mark.gui


def _stack():
    from napari_dca._sample_data import nuclei_sample
    s = nuclei_sample()[0][0]
    return np.stack([s[:96, :128], s[100:196, 100:228], s[200:296, 200:328]])


def _slide_to(qtbot, viewer, plane: int) -> None:
    """Moves the first dims slider to `plane` as a user does: clicks on the slider's track right
    (or left) of its handle, one plane per click."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest

    slider = viewer.window._qt_viewer.dims.slider_widgets[0].slider
    for _ in range(10):
        now = viewer.dims.current_step[0]
        if now == plane:
            return
        x = slider.width() - 3 if now < plane else 3
        QTest.mouseClick(slider, Qt.LeftButton, Qt.NoModifier, QPoint(x, slider.height() // 2))
        settle(qtbot, 30)
    raise AssertionError(f"the dims slider did not reach plane {plane}: {viewer.dims.current_step}")


@pytest.fixture
def recorded(monkeypatch):
    """What the engine was asked to train on / analyse: {'finetune': (image, labels), 'attention': image}."""
    import src_models.attention as attention
    import src_models.finetune as engine

    seen = {}
    real_finetune, real_maps = engine.finetune, attention.attention_maps

    def finetune(model, image, labels, *args, **kwargs):
        seen["finetune"] = (np.array(image), np.array(labels))
        return real_finetune(model, image, labels, *args, **kwargs)

    def attention_maps(model, image, *args, **kwargs):
        seen["attention"] = np.array(image)
        return real_maps(model, image, *args, **kwargs)
    monkeypatch.setattr(engine, "finetune", finetune)
    monkeypatch.setattr(attention, "attention_maps", attention_maps)
    return seen


def test_fine_tune_and_attention_work_on_the_plane_on_screen(
        make_napari_viewer, qtbot, wait_for, messages, trained_checkpoint, keep_every_round,
        recorded):
    from qtpy.QtCore import Qt

    from napari_dca._widgets._state import get_state, load_model_into
    from napari_dca._widgets.attention import AttentionWidget
    from napari_dca._widgets.finetune import FinetuneWidget
    from napari_dca._widgets.segment import SegmentWidget

    stack = _stack()
    viewer = shown_viewer(make_napari_viewer, qtbot)
    viewer.add_image(stack, name="stack", rgb=True)
    load_model_into(get_state(viewer), trained_checkpoint)
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    seg.min_size.setValue(0)
    fit(viewer, qtbot)

    _slide_to(qtbot, viewer, 2)
    qtbot.mouseClick(seg.run_button, Qt.LeftButton)
    wait_for(seg)
    layer = seg.labels_layer()
    assert layer.data.shape == (3, 96, 128) and layer.data[2].max() > 0

    # the user corrects plane 2: a stroke of a new object
    before = np.array(layer.data)
    paint(viewer, qtbot, layer, [(30, 20), (30, 80)], 41, brush=8)
    layer.mode = "pan_zoom"
    painted = np.asarray(layer.data) != before
    assert painted[2].sum() > 50 and not painted[:2].any()
    corrected = np.array(layer.data)

    ft = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(ft, name="Fine-tune", tabify=True)
    settle(qtbot, 50)
    ft.image.set_layer(viewer.layers["stack"])
    ft.labels.set_layer(layer)
    ft.steps.setValue(2)
    qtbot.mouseClick(ft.run_button, Qt.LeftButton)
    wait_for(ft)
    assert not errors(messages), messages
    image, labels = recorded["finetune"]
    np.testing.assert_array_equal(image, stack[2])       # the image plane on screen ...
    np.testing.assert_array_equal(labels, corrected[2])  # ... and the same plane of the corrections
    np.testing.assert_array_equal(np.asarray(layer.data), corrected), "the user's layer is untouched"
    r = ft.round
    assert r is not None and r.new_result.plane == (2,)
    new = seg.labels_layer()
    assert new is not layer and new.data.shape == (3, 96, 128)
    assert new.data[2].max() > 0 and new.data[0].max() == 0 and new.data[1].max() == 0
    changes = next(l for l in viewer.layers if "changes" in l.name)
    assert changes.data.shape == (3, 96, 128) and not np.asarray(changes.data)[:2].any()

    # Revert: the round's new labels layer goes, its changes layer is hidden and emptied, the
    # user's corrected stack stays as painted
    qtbot.mouseClick(ft.revert_button, Qt.LeftButton)
    settle(qtbot, 50)
    assert new not in viewer.layers
    assert not changes.visible and not np.asarray(changes.data).any()
    np.testing.assert_array_equal(np.asarray(layer.data), corrected)

    # attention: the user goes to plane 0, ticks the box and clicks on the tissue
    att = AttentionWidget(viewer)
    viewer.window.add_dock_widget(att, name="Attention", tabify=True)
    att.raise_()
    settle(qtbot, 50)
    _slide_to(qtbot, viewer, 0)
    viewer.layers.selection.active = viewer.layers["stack"]
    qtbot.mouseClick(att.pick, Qt.LeftButton)
    qtbot.waitUntil(lambda: att.listening, timeout=5000)
    drag(viewer, qtbot, [(48.0, 64.0)])  # a click on the canvas
    qtbot.waitUntil(lambda: "attention" in recorded, timeout=10000)
    wait_for(att)
    assert not errors(messages), messages
    np.testing.assert_array_equal(recorded["attention"], stack[0])
    assert att.plane == (0,) and "plane 0" in att.summary.text()
    overlay = next(l for l in viewer.layers if l.name.endswith("attention"))
    assert overlay.ndim == 3 and not overlay._slice.empty, "shown on plane 0"
    points = next(l for l in viewer.layers if l.name.endswith("attention query"))
    assert points.data.shape == (1, 3) and points.data[0, 0] == 0
    _slide_to(qtbot, viewer, 1)
    assert overlay._slice.empty, "the overlay of plane 0 is not drawn over plane 1"
