"""Segment widget: image layer -> model -> probabilities -> instances, as napari layers.

A result belongs to its image layer (`state.results`, by the image's stable id). Threshold and
minimum size re-make the selected image's labels from its cached probabilities (no model run).
Layers get copies of the result's arrays, and once the user has edited a Labels layer no plugin
action writes to it again: relabels and new runs go to the plugin's unedited layer or a new one,
and the summary line says which.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import napari
import numpy as np
from napari.layers import Image
from napari.qt.threading import thread_worker
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QLabel, QPushButton,
                            QSpinBox, QVBoxLayout, QWidget)
from superqt import QLabeledDoubleSlider

from src_models.runtime_onnx import default_runtime

from ._common import (Connections, LayerCombo, UserError, add_layer_keeping_selection, alive, check_channels,
                      check_image, find_owned_layer, find_owned_layers, image_by_key, image_key,
                      is_edited, layer_region, owned_metadata, owner, show_error, track_edits)
from ._jobs import JobPanel
from ._layout import scrolling
from ._state import get_state, remember, remembered

TASKS = ("nuclei", "glands", "semantic")
SEGMENT_KEY = "Alt+S"   # free in napari 0.9 (its menus use Alt+F/V/L/P/W/H)
OVERLAY_KEY = "Alt+O"   # show / hide this plugin's layers of the selected image


@dataclass(eq=False)
class SegmentResult:
    """One image's segmentation: enough for live threshold changes and for the other widgets."""
    source: str                  # the image layer's stable id (`image_key`)
    image_name: str              # its name when the run started (for messages only)
    task: str
    region: tuple[slice, slice]  # rows, cols of the image these arrays cover
    probabilities: np.ndarray    # (h, w) from a 1-output model, (K, h, w) from a K-class one
    maker: object                # src_models.instances.InstanceMaker over `probabilities`
    scale: np.ndarray            # layer scale / translate (last two axes) that align the region
    translate: np.ndarray
    threshold: float = 0.5
    min_size: int = 0
    labels: np.ndarray | None = None
    model_tag: tuple = ()        # ModelState.model_tag() of the weights that made it

    def make_labels(self) -> np.ndarray:
        """Labels for the current threshold / min size from the cached probabilities (no model)."""
        self.labels = self.maker.labels(threshold=self.threshold, min_size=self.min_size)
        return self.labels

    @property
    def foreground(self) -> np.ndarray:
        return self.maker.foreground

    @property
    def n_objects(self) -> int:
        return 0 if self.labels is None else int(np.count_nonzero(np.unique(self.labels)))

    def covers(self, region: tuple[slice, slice]) -> bool:
        (r0, c0), (r1, c1) = self.region, region
        return r0.start <= r1.start and r1.stop <= r0.stop and c0.start <= c1.start and c1.stop <= c0.stop


def merge_region(base: SegmentResult, part: SegmentResult, card) -> SegmentResult:
    """`base` with the region `part` covers replaced by `part` (probabilities and labels); the rest
    of `base` is kept exactly. Objects of `part` get ids above those of `base`."""
    from src_models.instances import InstanceMaker

    ry = slice(part.region[0].start - base.region[0].start, part.region[0].stop - base.region[0].start)
    rx = slice(part.region[1].start - base.region[1].start, part.region[1].stop - base.region[1].start)
    probs = np.array(base.probabilities, copy=True)
    probs[..., ry, rx] = part.probabilities
    labels = np.array(base.labels if base.labels is not None else base.make_labels(), copy=True)
    window = labels[ry, rx]
    window[...] = 0
    new = np.asarray(part.labels)
    shift = 0 if part.task == "semantic" else int(labels.max())  # semantic ids are classes
    window[new > 0] = new[new > 0] + shift
    merged = SegmentResult(base.source, part.image_name, part.task, base.region, probs,
                           InstanceMaker(probs, card, mode=part.task), base.scale, base.translate,
                           threshold=part.threshold, min_size=part.min_size, labels=labels,
                           model_tag=part.model_tag)
    return merged


def put_image_layer(viewer, result: SegmentResult, role: str, data, name: str, **kwargs):
    """Updates the (never user-edited) image layer of `role` for the result's image, or adds it."""
    layer = find_owned_layer(viewer, role, result.source)
    if layer is not None and layer.__class__.__name__ == "Image":
        layer.data = np.array(data, copy=True)
        layer.scale, layer.translate = result.scale, result.translate
        return layer
    return add_layer_keeping_selection(
        viewer, "image", np.array(data, copy=True), name=name, scale=result.scale,
        translate=result.translate, metadata=owned_metadata(role, result.source, task=result.task),
        **kwargs)


def put_labels(viewer, result: SegmentResult, contours: bool = True):
    """Shows the result's labels (a copy) in the plugin's unedited Labels layer of its image, or a
    new one. -> (layer, note): `note` says where they went when the user's edited layer was kept."""
    labels = result.labels if result.labels is not None else result.make_labels()
    edited, target = [], None
    for layer in find_owned_layers(viewer, "instances", result.source):
        if is_edited(layer):
            owner(layer)["role"] = "corrections"  # the user's work from now on: never rewritten
            edited.append(layer)
        else:
            target = layer
    edited += find_owned_layers(viewer, "corrections", result.source)
    if target is not None:
        target.data = np.array(labels, copy=True)  # the layer's own array: never the result's
        target.scale, target.translate = result.scale, result.translate
    else:
        base = f"{result.image_name} {result.task}"
        name = f"{base} (new run)" if edited else base
        target = viewer.add_labels(np.array(labels, copy=True), name=name, scale=result.scale,
                                   translate=result.translate, opacity=0.7,
                                   metadata=owned_metadata("instances", result.source, task=result.task))
        if contours:
            target.contour = 1
        track_edits(target)
    note = ""
    if edited:
        kept = ", ".join(f"'{layer.name}'" for layer in edited)
        note = f"Your edited {kept} is kept as it is; this result is in '{target.name}'."
    return target, note


def show_result(viewer, result: SegmentResult, probabilities: bool = False, contours: bool = True):
    """Makes `result` its image's result and puts it on the canvas. -> (labels layer, note)."""
    get_state(viewer).results.set(result.source, result)
    if probabilities:
        put_image_layer(viewer, result, "probabilities", result.foreground,
                        name=f"{result.image_name} probability", colormap="magma",
                        blending="additive", contrast_limits=(0.0, 1.0), opacity=0.5)
    return put_labels(viewer, result, contours)


def region_placement(layer, region) -> tuple[np.ndarray, np.ndarray]:
    """Scale and translate (last two axes) that put an array of `region` over `layer`'s pixels."""
    scale = np.asarray(layer.scale)[-2:]
    offset = np.array([region[0].start or 0, region[1].start or 0], dtype=float)
    return scale, np.asarray(layer.translate)[-2:] + offset * scale


def describe(r: SegmentResult) -> str:
    what = "classes" if r.task == "semantic" else "objects"
    h, w = r.probabilities.shape[-2:]
    return (f"{r.n_objects} {what} in {h} x {w} px of '{r.image_name}' at threshold "
            f"{r.threshold:.2f}, min size {r.min_size} px")


class SegmentWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)

        self.image = LayerCombo(viewer, (Image,), follow_new=True)
        self.image.setToolTip("The image to segment; threshold and min size act on its result")
        self.task = QComboBox()
        self.task.addItems(TASKS)
        self.task.setToolTip("Task of the next run (a result keeps the task it was made with)")
        self.threshold = QLabeledDoubleSlider()
        self.threshold.setOrientation(1)  # horizontal
        self.threshold.setRange(0.01, 0.99)
        self.threshold.setValue(remembered("segment/threshold", 0.5))
        self.threshold.setToolTip("Foreground probability cut-off; re-makes the selected image's "
                                  "labels live (no model run)")
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 100000)
        self.min_size.setValue(remembered("segment/min_size", 30))
        self.min_size.setSuffix(" px")
        self.min_size.setToolTip("Objects smaller than this are dropped; changes the labels live")
        self.contours = QCheckBox("Outlines only")
        self.contours.setToolTip("Draw objects as outlines so the tissue stays visible")
        self.contours.setChecked(remembered("segment/contours", True))
        self.runtime = QComboBox()  # what runs the model (src_models/runtime_onnx.py)
        self.runtime.addItem("auto (fast exported graph on the CPU)", "auto")
        self.runtime.addItem("torch (PyTorch)", "torch")
        self.runtime.addItem("onnx (exported graph, ONNX Runtime)", "onnx")
        self.runtime.setCurrentIndex(max(0, self.runtime.findData(default_runtime())))
        self.runtime.setToolTip("On a CPU the exported graph runs about twice as fast as PyTorch, "
                                "with the same results. The first run of a model (or of new "
                                "weights) exports it once into your cache folder (~20-60 s).")
        self.show_probabilities = QCheckBox("Probability layer")
        self.show_probabilities.setToolTip("Also add the foreground probability as an image layer")
        self.show_probabilities.setChecked(remembered("segment/probabilities", False))
        self.visible_only = QCheckBox("Visible region only")
        self.visible_only.setToolTip("For big images: segments what the canvas shows; an earlier "
                                     "result of the whole image is kept outside that region")
        self.run_button = QPushButton("Segment")
        self.run_button.setToolTip(f"Segment the chosen image with the current model ({SEGMENT_KEY})")
        self.jobs = JobPanel(state=self.state, unit="tile")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image)
        form.addRow("Task", self.task)
        form.addRow("Threshold", self.threshold)
        form.addRow("Min size", self.min_size)
        form.addRow("Runtime", self.runtime)
        inner = QVBoxLayout()
        inner.addLayout(form)
        inner.addWidget(self.contours)
        inner.addWidget(self.show_probabilities)
        inner.addWidget(self.visible_only)
        inner.addWidget(self.run_button)
        inner.addWidget(self.jobs)
        inner.addWidget(self.summary)
        inner.addStretch(1)
        scrolling(self, inner)

        self._relabel_worker = None
        self._relabel_again = False
        self._relabel_timer = QTimer(self)
        self._relabel_timer.setSingleShot(True)
        self._relabel_timer.setInterval(40)  # coalesce slider drags
        self._relabel_timer.timeout.connect(self.relabel)
        self.threshold.valueChanged.connect(self._on_params)
        self.min_size.valueChanged.connect(self._on_params)
        self.contours.toggled.connect(lambda on: remember("segment/contours", on))
        self.show_probabilities.toggled.connect(lambda on: remember("segment/probabilities", on))
        self.run_button.clicked.connect(self.run)
        self.image.currentIndexChanged.connect(self._sync_controls)
        self._connections = Connections([(self.state.events.model, self._on_model),
                                         (self.state.events.jobs, self._on_busy),
                                         (self.state.results.changed, self._on_results)])
        self.destroyed.connect(self._connections.disconnect)
        self._on_model()
        self._on_busy()
        self._add_shortcuts()

    def _add_shortcuts(self) -> None:
        """Segment and overlay toggling from the keyboard, anywhere in the viewer's window."""
        from qtpy.QtCore import Qt
        from qtpy.QtGui import QKeySequence
        from qtpy.QtWidgets import QShortcut

        viewer = getattr(self.viewer, "__wrapped__", self.viewer)  # napari hands plugins a proxy
        window = getattr(getattr(viewer, "window", None), "_qt_window", None)
        if window is None:
            return
        self.shortcuts = []
        for key, slot in ((SEGMENT_KEY, self._segment_key), (OVERLAY_KEY, self.toggle_overlays)):
            shortcut = QShortcut(QKeySequence(key), window)
            shortcut.setContext(Qt.WindowShortcut)
            shortcut.activated.connect(slot)
            self.shortcuts.append(shortcut)
        # With the canvas focused, napari takes the keys itself (its keymap): bind them there too.
        me = weakref.ref(self)

        def bound(method):
            def press(viewer):  # napari passes the viewer by this name
                widget = me()
                if widget is not None and alive(widget):
                    getattr(widget, method)()
            return press
        self._keys = {}
        for key, method in ((SEGMENT_KEY, "_segment_key"), (OVERLAY_KEY, "toggle_overlays")):
            napari_key = key.replace("+", "-")
            try:
                viewer.bind_key(napari_key, bound(method), overwrite=True)
                self._keys[napari_key] = viewer
            except Exception:  # an older / newer keymap API: the Qt shortcut still works
                pass
        self.destroyed.connect(lambda *_: self._unbind_keys())

    def _unbind_keys(self) -> None:
        for shortcut in getattr(self, "shortcuts", []):
            if alive(shortcut):
                shortcut.setEnabled(False)
        for key, viewer in getattr(self, "_keys", {}).items():
            try:
                viewer.bind_key(key, None, overwrite=True)
            except Exception:
                pass

    def _segment_key(self) -> None:
        if alive(self) and self.run_button.isEnabled():
            self.run()

    def toggle_overlays(self) -> None:
        """Shows / hides the plugin's result layers of the selected image (labels, probability)."""
        layer = self.image.layer() if alive(self) else None
        if layer is None:
            return
        key = image_key(layer)
        mine = [l for l in self.viewer.layers if owner(l).get("source") == key
                and owner(l).get("role") in ("instances", "probabilities", "changes")]
        if mine:
            visible = not any(l.visible for l in mine)
            for l in mine:
                l.visible = visible

    # --- what the controls show ------------------------------------------------------------------
    def selected_result(self) -> SegmentResult | None:
        layer = self.image.layer()
        return None if layer is None else self.state.results.get(image_key(layer))

    @property
    def result(self) -> SegmentResult | None:
        """The selected image's result (None when it has none)."""
        return self.selected_result()

    def _set_controls(self, threshold: float, min_size: int, task: str | None) -> None:
        for w in (self.threshold, self.min_size, self.task):
            w.blockSignals(True)
        self.threshold.setValue(float(threshold))
        self.min_size.setValue(int(min_size))
        if task in TASKS:
            self.task.setCurrentText(task)
        for w in (self.threshold, self.min_size, self.task):
            w.blockSignals(False)

    def _sync_controls(self, *_):
        """Threshold / min size / task show the selected image's result; without one, the current
        model's suggestions. Never relabels anything."""
        if not alive(self):
            return
        r = self.selected_result()
        if r is not None:
            self._set_controls(r.threshold, r.min_size, r.task)
            self.summary.setText(describe(r))
        else:
            self._model_defaults()
            self.summary.setText("")

    def _model_defaults(self):
        card = self.state.card
        if card is None:
            return
        params = card.instance_params or {}
        self._set_controls(params.get("threshold", self.threshold.value()),
                           params.get("min_size", self.min_size.value()), card.task)

    def _on_model(self, *_):
        """A new current model: its suggested settings apply to images without a result; existing
        results keep their labels, threshold and task."""
        if alive(self) and self.selected_result() is None:
            self._model_defaults()

    def _on_results(self, key: str):
        layer = self.image.layer()
        if alive(self) and layer is not None and image_key(layer) == key:
            self._sync_controls()

    def _on_busy(self, *_):
        if alive(self):
            self.run_button.setEnabled(not self.jobs.busy)

    def _on_params(self, *_):
        remember("segment/threshold", self.threshold.value())
        remember("segment/min_size", self.min_size.value())
        self._relabel_timer.start()

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
        tag = self.state.model_tag()
        task = self.task.currentText()
        source, name = image_key(layer), layer.name
        scale, translate = region_placement(layer, region)

        box = (region[0].start, region[0].stop, region[1].start, region[1].stop) if visible else None
        threshold, min_size = self.threshold.value(), self.min_size.value()
        runtime = self.runtime.currentData()
        if runtime == "onnx" and str(device) != "cpu":
            show_error(f"The onnx runtime runs on the CPU; the model is on {device}. "
                       "Choose auto or torch, or the CPU in the Model widget.")
            return

        def job(report, cancel):
            from src_models.inference import predict
            from src_models.instances import InstanceMaker

            probs = predict(model, data, card, device=device, region=box, progress=report,
                            cancel=cancel, runtime=runtime)
            report(0, 0, stage="post-processing (finding objects)…")
            result = SegmentResult(source, name, task, region, probs,
                                   InstanceMaker(probs, card, mode=task), scale, translate,
                                   threshold=threshold, min_size=min_size, model_tag=tag)
            result.make_labels()  # the first labels here, off the GUI thread (watershed can be slow)
            _ = result.foreground
            return result

        self._run_card = card
        self.jobs.run(job, self._show, "segmentation",
                      hint="Check that the image is an H&E RGB (or grayscale) image the model fits.")

    def _show(self, result: SegmentResult) -> None:
        image = image_by_key(self.viewer, result.source)
        if image is None:  # the image was closed while the job ran: nothing to show it on
            self.summary.setText(f"'{result.image_name}' was closed; its segmentation was dropped.")
            return
        result.image_name = image.name
        old = self.state.results.get(result.source)
        full = result.region == (slice(0, image.data.shape[0]), slice(0, image.data.shape[1])) \
            if not getattr(image, "multiscale", False) else False
        note = ""
        if not full and old is not None and old.covers(result.region) and old.task == result.task:
            result = merge_region(old, result, self._run_card)
            note = "Only the visible region was replaced; the rest of the result is unchanged. "
        layer, where = show_result(self.viewer, result, self.show_probabilities.isChecked(),
                                   self.contours.isChecked())
        self.summary.setText(f"{describe(result)}. {note}{where}".strip())

    def relabel(self) -> None:
        """New labels for the selected image from its cached probabilities; no model run.

        Derived in a background thread (a nuclei watershed takes ~0.1 s per megapixel); while one
        is running, only the latest slider position waits."""
        r = self.selected_result()
        if r is None:
            return
        if self._relabel_worker is not None:
            self._relabel_again = True
            return
        threshold, min_size = self.threshold.value(), self.min_size.value()
        if (threshold, min_size) == (r.threshold, r.min_size) and r.labels is not None:
            return

        @thread_worker
        def work():
            try:
                return r.maker.labels(threshold=threshold, min_size=min_size)
            except Exception as err:  # shown as a message, never a traceback
                return err

        def done(labels):
            if not alive(self):
                return
            if isinstance(labels, Exception):
                show_error(f"Could not make labels: {labels}.")
                return
            if self.state.results.get(r.source) is not r or image_by_key(self.viewer, r.source) is None:
                return  # a newer segmentation replaced it meanwhile, or the image was closed
            r.threshold, r.min_size, r.labels = threshold, min_size, labels
            layer, where = put_labels(self.viewer, r, self.contours.isChecked())
            self.summary.setText(f"{describe(r)}. {where}".strip())

        def finished():
            self._relabel_worker = None
            if self._relabel_again and alive(self):
                self._relabel_again = False
                self.relabel()

        self._relabel_worker = work()
        self._relabel_worker.returned.connect(done)
        self._relabel_worker.finished.connect(finished)
        self._relabel_worker.start()

    @property
    def busy(self) -> bool:
        return self.jobs.busy or self._relabel_worker is not None

    def labels_layer(self):
        """The plugin's (unedited) labels layer of the selected image's result."""
        r = self.selected_result()
        if r is None:
            return None
        layers = [layer for layer in find_owned_layers(self.viewer, "instances", r.source)
                  if not is_edited(layer)]
        return layers[-1] if layers else None
