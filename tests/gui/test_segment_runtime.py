"""The Segment widget's Runtime control reaches `predict` (onnx's own tests are in test_runtime_onnx)."""
import numpy as np


def test_runtime_control_defaults_to_the_environment_and_is_passed_to_predict(
        make_napari_viewer, tiny_checkpoint, small_image, wait_for, monkeypatch):
    import src_models.inference as inference
    from napari_dca._widgets._state import get_state, load_model_into
    from napari_dca._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(small_image, name="he")
    load_model_into(get_state(viewer), tiny_checkpoint)
    widget = SegmentWidget(viewer)
    assert widget.runtime.currentData() == "torch"  # tests/conftest.py sets NAPARI_DCA_RUNTIME
    seen = []

    def fake_predict(model, data, card, **kwargs):
        seen.append(kwargs.get("runtime"))
        return np.zeros(data.shape[:2], np.float32)

    monkeypatch.setattr(inference, "predict", fake_predict)
    widget.runtime.setCurrentIndex(widget.runtime.findData("onnx"))
    widget.run()
    wait_for(widget)
    assert seen == ["onnx"]
