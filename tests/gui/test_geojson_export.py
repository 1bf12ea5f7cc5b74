"""The Segment widget's Export GeoJSON, driven with real Qt clicks: Cancel stops the writer between
two objects, leaves no temporary file, keeps a file the user had at that name as it was (or leaves
the name absent), and says so in one line."""
import torch  # noqa: F401  (before Qt)

import json

import numpy as np
import pytest

from conftest import errors, settle

pytestmark = pytest.mark.gui


def _many_objects(n_side: int = 24, cell: int = 10) -> np.ndarray:
    """(n_side * cell)^2 labels with n_side^2 square objects (ids 1..n_side^2)."""
    labels = np.zeros((n_side * cell, n_side * cell), np.int32)
    for i in range(n_side):
        for j in range(n_side):
            labels[i * cell + 2:(i + 1) * cell - 2, j * cell + 2:(j + 1) * cell - 2] = i * n_side + j + 1
    return labels


@pytest.fixture
def slow_writer(monkeypatch):
    """Each Feature takes 5 ms to write (a big slide's export, in a test's time): Cancel lands
    while the file is being written."""
    import time

    import src_models.slide.geojson as geojson

    real = geojson.GeoJSONWriter.add

    def add(self, feat):
        time.sleep(0.005)
        real(self, feat)
    monkeypatch.setattr(geojson.GeoJSONWriter, "add", add)


def _export_widget(make_napari_viewer, qtbot, monkeypatch, target):
    from qtpy.QtWidgets import QFileDialog

    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((240, 240, 3), np.uint8), name="he")
    labels = viewer.add_labels(_many_objects(), name="he nuclei")
    viewer.layers.selection.active = labels
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    # the save dialog answers with `target` (a native dialog cannot be clicked through here)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(target), "")))
    return viewer, seg


def _partials(folder):
    return [p for p in folder.iterdir() if p.name.endswith(".partial")]


def _press_export_then_cancel(qtbot, seg, folder):
    from qtpy.QtCore import Qt

    qtbot.mouseClick(seg.export_button, Qt.LeftButton)
    # wait until the writer is in the middle of the file: objects already in the temporary file
    qtbot.waitUntil(lambda: any(p.stat().st_size > 2000 for p in _partials(folder)), timeout=30000)
    assert seg.jobs.busy and seg.jobs.cancel_button.isEnabled()
    qtbot.mouseClick(seg.jobs.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not seg.jobs.busy, timeout=30000)
    settle(qtbot, 20)


def test_cancel_during_export_keeps_the_users_earlier_file_unchanged(
        make_napari_viewer, qtbot, monkeypatch, messages, slow_writer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "he.geojson"
    earlier = '{"type": "FeatureCollection", "features": []}  the user\'s earlier export\n'
    target.write_text(earlier)
    viewer, seg = _export_widget(make_napari_viewer, qtbot, monkeypatch, target)

    _press_export_then_cancel(qtbot, seg, out)
    assert target.read_text() == earlier, "the earlier file is untouched"
    assert [p.name for p in out.iterdir()] == ["he.geojson"], "no temporary file is left behind"
    line = seg.summary.text()
    assert "cancelled" in line and "he.geojson is unchanged" in line and "\n" not in line
    assert ("show_info", line) in messages, "the same one line is shown to the user"
    assert not errors(messages), messages
    assert seg.export_button.isEnabled() and not seg.jobs.cancel_button.isEnabled()


def test_cancel_during_export_creates_no_file_and_a_later_export_completes(
        make_napari_viewer, qtbot, monkeypatch, messages, slow_writer, tmp_path):
    from qtpy.QtCore import Qt

    out = tmp_path / "out"
    out.mkdir()
    target = out / "he.geojson"
    viewer, seg = _export_widget(make_napari_viewer, qtbot, monkeypatch, target)

    _press_export_then_cancel(qtbot, seg, out)
    assert not target.exists() and not _partials(out) and not list(out.iterdir())
    assert "no he.geojson was created" in seg.summary.text()

    # Export again without cancelling: the whole file, every object once
    qtbot.mouseClick(seg.export_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not seg.jobs.busy, timeout=60000)
    settle(qtbot, 20)
    assert not errors(messages), messages
    features = json.loads(target.read_text())["features"]
    assert len(features) == 24 * 24 and not _partials(out)
    assert "Exported 576 objects" in seg.summary.text()
