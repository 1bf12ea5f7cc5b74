"""Stacks and whole slides in the viewer, driven with real Qt events: a stack's plane on screen is
segmented into that plane of a labels layer of the stack's shape; on a pyramidal slide Segment
works on the visible region at full resolution (or a drawn rectangle), never on all of level 0,
and its labels, fine-tuning, attention and the GeoJSON export are all in level-0 pixels."""
import torch  # noqa: F401  (before Qt)

import json

import numpy as np
import pytest

from conftest import canvas_widget, drag, errors, fit, paint, settle, shown_viewer

pytestmark = pytest.mark.gui


def _click(qtbot, button):
    from qtpy.QtCore import Qt
    qtbot.mouseClick(button, Qt.LeftButton)


def _key(qtbot, widget, key, modifier=None):
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    widget.setFocus()
    QTest.keyClick(widget, key, modifier if modifier is not None else Qt.NoModifier)
    settle(qtbot, 50)


def _segment_widget(viewer, checkpoint):
    from napari_dca._widgets._state import get_state, load_model_into
    from napari_dca._widgets.segment import SegmentWidget

    load_model_into(get_state(viewer), checkpoint)
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    seg.min_size.setValue(0)
    return seg


def test_a_stack_segments_the_plane_on_screen_into_a_stack_shaped_layer(
        make_napari_viewer, qtbot, wait_for, messages, trained_checkpoint):
    from qtpy.QtCore import Qt

    from napari_dca._sample_data import nuclei_sample
    sample = nuclei_sample()[0][0]
    stack = np.stack([sample[:96, :128], sample[100:196, 100:228], sample[200:296, 200:328]])
    viewer = shown_viewer(make_napari_viewer, qtbot)
    viewer.add_image(stack, name="stack", rgb=True)
    seg = _segment_widget(viewer, trained_checkpoint)
    fit(viewer, qtbot)
    canvas = canvas_widget(viewer)
    for _ in range(2):                          # napari opens a stack at its middle plane;
        _key(qtbot, canvas, Qt.Key_Left)        # the user steps with the arrow keys: 0, then 1
    assert viewer.dims.current_step[0] == 0
    _key(qtbot, canvas, Qt.Key_Right)
    assert viewer.dims.current_step[0] == 1
    _click(qtbot, seg.run_button)
    wait_for(seg)
    assert not errors(messages), messages
    layer = seg.labels_layer()
    assert layer.data.shape == (3, 96, 128), "the labels have the stack's shape"
    assert layer.data[1].max() > 0 and layer.data[0].max() == 0 and layer.data[2].max() == 0
    assert "plane 1" in seg.summary.text()
    plane1 = np.array(layer.data[1])

    _key(qtbot, canvas, Qt.Key_Right)           # next plane, segment again: the same layer
    _click(qtbot, seg.run_button)
    wait_for(seg)
    assert seg.labels_layer() is layer and layer.data[2].max() > 0
    assert np.array_equal(layer.data[1], plane1), "plane 1 keeps its labels"

    # the user paints in plane 2; a run on plane 0 then goes to a new layer, the painting stays
    before = np.array(layer.data)
    paint(viewer, qtbot, layer, [(40, 20), (40, 70)], 77)
    painted = (np.asarray(layer.data) == 77) & (before != 77)
    assert painted[2].sum() > 30 and not painted[:2].any(), "the brush painted plane 2 only"
    layer.mode = "pan_zoom"
    _key(qtbot, canvas, Qt.Key_Left)
    _key(qtbot, canvas, Qt.Key_Left)
    assert viewer.dims.current_step[0] == 0
    _click(qtbot, seg.run_button)
    wait_for(seg)
    assert np.all(np.asarray(layer.data)[painted] == 77), "the painted pixels survive"
    new = seg.labels_layer()
    assert new is not layer and new.data.shape == (3, 96, 128) and new.data[0].max() > 0
    assert "kept" in seg.summary.text()
    assert not errors(messages), messages


def test_a_big_stack_gets_a_lazily_allocated_labels_layer(monkeypatch):
    import napari_dca._widgets.segment as segment
    monkeypatch.setattr(segment, "STACK_NUMPY_BYTES", 1000)
    big = segment.plane_stack((40, 512, 512))
    assert big.shape == (40, 512, 512) and big.dtype == np.int32
    assert not isinstance(big, np.ndarray), "past the bound, planes are allocated only when written"
    big[3, :2, :2] = 5
    assert int(np.asarray(big[3]).max()) == 5 and int(np.asarray(big[4]).max()) == 0


# --- whole slides ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    from src_models.testing.make_slide import make_slide
    path, layout = make_slide(tmp_path_factory.mktemp("slide") / "islands.svs", (1024, 1536), seed=3)
    return path, layout


def _on_tissue(layout) -> tuple[int, int]:
    """A level-0 pixel in the middle of the slide's biggest tissue island."""
    island = max(layout.islands, key=lambda i: i.radius)
    return int(island.cy), int(island.cx)


def _open_slide(viewer, qtbot, path):
    layers = viewer.open(str(path), plugin="napari-dca")
    image = next(l for l in layers if l.__class__.__name__ == "Image")
    assert image.multiscale
    settle(qtbot, 50)
    return image


def _slide_in_segment(make_napari_viewer, qtbot, path, checkpoint):
    """A shown viewer with the slide at `path` open and picked in a docked Segment widget."""
    viewer = shown_viewer(make_napari_viewer, qtbot)
    image = _open_slide(viewer, qtbot, path)
    seg = _segment_widget(viewer, checkpoint)
    seg.image.set_layer(image)
    return viewer, image, np.asarray(image.scale)[-2:], seg


def _zoom_to(viewer, qtbot, image, center_px, zoom):
    """Centre the canvas on level-0 pixel `center_px` at `zoom` screen px per world unit."""
    mpp = np.asarray(image.scale)[-2:]
    viewer.camera.center = tuple(np.asarray(center_px) * mpp)
    viewer.camera.zoom = zoom
    qtbot.waitUntil(lambda: image.data_level == 0, timeout=10000)
    settle(qtbot, 100)


def test_on_a_slide_segment_takes_the_visible_region_at_full_resolution(
        make_napari_viewer, qtbot, wait_for, messages, trained_checkpoint, small_slide, tmp_path,
        monkeypatch):
    import napari_dca._widgets.segment as segment

    viewer, image, mpp, seg = _slide_in_segment(make_napari_viewer, qtbot, small_slide[0],
                                                trained_checkpoint)
    cy, cx = _on_tissue(small_slide[1])

    # zoomed out over the whole slide, a run would read all of level 0: refused, with a message
    monkeypatch.setattr(segment, "MAX_SLIDE_REGION", 600 * 600)
    fit(viewer, qtbot)
    _click(qtbot, seg.run_button)
    settle(qtbot, 50)
    assert not seg.jobs.busy and seg.labels_layer() is None
    assert errors(messages) and "whole slide" in errors(messages)[-1]
    messages.clear()

    _zoom_to(viewer, qtbot, image, (cy, cx), 3.0 / mpp[0])
    _click(qtbot, seg.run_button)
    wait_for(seg)
    assert not errors(messages), messages
    result = seg.result
    rows, cols = result.region
    assert rows.start <= cy < rows.stop and cols.start <= cx < cols.stop
    assert (rows.stop - rows.start) * (cols.stop - cols.start) <= 600 * 600
    labels = seg.labels_layer()
    assert labels.data.shape == (rows.stop - rows.start, cols.stop - cols.start)
    np.testing.assert_allclose(labels.scale, mpp)
    np.testing.assert_allclose(labels.translate, np.array([rows.start, cols.start]) * mpp)
    assert "full resolution" in seg.summary.text()

    # the GeoJSON export is in level-0 pixels of the slide
    viewer.layers.selection.active = labels
    assert seg.export_geojson(tmp_path / "region.geojson")
    wait_for(seg)
    assert not errors(messages), messages
    features = json.loads((tmp_path / "region.geojson").read_text())["features"]
    assert len(features) == result.n_objects > 0
    xy = np.concatenate([np.asarray(f["geometry"]["coordinates"][0]) for f in features])
    assert cols.start <= xy[:, 0].min() and xy[:, 0].max() <= cols.stop
    assert rows.start <= xy[:, 1].min() and xy[:, 1].max() <= rows.stop


def test_on_a_slide_a_drawn_rectangle_is_segmented_fine_tuned_and_analysed(
        make_napari_viewer, qtbot, wait_for, messages, trained_checkpoint, small_slide,
        keep_every_round):
    from napari_dca._widgets.attention import AttentionWidget
    from napari_dca._widgets.finetune import FinetuneWidget

    viewer, image, mpp, seg = _slide_in_segment(make_napari_viewer, qtbot, small_slide[0],
                                                trained_checkpoint)
    _zoom_to(viewer, qtbot, image, (400, 600), 3.0 / mpp[0])
    # the user draws a rectangle with napari's own tool (world coordinates are µm)
    shapes = viewer.add_shapes(name="region", scale=image.scale)
    shapes.mode = "add_rectangle"
    settle(qtbot)
    corners = np.linspace([330, 500], [470, 700], 6)
    drag(viewer, qtbot, [tuple(p * mpp) for p in corners] + [tuple(corners[-1] * mpp)] * 2)
    assert len(shapes.data) == 1
    shapes.mode = "pan_zoom"
    seg.draw_region.set_layer(shapes)
    _click(qtbot, seg.run_button)
    wait_for(seg)
    assert not errors(messages), messages
    rows, cols = seg.result.region
    drawn = np.asarray(shapes.data[0])[:, -2:]  # what napari drew (its last vertex lags the mouse)
    lo, hi = drawn.min(0), drawn.max(0)       # shapes layer pixels = slide level-0 pixels here
    assert abs(rows.start - 330) <= 2 and abs(cols.start - 500) <= 2
    assert (rows.stop, cols.stop) == (int(np.ceil(hi[0] + 0.5)), int(np.ceil(hi[1] + 0.5)))
    assert (rows.start, cols.start) == (int(np.floor(lo[0] + 0.5)), int(np.floor(lo[1] + 0.5)))
    assert rows.stop - rows.start > 80 and cols.stop - cols.start > 120
    labels = seg.labels_layer()
    np.testing.assert_allclose(labels.translate, np.array([rows.start, cols.start]) * mpp)

    # correct the region's labels with the brush, then fine-tune on them: only that window is read
    viewer.layers.selection.active = labels
    paint(viewer, qtbot, labels, [tuple(np.array([360, 520]) * mpp), tuple(np.array([360, 600]) * mpp)], 5)
    labels.mode = "pan_zoom"
    ft = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(ft, name="Fine-tune", tabify=True)
    ft.image.set_layer(image)
    ft.labels.set_layer(labels)
    ft.steps.setValue(2)
    _click(qtbot, ft.run_button)
    wait_for(ft)
    assert not errors(messages), messages
    assert ft.round is not None and ft.round.new_result.region == (rows, cols)
    changes = next(l for l in viewer.layers if "changes" in l.name)
    np.testing.assert_allclose(changes.translate, np.array([rows.start, cols.start]) * mpp)

    # attention at a point of the region
    att = AttentionWidget(viewer)
    viewer.window.add_dock_widget(att, name="Attention", tabify=True)
    att.image.set_layer(image)
    att.run(query=(400.0, 600.0))
    wait_for(att)
    assert not errors(messages), messages
    overlay = next(l for l in viewer.layers if l.name.endswith("attention"))
    y0, y1, x0, x1 = att.maps.region
    assert y0 <= 400 < y1 and x0 <= 600 < x1 and (y1 - y0) * (x1 - x0) <= 256 * 256
    assert overlay.translate[-2] >= y0 * mpp[0] - 1e-6 and overlay.translate[-1] >= x0 * mpp[1] - 1e-6
