"""Attention widget: overlays line up with the image, whatever its size or scale."""
import torch  # noqa: F401  (before Qt)

import numpy as np
import pytest

from conftest import errors

pytestmark = pytest.mark.gui


def _viewer_with_model(make_napari_viewer, checkpoint, image, **image_kwargs):
    from napari_dca._widgets._state import get_state, load_model_into
    from napari_dca._widgets.attention import AttentionWidget

    viewer = make_napari_viewer()
    layer = viewer.add_image(image, name="he", **image_kwargs)
    load_model_into(get_state(viewer), checkpoint)
    return viewer, layer, AttentionWidget(viewer)


def _extent(layer):
    """World bounding box (corners of the pixels) of a 2D layer."""
    lo, hi = np.asarray(layer.extent.world)
    step = np.asarray(layer.extent.step)
    return lo - step / 2, hi + step / 2


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.5, 0.25)])
def test_attention_layers_have_the_image_extent(make_napari_viewer, tiny_checkpoint, small_image,
                                                wait_for, messages, scale):
    viewer, image, widget = _viewer_with_model(make_napari_viewer, tiny_checkpoint, small_image,
                                               scale=scale, translate=(10, -5))
    widget.visible_only.setChecked(True)  # the whole (small) image is visible
    widget.run(query=(40.0, 70.0))
    wait_for(widget)
    assert not errors(messages), messages
    for kind in ("query", "received", "channels"):
        widget.kind.setCurrentIndex(widget.kind.findData(kind))
        for stage in range(widget.stage.count()):
            widget.stage.setCurrentIndex(stage)
            att = [layer for layer in viewer.layers if layer.name == "he attention"]
            assert len(att) == 1  # updated in place, never duplicated
            lo, hi = _extent(att[0])
            ilo, ihi = _extent(image)
            np.testing.assert_allclose(lo, ilo, atol=1e-6)
            np.testing.assert_allclose(hi, ihi, atol=1e-6)
            assert att[0].blending == "additive"


def test_head_choice_shows_that_spatial_head(make_napari_viewer, tiny_checkpoint, small_image,
                                             wait_for, messages):
    viewer, image, widget = _viewer_with_model(make_napari_viewer, tiny_checkpoint, small_image)
    widget.visible_only.setChecked(True)
    widget.run(query=(40.0, 70.0))
    wait_for(widget)
    assert not errors(messages), messages
    assert widget.head.count() == 1 + 4  # mean + the 4 SCA heads of the paper configuration
    widget.kind.setCurrentIndex(widget.kind.findData("query"))
    widget.stage.setCurrentIndex(0)
    st = widget.maps.stages[0]
    shown = {}
    for h in (-1, 0, 3):
        widget.head.setCurrentIndex(widget.head.findData(h))
        shown[h] = np.asarray(viewer.layers["he attention"].data).copy()
        np.testing.assert_allclose(shown[h], st.sca_map("query", h))
    assert not np.allclose(shown[0], shown[3])  # heads differ; the mean is one map among them


def test_clicked_point_sets_the_query_on_the_tile_around_it(make_napari_viewer, tiny_checkpoint,
                                                            wait_for, messages):
    from napari_dca._sample_data import nuclei_sample

    big = nuclei_sample()[0][0]  # 512 x 512: several 64-pixel tiles
    viewer, image, widget = _viewer_with_model(make_napari_viewer, tiny_checkpoint, big)
    widget.query_at_world(np.array([300.0, 200.0]))
    wait_for(widget)
    assert not errors(messages), messages
    m = widget.maps
    assert m.query == (300, 200) and m.tiles == 1
    y0, y1, x0, x1 = m.region
    assert y1 - y0 == 64 and x1 - x0 == 64 and y0 <= 300 < y1 and x0 <= 200 < x1
    query_map = m.stages[0].query_map
    assert query_map.sum() == pytest.approx(1.0, rel=1e-4)
    points = [layer for layer in viewer.layers if layer.name == "he attention query"]
    assert len(points) == 1 and np.allclose(points[0].data, [[300, 200]])



def test_the_whole_visible_region_outlines_every_tile_it_counts(make_napari_viewer, tiny_checkpoint,
                                                                small_image, wait_for, messages,
                                                                qtbot):
    """'Which places get looked at most' over a region of several tiles: one outline per analysed
    tile, and the text gives the same number (it once said 16 tiles while one was outlined)."""
    import re

    from qtpy.QtCore import Qt

    image = np.tile(small_image, (2, 2, 1))[:160, :200]   # 3 x 4 tiles of the test model's 64 px
    viewer, layer, widget = _viewer_with_model(make_napari_viewer, tiny_checkpoint, image)
    viewer.window.add_dock_widget(widget, name="Attention")
    widget.visible_only.setChecked(True)
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    wait_for(widget)
    assert not errors(messages), messages
    assert widget.kind.currentData() == "received"
    outline = next(l for l in viewer.layers if l.name.startswith("he analysed tile"))
    said = int(re.search(r"(\d+) tiles?", widget.summary.text()).group(1))
    assert said == widget.maps.tiles == len(outline.data) == 12
    boxes = np.array([[d[:, 0].min(), d[:, 0].max(), d[:, 1].min(), d[:, 1].max()] for d in outline.data])
    assert boxes[:, 0].min() == -0.5 and boxes[:, 1].max() == 159.5 and boxes[:, 3].max() == 199.5
    # a point query outlines just its tile, and says so
    widget.run(query=(100.0, 150.0))
    wait_for(widget)
    widget.kind.setCurrentIndex(widget.kind.findData("query"))
    assert len(outline.data) == 1 and "its tile" in widget.summary.text()
