"""The correction loop as a pathologist drives it: real mouse events on the canvas (napari's own
paint / erase tools on a Labels layer), then the next control. One test per case of issue 11;
each failed on the first release's widgets. The user's work must never be lost or hidden."""
import torch  # noqa: F401  (before Qt)

import numpy as np
import pytest

from conftest import drag, errors, fit, paint, settle, shown_viewer

pytestmark = pytest.mark.gui

STROKE = [(20, 20), (20, 45), (22, 70)]   # a horizontal brush stroke (image pixels y, x)
ERASE = [(60, 30), (60, 60), (62, 100)]


def _load(viewer, checkpoint):
    from napari_dca._widgets._state import get_state, load_model_into
    state = get_state(viewer)
    load_model_into(state, checkpoint)
    return state


def _segmented(make_napari_viewer, qtbot, wait_for, checkpoint, image, name="he"):
    from napari_dca._widgets.segment import SegmentWidget

    viewer = shown_viewer(make_napari_viewer, qtbot)
    viewer.add_image(image, name=name)
    state = _load(viewer, checkpoint)
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    seg.image.select(name)
    seg.min_size.setValue(0)
    wait_for(seg)
    seg.run()
    wait_for(seg)
    fit(viewer, qtbot)
    return viewer, state, seg


def _painted(viewer, qtbot, layer, label=9):
    """Paints STROKE with `label` into `layer`; -> mask of the painted pixels."""
    before = layer.data.copy()
    paint(viewer, qtbot, layer, STROKE, label)
    mask = (layer.data == label) & (before != label)
    assert mask.sum() > 50, "the brush stroke painted the layer"
    return mask


def _nudge(seg, qtbot, wait_for, values=(0.52, 0.5)):
    for v in values:
        seg.threshold.setValue(v)
        qtbot.wait(80)  # past the slider's 40 ms coalescing timer
        wait_for(seg)


# --- 1 ---------------------------------------------------------------------------------------------
def test_1_painted_labels_survive_threshold_segment_and_model_load(
        make_napari_viewer, qtbot, wait_for, messages, trained_checkpoint, other_checkpoint,
        small_image):
    from napari_dca._widgets.model import ModelWidget

    viewer, state, seg = _segmented(make_napari_viewer, qtbot, wait_for, trained_checkpoint,
                                    small_image)
    user = seg.labels_layer()
    mask = _painted(viewer, qtbot, user)
    _nudge(seg, qtbot, wait_for)
    assert np.all(user.data[mask] == 9), "a threshold nudge rewrote the painted layer"
    assert seg.labels_layer() is not user
    assert viewer.layers.selection.active is user, "the new labels took the user's brush away"
    seg.run()
    wait_for(seg)
    assert np.all(user.data[mask] == 9), "Segment rewrote the painted layer"
    mw = ModelWidget(viewer)
    mw.select_checkpoint(str(other_checkpoint))
    mw.load()
    wait_for(mw)
    qtbot.wait(100)
    wait_for(seg)
    assert np.all(user.data[mask] == 9), "loading a model rewrote the painted layer"
    assert user in viewer.layers and not errors(messages)
    # napari's undo history of the user's layer is untouched: Ctrl+Z takes the stroke back
    user.undo()
    assert not np.all(user.data[mask] == 9)


# --- 2 ---------------------------------------------------------------------------------------------
def test_2_loading_a_model_does_not_relabel_or_change_the_task_of_results(
        make_napari_viewer, qtbot, wait_for, messages, trained_checkpoint, other_checkpoint,
        small_image):
    from napari_dca._widgets.model import ModelWidget

    viewer, state, seg = _segmented(make_napari_viewer, qtbot, wait_for, trained_checkpoint,
                                    small_image)
    layer = seg.labels_layer()
    before = layer.data.copy()
    assert len(np.unique(before)) > 2, "the test model finds objects"
    mw = ModelWidget(viewer)
    mw.select_checkpoint(str(other_checkpoint))
    mw.load()
    wait_for(mw)
    qtbot.wait(150)
    wait_for(seg)
    assert state.card.task == "glands"
    assert all(np.array_equal(l.data, before) for l in viewer.layers
               if l.__class__.__name__ == "Labels"), "loading a model relabelled the result"
    assert seg.task.currentText() == "nuclei", "the selected image's result is a nuclei result"
    assert seg.threshold.value() == pytest.approx(0.5)


# --- 3 ---------------------------------------------------------------------------------------------
def test_3_brush_strokes_never_run_attention_or_change_the_active_layer(
        make_napari_viewer, qtbot, wait_for, messages, trained_checkpoint, small_image):
    from napari_dca._widgets.attention import AttentionWidget

    viewer, state, seg = _segmented(make_napari_viewer, qtbot, wait_for, trained_checkpoint,
                                    small_image)
    att = AttentionWidget(viewer)
    viewer.window.add_dock_widget(att, name="Attention", tabify=True)  # docked, tab behind Segment
    settle(qtbot, 50)
    user = seg.labels_layer()
    n_layers = len(viewer.layers)
    paint(viewer, qtbot, user, [(20, 20)], 9)  # first dab: a click with the brush
    wait_for(att)
    assert viewer.layers.selection.active is user, "the first dab changed the active layer"
    second = [(70, 90)]
    before = user.data.copy()
    drag(viewer, qtbot, second)  # second dab, same layer, still in paint mode
    wait_for(att)
    assert np.any(user.data != before), "the second dab painted nothing"
    assert len(viewer.layers) == n_layers, "a brush stroke added (attention) layers"
    # closed: no callbacks left on the canvas
    viewer.window.remove_dock_widget(att)
    att.close()
    settle(qtbot)
    assert not any("on_drag" in getattr(cb, "__name__", "") for cb in viewer.mouse_drag_callbacks)


# --- 4 ---------------------------------------------------------------------------------------------
def test_4_changes_compare_the_old_models_prediction_with_the_new_one(
        make_napari_viewer, qtbot, wait_for, messages, trained_checkpoint, small_image,
        keep_every_round):
    from napari_dca._widgets.finetune import FinetuneWidget
    from src_models.inference import predict
    from src_models.instances import InstanceMaker

    viewer, state, seg = _segmented(make_napari_viewer, qtbot, wait_for, trained_checkpoint,
                                    small_image)
    user = seg.labels_layer()
    old_prediction = user.data.copy()
    paint(viewer, qtbot, user, STROKE, 9)
    paint(viewer, qtbot, user, ERASE, 0, mode="erase")
    assert np.any((user.data > 0) != (old_prediction > 0)), "the corrections changed foreground"
    ft = FinetuneWidget(viewer)
    ft.image.select("he")
    ft.labels.set_layer(user) if hasattr(ft.labels, "set_layer") else ft.labels.select(user.name)
    ft.steps.setValue(2)
    ft.run()
    wait_for(ft)
    assert not errors(messages), messages
    probs = predict(state.model, small_image, state.card, device="cpu")
    new = InstanceMaker(probs, state.card, mode="nuclei").labels(threshold=0.5, min_size=0)
    expected = np.zeros(new.shape, np.uint8)
    expected[(new > 0) & (old_prediction == 0)] = 1
    expected[(new == 0) & (old_prediction > 0)] = 2
    changes = next(l for l in viewer.layers if "changes" in l.name)
    np.testing.assert_array_equal(changes.data, expected)
    assert "previous model" in ft.summary.text().lower()


# --- 5 ---------------------------------------------------------------------------------------------
def test_5_visible_region_run_replaces_only_that_region(make_napari_viewer, qtbot, wait_for,
                                                        messages, trained_checkpoint):
    from napari_dca._sample_data import nuclei_sample

    image = nuclei_sample()[0][0][:256, :256].copy()
    viewer, state, seg = _segmented(make_napari_viewer, qtbot, wait_for, trained_checkpoint, image)
    full = seg.labels_layer().data.copy()
    assert full.shape == image.shape[:2]
    layer_image = viewer.layers["he"]
    viewer.camera.center = (128, 128)
    viewer.camera.zoom = viewer.camera.zoom * 3
    qtbot.waitUntil(lambda: layer_image.corner_pixels[1, 0] - layer_image.corner_pixels[0, 0] < 200,
                    timeout=5000)
    (y0, x0), (y1, x1) = layer_image.corner_pixels[0, -2:], layer_image.corner_pixels[1, -2:] + 1
    seg.visible_only.setChecked(True)
    seg.run()
    wait_for(seg)
    assert not errors(messages), messages
    result = seg.labels_layer()
    assert result.data.shape == image.shape[:2], "the whole-image result was replaced by the region"
    outside = np.ones(image.shape[:2], bool)
    outside[max(0, y0):y1, max(0, x0):x1] = False
    np.testing.assert_array_equal(result.data[outside], full[outside])


# --- 6 ---------------------------------------------------------------------------------------------
def test_6_device_change_moves_the_current_model_instead_of_reloading_the_list(
        make_napari_viewer, qtbot, wait_for, messages, trained_checkpoint, other_checkpoint):
    from napari_dca._widgets.model import ModelWidget

    viewer = make_napari_viewer()
    mw = ModelWidget(viewer)
    mw.select_checkpoint(str(other_checkpoint))  # the list shows one checkpoint...
    state = _load(viewer, trained_checkpoint)     # ...while another one was dropped on napari
    model = state.model
    mw.device.setCurrentIndex((mw.device.currentIndex() + 1) % mw.device.count())
    wait_for(mw)
    assert state.model is model, "a device change reloaded what the list shows"
    assert state.checkpoint == str(trained_checkpoint)


def _finetuned(make_napari_viewer, qtbot, wait_for, checkpoint, image):
    from napari_dca._widgets.finetune import FinetuneWidget
    from napari_dca._widgets.model import ModelWidget

    viewer, state, seg = _segmented(make_napari_viewer, qtbot, wait_for, checkpoint, image)
    mw = ModelWidget(viewer)
    user = seg.labels_layer()
    paint(viewer, qtbot, user, STROKE, 9)
    ft = FinetuneWidget(viewer)
    ft.image.select("he")
    ft.labels.set_layer(user) if hasattr(ft.labels, "set_layer") else ft.labels.select(user.name)
    ft.steps.setValue(2)
    ft.run()
    wait_for(ft)
    return viewer, state, seg, mw, ft


def test_6_save_updates_the_card_and_summary(make_napari_viewer, qtbot, wait_for, messages,
                                              trained_checkpoint, small_image, tmp_path,
                                              keep_every_round):
    viewer, state, seg, mw, ft = _finetuned(make_napari_viewer, qtbot, wait_for, trained_checkpoint,
                                            small_image)
    assert "not saved" in mw.card.text().lower()
    saved = ft.save(tmp_path / "tuned.safetensors")
    assert saved is not None
    assert "not saved" not in mw.card.text().lower(), "the card still says 'not saved yet'"
    assert "tuned.safetensors" in mw.card.text()
    assert "not saved" not in ft.summary.text().lower()


def test_6_revert_belongs_to_the_model_it_was_made_for(make_napari_viewer, qtbot, wait_for,
                                                        messages, trained_checkpoint,
                                                        other_checkpoint, small_image,
                                                        keep_every_round):
    viewer, state, seg, mw, ft = _finetuned(make_napari_viewer, qtbot, wait_for, trained_checkpoint,
                                            small_image)
    mw.select_checkpoint(str(other_checkpoint))
    mw.load()
    wait_for(mw)
    other = state.model
    assert state.checkpoint == str(other_checkpoint)
    ft.revert_button.click() if ft.revert_button.isEnabled() else ft.revert()
    assert state.model is other, "Revert swapped the old model back over the one just loaded"
    assert state.checkpoint == str(other_checkpoint)


# --- 7 ---------------------------------------------------------------------------------------------
def test_7_labels_of_another_shape_are_refused(make_napari_viewer, qtbot, wait_for, messages,
                                               trained_checkpoint, small_image):
    from napari_dca._widgets.finetune import FinetuneWidget

    viewer = make_napari_viewer()
    viewer.add_image(small_image, name="he")
    state = _load(viewer, trained_checkpoint)
    model = state.model
    wrong = np.zeros((64, 64), np.int32)
    wrong[10:30, 10:30] = 1
    viewer.add_labels(wrong, name="other image's labels")
    ft = FinetuneWidget(viewer)
    ft.image.select("he")
    ft.labels.select("other image's labels")
    ft.steps.setValue(2)
    ft.run()
    wait_for(ft)
    assert errors(messages) and "64 x 64" in errors(messages)[0]
    assert state.model is model, "trained on labels of another shape"


def test_7_the_corrections_picker_never_defaults_to_the_samples_ground_truth(
        make_napari_viewer, qtbot, wait_for, messages, trained_checkpoint):
    from napari_dca.launch import open_viewer

    viewer = make_napari_viewer()
    viewer, widgets = open_viewer(str(trained_checkpoint), "nuclei", "cpu", viewer=viewer)
    wait_for(widgets["Model"])
    chosen = widgets["Fine-tune"].labels.layer()
    assert chosen is None or "ground truth" not in chosen.name


# --- 8 ---------------------------------------------------------------------------------------------
def test_8_threshold_acts_on_the_selected_images_result(make_napari_viewer, qtbot, wait_for,
                                                        messages, trained_checkpoint, small_image):
    viewer, state, seg = _segmented(make_napari_viewer, qtbot, wait_for, trained_checkpoint,
                                    small_image, name="A")
    a_labels = seg.labels_layer()
    before = a_labels.data.copy()
    viewer.add_image(small_image[::-1].copy(), name="B")
    seg.image.select("B")
    _nudge(seg, qtbot, wait_for, values=(0.8,))
    assert np.array_equal(a_labels.data, before), "the slider relabelled another image's result"


def test_8_widgets_follow_a_newly_opened_image(make_napari_viewer, trained_checkpoint, small_image):
    from napari_dca._widgets.attention import AttentionWidget
    from napari_dca._widgets.finetune import FinetuneWidget
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(small_image, name="first")
    widgets = [SegmentWidget(viewer), FinetuneWidget(viewer), AttentionWidget(viewer)]
    viewer.add_image(small_image[::-1].copy(), name="opened later")
    assert [w.image.currentText() for w in widgets] == ["opened later"] * 3


# --- 14 --------------------------------------------------------------------------------------------
def test_14_closing_the_viewer_during_a_job_raises_nothing(make_napari_viewer, qtbot, wait_for,
                                                           trained_checkpoint):
    from napari_dca._sample_data import nuclei_sample
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(nuclei_sample()[0][0], name="he")
    _load(viewer, trained_checkpoint)
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    seg.run()
    worker = seg.jobs.worker
    assert worker is not None
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=60000)
    qtbot.wait(200)  # the returned / finished slots run now; pytest-qt fails on any exception


def test_14_deleting_the_image_during_a_job_drops_its_result(make_napari_viewer, qtbot, wait_for,
                                                              messages, trained_checkpoint):
    from napari_dca._sample_data import nuclei_sample
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(nuclei_sample()[0][0], name="he")
    _load(viewer, trained_checkpoint)
    seg = SegmentWidget(viewer)
    seg.run()
    viewer.layers.remove("he")
    wait_for(seg)
    assert len(viewer.layers) == 0, [layer.name for layer in viewer.layers]


def test_14_renaming_an_image_keeps_its_results(make_napari_viewer, qtbot, wait_for, messages,
                                                trained_checkpoint, small_image):
    viewer, state, seg = _segmented(make_napari_viewer, qtbot, wait_for, trained_checkpoint,
                                    small_image)
    first = seg.labels_layer()
    viewer.layers["he"].name = "he renamed"
    assert seg.image.currentText() == "he renamed"
    _nudge(seg, qtbot, wait_for, values=(0.7,))
    seg.run()
    wait_for(seg)
    labels = [l for l in viewer.layers if l.__class__.__name__ == "Labels"]
    assert labels == [first], "renaming orphaned the result: a second labels layer appeared"


def test_14_settings_are_remembered(make_napari_viewer):
    from napari_dca._widgets.finetune import FinetuneWidget
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    ft, seg = FinetuneWidget(viewer), SegmentWidget(viewer)
    ft.steps.setValue(7)
    ft.lr.setValue(0.002)
    seg.min_size.setValue(12)
    ft2, seg2 = FinetuneWidget(viewer), SegmentWidget(viewer)
    assert ft2.steps.value() == 7 and ft2.lr.value() == pytest.approx(0.002)
    assert seg2.min_size.value() == 12


def test_14_the_last_checkpoint_and_device_are_remembered(make_napari_viewer, wait_for,
                                                          trained_checkpoint):
    from napari_dca._widgets.model import ModelWidget

    viewer = make_napari_viewer()
    mw = ModelWidget(viewer)
    mw.select_checkpoint(str(trained_checkpoint))
    mw.load()
    wait_for(mw)
    again = ModelWidget(viewer)
    assert again.checkpoint.currentData() == str(trained_checkpoint)


def test_a_round_the_engine_rolls_back_changes_nothing(make_napari_viewer, qtbot, wait_for,
                                                        messages, trained_checkpoint, small_image,
                                                        monkeypatch):
    import src_models.finetune as engine

    real = engine.finetune

    def rolled_back(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        out.kept, out.model = False, model
        out.summary = "Kept the previous model: worse on your held-back corrections."
        return out
    monkeypatch.setattr(engine, "finetune", rolled_back)
    viewer, state, seg = _segmented(make_napari_viewer, qtbot, wait_for, trained_checkpoint,
                                    small_image)
    model, layer = state.model, seg.labels_layer()
    before = layer.data.copy()
    from napari_dca._widgets.finetune import FinetuneWidget
    ft = FinetuneWidget(viewer)
    ft.labels.set_layer(layer)
    ft.steps.setValue(2)
    ft.run()
    wait_for(ft)
    assert not errors(messages), messages
    assert state.model is model and state.saved
    assert np.array_equal(layer.data, before)
    assert "Kept the previous model" in ft.summary.text()
    assert not ft.revert_button.isEnabled() and not ft.save_button.isEnabled()
