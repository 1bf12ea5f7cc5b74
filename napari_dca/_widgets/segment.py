"""Segment widget: image layer -> model -> probabilities -> instances, as napari layers.

Threshold and minimum size re-make the labels from cached probabilities (no model run)."""
from __future__ import annotations

from dataclasses import dataclass

import napari
import numpy as np
from napari.layers import Image
from napari.qt.threading import thread_worker
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QLabel, QPushButton,
                            QSpinBox, QVBoxLayout, QWidget)
from superqt import QLabeledDoubleSlider

from ._common import (LayerCombo, UserError, check_channels, check_image, find_owned_layer,
                      layer_region, owned_metadata, show_error)
from ._jobs import JobPanel
from ._state import get_state

TASKS = ("nuclei", "glands", "semantic")


@dataclass(eq=False)
class SegmentResult:
    """What one run leaves behind for live threshold changes and for the other widgets."""
    source: str                  # image layer name
    task: str
    region: tuple[slice, slice]  # rows, cols of the image that were segmented
    probabilities: np.ndarray    # (h, w) from a 1-output model, (K, h, w) from a K-class one
    maker: object                # src_models.instances.InstanceMaker over `probabilities`
    scale: np.ndarray            # layer scale / translate (last two axes) that align the region
    translate: np.ndarray
    threshold: float = 0.5
    min_size: int = 0
    labels: np.ndarray | None = None

    def make_labels(self) -> np.ndarray:
        """Labels for the current threshold / min size from the cached probabilities (no model)."""
        self.labels = self.maker.labels(threshold=self.threshold, min_size=self.min_size)
        return self.labels

    @property
    def foreground(self) -> np.ndarray:
        return self.maker.foreground


def put_layer(viewer, result: SegmentResult, role: str, data, kind: str, name: str, **kwargs):
    """Updates the layer this plugin made for (`role`, image) in place, or adds it."""
    layer = find_owned_layer(viewer, role, result.source)
    if layer is not None and layer.__class__.__name__.lower() == kind:
        layer.data = data
        layer.scale, layer.translate = result.scale, result.translate
        return layer
    if layer is not None:
        viewer.layers.remove(layer)
    add = getattr(viewer, f"add_{kind}")
    return add(data, name=name, scale=result.scale, translate=result.translate,
               metadata=owned_metadata(role, result.source, task=result.task), **kwargs)


def show_result(viewer, result: SegmentResult, probabilities: bool = True):
    """Puts a segmentation on the canvas (labels, and optionally foreground probability) and makes
    it the viewer's current result. Returns the labels layer."""
    get_state(viewer).result = result
    if probabilities:
        put_layer(viewer, result, "probabilities", result.foreground, "image", name=f"{result.source} probability",
                  colormap="magma", blending="additive", contrast_limits=(0.0, 1.0), opacity=0.6)
    labels = result.labels if result.labels is not None else result.make_labels()
    return put_layer(viewer, result, "instances", labels, "labels",
                     name=f"{result.source} {result.task}", opacity=0.5)


def region_placement(layer, region) -> tuple[np.ndarray, np.ndarray]:
    """Scale and translate (last two axes) that put an array of `region` over `layer`'s pixels."""
    scale = np.asarray(layer.scale)[-2:]
    offset = np.array([region[0].start or 0, region[1].start or 0], dtype=float)
    return scale, np.asarray(layer.translate)[-2:] + offset * scale


class SegmentWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)

        self.image = LayerCombo(viewer, (Image,))
        self.task = QComboBox()
        self.task.addItems(TASKS)
        self.threshold = QLabeledDoubleSlider()
        self.threshold.setOrientation(1)  # horizontal
        self.threshold.setRange(0.01, 0.99)
        self.threshold.setValue(0.5)
        self.threshold.setToolTip("Foreground probability cut-off; changes the labels live")
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 100000)
        self.min_size.setValue(30)
        self.min_size.setSuffix(" px")
        self.min_size.setToolTip("Objects smaller than this are dropped; changes the labels live")
        self.show_probabilities = QCheckBox("Add a probability layer")
        self.show_probabilities.setChecked(True)
        self.visible_only = QCheckBox("Visible region only (for big images)")
        self.run_button = QPushButton("Segment")
        self.jobs = JobPanel()
        self.summary = QLabel("")
        self.summary.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image)
        form.addRow("Task", self.task)
        form.addRow("Threshold", self.threshold)
        form.addRow("Min size", self.min_size)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.show_probabilities)
        layout.addWidget(self.visible_only)
        layout.addWidget(self.run_button)
        layout.addWidget(self.jobs)
        layout.addWidget(self.summary)
        layout.addStretch(1)

        self._relabel_worker = None
        self._relabel_again = False
        self._relabel_timer = QTimer(self)
        self._relabel_timer.setSingleShot(True)
        self._relabel_timer.setInterval(40)  # coalesce slider drags
        self._relabel_timer.timeout.connect(self.relabel)
        self.threshold.valueChanged.connect(lambda *_: self._relabel_timer.start())
        self.min_size.valueChanged.connect(lambda *_: self._relabel_timer.start())
        self.run_button.clicked.connect(self.run)
        self.state.events.model.connect(self._on_model)
        self._on_model()

    def _on_model(self, *_):
        card = self.state.card
        if card is None:
            return
        if card.task in TASKS:
            self.task.setCurrentText(card.task)
        params = card.instance_params or {}
        if "threshold" in params:
            self.threshold.setValue(float(params["threshold"]))
        if "min_size" in params:
            self.min_size.setValue(int(params["min_size"]))

    # --- running the model -----------------------------------------------------------------------
    def run(self) -> None:
        """Segments the chosen image (or its visible part) in a worker; updates layers on return."""
        try:
            layer = self.image.layer()
            data = check_image(layer)
            if self.state.model is None:
                raise UserError("No model: choose one in the Model widget (Plugins > DCA segmentation "
                                "> Model) and press 'Load model'.")
            check_channels(layer, data, self.state.model, self.state.card)
        except UserError as err:
            show_error(str(err))
            return
        shape = data.shape[:2]
        visible = self.visible_only.isChecked()
        region = layer_region(layer, shape) if visible else (slice(0, shape[0]), slice(0, shape[1]))
        model, card, device = self.state.model, self.state.card, self.state.device
        task = self.task.currentText()
        source = layer.name
        scale, translate = region_placement(layer, region)

        box = (region[0].start, region[0].stop, region[1].start, region[1].stop) if visible else None
        threshold, min_size = self.threshold.value(), self.min_size.value()

        def job(report, cancel):
            from src_models.inference import predict
            from src_models.instances import InstanceMaker

            probs = predict(model, data, card, device=device, region=box, progress=report,
                            cancel=cancel)
            result = SegmentResult(source, task, region, probs, InstanceMaker(probs, card, mode=task),
                                   scale, translate, threshold=threshold, min_size=min_size)
            result.make_labels()  # the first labels here, off the GUI thread (watershed can be slow)
            _ = result.foreground
            return result

        self.jobs.run(job, self._show, "segmentation",
                      hint="Check that the image is an H&E RGB (or grayscale) image the model fits.")

    def _show(self, result: SegmentResult) -> None:
        if (result.threshold, result.min_size) != (self.threshold.value(), self.min_size.value()):
            result.threshold, result.min_size = self.threshold.value(), self.min_size.value()
            result.labels = None  # moved while it ran: re-derive
        show_result(self.viewer, result, self.show_probabilities.isChecked())
        self._summarise(result)

    @property
    def result(self) -> SegmentResult | None:
        return self.state.result

    def relabel(self) -> None:
        """New labels from the cached probabilities (threshold, min size); no model run.

        Derived in a background thread (a nuclei watershed takes ~0.1 s per megapixel); while one
        is running, only the latest slider position waits."""
        r = self.state.result
        if r is None:
            return
        if self._relabel_worker is not None:
            self._relabel_again = True
            return
        threshold, min_size = self.threshold.value(), self.min_size.value()

        @thread_worker
        def work():
            try:
                return r.maker.labels(threshold=threshold, min_size=min_size)
            except Exception as err:  # shown as a message, never a traceback
                return err

        def done(labels):
            if isinstance(labels, Exception):
                show_error(f"Could not make labels: {labels}.")
                return
            if self.state.result is not r:
                return  # a newer segmentation replaced it meanwhile
            r.threshold, r.min_size, r.labels = threshold, min_size, labels
            put_layer(self.viewer, r, "instances", labels, "labels", name=f"{r.source} {r.task}",
                      opacity=0.5)
            self._summarise(r)

        def finished():
            self._relabel_worker = None
            if self._relabel_again:
                self._relabel_again = False
                self.relabel()

        self._relabel_worker = work()
        self._relabel_worker.returned.connect(done)
        self._relabel_worker.finished.connect(finished)
        self._relabel_worker.start()

    @property
    def busy(self) -> bool:
        return self.jobs.busy or self._relabel_worker is not None

    def _summarise(self, r: SegmentResult) -> None:
        n = int(np.count_nonzero(np.unique(r.labels)))
        what = "classes" if r.task == "semantic" else "objects"
        h, w = r.probabilities.shape[-2:]
        self.summary.setText(f"{n} {what} in {h} x {w} px of '{r.source}' at threshold "
                             f"{r.threshold:.2f}, min size {r.min_size} px")

    def labels_layer(self):
        r = self.state.result
        return None if r is None else find_owned_layer(self.viewer, "instances", r.source)
