"""The widgets move the long-lived objects out of the garbage collector's full scans, and put them
back as soon as a layer is removed (a layer that existed before must still be freed)."""
import torch  # noqa: F401  (before Qt)

import gc

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_long_lived_objects_are_frozen_until_a_layer_is_removed(make_napari_viewer, monkeypatch):
    import napari_dca._widgets._gc_freeze as freezing
    from napari_dca._widgets.segment import SegmentWidget

    freezing.thaw()
    gc.unfreeze()
    monkeypatch.setattr(freezing, "_STATE", {"frozen": False, "done": False})
    viewer = make_napari_viewer()
    early = viewer.add_image(np.zeros((8, 8)), name="opened before the widget")
    SegmentWidget(viewer)
    assert gc.get_freeze_count() > 0, "the objects alive when the widget opened are frozen"
    SegmentWidget(viewer)  # once per process
    frozen = gc.get_freeze_count()
    viewer.layers.remove(early)
    assert gc.get_freeze_count() == 0, "removing a layer puts every object back under the collector"
    assert frozen > 1000
    SegmentWidget(viewer)
    assert gc.get_freeze_count() == 0, "not frozen again in this process"
