"""Fine-tune widget: runs in a worker with progress, can be cancelled, revert restores the outputs."""
import torch  # noqa: F401  (before Qt)

import numpy as np
import pytest

from conftest import errors, segmented_viewer

pytestmark = pytest.mark.gui


def _setup(make_napari_viewer, checkpoint, image, wait_for):
    from napari_dca._widgets.finetune import FinetuneWidget

    viewer, seg = segmented_viewer(make_napari_viewer, checkpoint, image, wait_for)
    output = seg.labels_layer()
    # the "pathologist" corrects: two square objects in the top-left corner
    corrected = np.zeros(image.shape[:2], np.int32)
    corrected[10:30, 10:30] = 1
    corrected[40:60, 50:70] = 2
    user = viewer.add_labels(corrected, name="my corrections")
    ft = FinetuneWidget(viewer)
    ft.image.select("he")
    ft.labels.select("my corrections")
    ft.steps.setValue(3)
    return viewer, seg, ft, output, user


def test_finetune_runs_in_a_worker_reports_progress_and_reverts(
        make_napari_viewer, tiny_checkpoint, small_image, wait_for, messages, qtbot, tmp_path,
        keep_every_round):
    from napari_dca._widgets.finetune import compare

    viewer, seg, ft, output, user = _setup(make_napari_viewer, tiny_checkpoint, small_image, wait_for)
    state = seg.state
    old_model, old_labels = state.model, output.data.copy()
    user_before = user.data.copy()
    progress = []
    ft.jobs.progressed.connect(lambda done, total: progress.append((done, total)))
    ft.run()
    assert ft.jobs.busy and ft.jobs.worker is not None  # off the GUI thread
    wait_for(ft)
    assert not errors(messages), messages
    assert progress and progress[-1][0] == progress[-1][1]
    assert len(ft.plot.values) == 3
    assert state.model is not old_model and ft.round is not None
    assert np.array_equal(user.data, user_before), "the user's labels are never written to"
    # outputs updated in place (same layer), and a changes layer shows the difference
    assert seg.labels_layer() is output
    assert any(layer.name.startswith("he changes") for layer in viewer.layers)
    # save with parent + corrections
    path = ft.save(tmp_path / "tuned.safetensors")
    from src_models.checkpoints import load_checkpoint
    _, card = load_checkpoint(path)
    assert card.parent and card.corrections
    # revert: old weights, old outputs
    ft.revert()
    assert state.model is old_model
    assert np.array_equal(output.data, old_labels)
    changes = [layer for layer in viewer.layers if layer.name.startswith("he changes")]
    assert len(changes) == 1 and not changes[0].visible and not np.asarray(changes[0].data).any(), \
        "Revert hides and empties the changes layer (removing it costs napari a garbage collection)"
    # the next round shows its changes in that same layer again
    ft.run()
    wait_for(ft)
    assert not errors(messages), messages
    again = [layer for layer in viewer.layers if layer.name.startswith("he changes")]
    assert again == changes and changes[0].visible
    expected = compare(ft.round.old_result.labels, ft.round.new_result.labels)[0]
    np.testing.assert_array_equal(np.asarray(changes[0].data), expected)


def test_finetune_can_be_cancelled(make_napari_viewer, tiny_checkpoint, small_image, wait_for,
                                   messages, qtbot, keep_every_round):
    viewer, seg, ft, output, user = _setup(make_napari_viewer, tiny_checkpoint, small_image, wait_for)
    ft.steps.setValue(2000)
    ft.run()
    qtbot.waitUntil(lambda: len(ft.plot.values) >= 1, timeout=30000)
    ft.jobs.cancel()
    wait_for(ft)
    assert not errors(messages), messages
    assert ft.round is not None and ft.round.stopped == "cancelled"
    assert len(ft.round.losses) < 2000


def test_auto_steps_typed_at_the_keyboard_run_the_engines_default_round(
        make_napari_viewer, tiny_checkpoint, small_image, wait_for, messages, qtbot, keep_every_round):
    from qtpy.QtCore import Qt
    from src_models.finetune import DEFAULT_STEPS

    viewer, seg, ft, output, user = _setup(make_napari_viewer, tiny_checkpoint, small_image, wait_for)
    user_before = user.data.copy()
    for _ in range(3):                                     # 3 -> 2 -> 1 -> "auto", as a user would
        qtbot.keyClick(ft.steps, Qt.Key_Down)
    assert ft.steps.text() == "auto"
    qtbot.mouseClick(ft.run_button, Qt.LeftButton)
    wait_for(ft)
    assert not errors(messages), messages
    assert len(ft.plot.values) == DEFAULT_STEPS            # two corrected objects: the few-object round
    # the next control: a number typed over "auto" is what the next round runs
    ft.steps.selectAll()
    qtbot.keyClicks(ft.steps, "2")
    assert ft.steps.value() == 2
    qtbot.mouseClick(ft.run_button, Qt.LeftButton)
    wait_for(ft)
    assert not errors(messages), messages
    assert len(ft.plot.values) == 2
    assert np.array_equal(user.data, user_before), "the user's corrections are never written to"


def test_the_widget_offers_the_engines_default_round(make_napari_viewer, tmp_path, monkeypatch):
    from napari_dca._widgets import finetune as widget
    from src_models.finetune import DECODER_ONLY_BELOW, DEFAULT_STEPS, DEFAULT_STEPS_MANY

    monkeypatch.setenv("NAPARI_DCA_CONFIG_DIR", str(tmp_path))   # nothing remembered
    # the tooltip tells the engine's numbers (not imported by the widget: it would import torch)
    assert widget.AUTO_STEPS_TIP.endswith(f"auto: {DEFAULT_STEPS}, or {DEFAULT_STEPS_MANY} when you "
                                          f"corrected {DECODER_ONLY_BELOW} objects or more")
    ft = widget.FinetuneWidget(make_napari_viewer())
    assert ft.steps.value() == widget.AUTO_STEPS and ft.steps.text() == "auto"
    assert ft.steps.toolTip() == widget.AUTO_STEPS_TIP
