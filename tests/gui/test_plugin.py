"""The plugin as a user meets it: manifest, widgets, sample data, reader, segmentation."""
import torch  # noqa: F401  (before Qt)

import numpy as np
import pytest

from conftest import errors

pytestmark = pytest.mark.gui


def test_manifest_validates_and_is_discovered():
    from npe2 import PluginManager, PluginManifest

    manifest = PluginManifest.from_distribution("napari-dca")
    manifest.validate_imports()  # every command's python_name imports
    pm = PluginManager()
    pm.discover()
    assert pm.get_manifest("napari-dca").name == "napari-dca"
    keys = {s.key for s in manifest.contributions.sample_data}
    assert keys == {"glands", "nuclei"}
    assert len(manifest.contributions.widgets) == 4


def _open_widgets(viewer):
    from napari_dca._widgets.attention import AttentionWidget
    from napari_dca._widgets.finetune import FinetuneWidget
    from napari_dca._widgets.model import ModelWidget
    from napari_dca._widgets.segment import SegmentWidget

    widgets = {}
    for name, cls in (("model", ModelWidget), ("segment", SegmentWidget),
                      ("finetune", FinetuneWidget), ("attention", AttentionWidget)):
        widgets[name] = cls(viewer)
        viewer.window.add_dock_widget(widgets[name], name=name)
    return widgets


def test_each_widget_opens_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    for name in ("Model", "Segment", "Fine-tune", "Attention"):
        dock, widget = viewer.window.add_plugin_dock_widget("napari-dca", name)
        assert widget is not None


def test_sample_data_carries_licence(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-dca", "nuclei")
    viewer.open_sample("napari-dca", "glands")
    images = [layer for layer in viewer.layers if getattr(layer, "rgb", False)]
    assert len(images) == 2
    assert all("licence" in layer.metadata and "citation" in layer.metadata for layer in images)


def _load(viewer, checkpoint):
    from napari_dca._widgets._state import get_state, load_model_into
    state = get_state(viewer)
    load_model_into(state, checkpoint)
    return state


def test_segmenting_creates_labels_of_the_image_shape(make_napari_viewer, tiny_checkpoint,
                                                      small_image, wait_for, messages):
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(small_image, name="he")
    _load(viewer, tiny_checkpoint)
    widget = SegmentWidget(viewer)
    widget.run()
    wait_for(widget)
    assert not errors(messages)
    labels = [layer for layer in viewer.layers if layer.__class__.__name__ == "Labels"]
    assert len(labels) == 1 and labels[0].data.shape == small_image.shape[:2]
    # a second run updates the same layers instead of adding new ones
    n_layers = len(viewer.layers)
    widget.run()
    wait_for(widget)
    assert len(viewer.layers) == n_layers


def test_threshold_change_reuses_cached_probabilities(make_napari_viewer, tiny_checkpoint,
                                                      small_image, wait_for, qtbot):
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(small_image, name="he")
    state = _load(viewer, tiny_checkpoint)
    calls = []
    state.model.register_forward_hook(lambda *a: calls.append(1))
    widget = SegmentWidget(viewer)
    widget.min_size.setValue(0)
    widget.run()
    wait_for(widget)
    assert calls, "the model ran"
    n_calls = len(calls)
    layer = widget.labels_layer()
    probs = widget.result.foreground
    before = layer.data.copy()
    # a threshold between the probability's quartiles changes the foreground for sure
    new = float(np.quantile(probs, 0.25 if (before > 0).mean() > 0.5 else 0.75))
    widget.threshold.setValue(new)
    qtbot.waitUntil(lambda: not np.array_equal(layer.data, before), timeout=5000)
    assert len(calls) == n_calls, "no model run for a threshold change"
    # every pixel above the new threshold is in an object (hole filling may add a few more)
    assert np.all(layer.data[probs >= widget.threshold.value()] > 0)


def test_launch_docks_widgets_opens_the_sample_and_selects_the_checkpoint(
        make_napari_viewer, tiny_checkpoint, wait_for, messages):
    from napari_dca.launch import open_viewer

    viewer = make_napari_viewer()
    viewer, widgets = open_viewer(str(tiny_checkpoint), "nuclei", "cpu", viewer=viewer)
    assert set(widgets) == {"Model", "Segment", "Fine-tune", "Attention"}
    assert any(layer.name.startswith("H&E nuclei") for layer in viewer.layers)
    wait_for(widgets["Model"])
    state = widgets["Model"].state
    assert state.model is not None and state.checkpoint == str(tiny_checkpoint)
    assert widgets["Segment"].image.currentText().startswith("H&E nuclei")


def test_dropping_a_checkpoint_loads_it_as_the_current_model(make_napari_viewer, tiny_checkpoint,
                                                             messages):
    from napari_dca._widgets._state import get_state
    from napari_dca._widgets.model import ModelWidget

    viewer = make_napari_viewer()
    model_widget = ModelWidget(viewer)
    layers = viewer.open(str(tiny_checkpoint), plugin="napari-dca")
    assert layers == []  # the reader adds no layer
    state = get_state(viewer)
    assert state.model is not None and state.card.task == "nuclei"
    assert "unet" in model_widget.card.text()


def test_bad_input_shows_a_message_never_a_traceback(make_napari_viewer, tiny_checkpoint,
                                                     four_channel_checkpoint, small_image,
                                                     wait_for, messages, tmp_path):
    from napari_dca._widgets._state import get_state, load_model_into
    from napari_dca._widgets.attention import AttentionWidget
    from napari_dca._widgets.finetune import FinetuneWidget
    from napari_dca._widgets.model import ModelWidget
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    seg, ft, att = SegmentWidget(viewer), FinetuneWidget(viewer), AttentionWidget(viewer)
    # no image layer
    for widget in (seg, ft, att):
        messages.clear()
        widget.run()
        assert errors(messages) and "image" in errors(messages)[0].lower()
    # no model
    viewer.add_image(small_image, name="he")
    messages.clear()
    seg.run()
    assert "Model widget" in errors(messages)[0]
    # a 3D RGB stack without corrections: fine-tune works on the plane on screen
    # (tests/gui/test_stack_planes.py) and says what it needs first, in one line
    load_model_into(get_state(viewer), tiny_checkpoint)
    viewer.add_image(np.zeros((3, 64, 64, 3), np.uint8), name="stack", rgb=True)
    messages.clear()
    ft.image.select("stack")
    ft.run()
    assert errors(messages) and "corrected labels" in errors(messages)[0].lower()
    assert "Traceback" not in errors(messages)[0]
    # a checkpoint for another number of channels (4) on an RGB image: fails in the worker
    load_model_into(get_state(viewer), four_channel_checkpoint)
    seg.image.select("he")
    messages.clear()
    seg.run()
    wait_for(seg)
    assert errors(messages) and "channels" in errors(messages)[0]
    assert "Traceback" not in errors(messages)[0]
    # a file that is not a checkpoint, in the Model widget
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    model_widget = ModelWidget(viewer)
    model_widget.select_checkpoint(str(bad))
    messages.clear()
    model_widget.load()
    wait_for(model_widget)
    assert errors(messages) and "bad.safetensors" in errors(messages)[0]


def test_visible_region_only_segments_what_the_canvas_shows(make_napari_viewer, tiny_checkpoint,
                                                            wait_for, messages, qtbot):
    from napari_dca._sample_data import nuclei_sample
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer(show=True)
    big = nuclei_sample()[0][0]
    image = viewer.add_image(big, name="he")
    _load(viewer, tiny_checkpoint)
    viewer.camera.center = (400, 380)
    viewer.camera.zoom = 8.0
    qtbot.waitUntil(lambda: image.corner_pixels[1, 0] - image.corner_pixels[0, 0] < 400, timeout=5000)
    widget = SegmentWidget(viewer)
    widget.visible_only.setChecked(True)
    widget.run()
    wait_for(widget)
    assert not errors(messages), messages
    labels = widget.labels_layer()
    rows, cols = widget.result.region
    assert labels.data.shape == (rows.stop - rows.start, cols.stop - cols.start)
    assert labels.data.shape[0] < big.shape[0] and labels.data.shape[1] < big.shape[1]
    assert rows.start <= 400 < rows.stop and cols.start <= 380 < cols.stop
    np.testing.assert_allclose(labels.translate, (rows.start, cols.start))


def test_grayscale_image_is_segmented(make_napari_viewer, tiny_checkpoint, small_image, wait_for,
                                      messages):
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(small_image.mean(-1).astype(np.uint8), name="gray")
    _load(viewer, tiny_checkpoint)
    widget = SegmentWidget(viewer)
    widget.run()
    wait_for(widget)
    assert not errors(messages), messages
    assert widget.labels_layer().data.shape == small_image.shape[:2]
