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
    assert "napari-dca" in pm.iter_manifests.__self__._manifests if False else pm.get_manifest("napari-dca")
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
    images = [layer for layer in viewer.layers if layer.rgb]
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
