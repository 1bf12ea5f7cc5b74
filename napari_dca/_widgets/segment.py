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
from pathlib import Path

import napari
import numpy as np
from napari.layers import Image, Shapes
from napari.qt.threading import thread_worker
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QLabel, QPushButton,
                            QSpinBox, QVBoxLayout, QWidget)
from superqt import QLabeledDoubleSlider

from src_models.runtime_onnx import default_runtime, openvino_available

from ._common import (Connections, LayerCombo, UserError, add_layer_keeping_selection, alive, check_channels,
                      check_plane_image, current_plane, find_owned_layer, find_owned_layers,
                      image_by_key, image_key, is_edited, layer_region, new_labels_layer,
                      one_refresh, owned_metadata, owner, shapes_region, show_error, track_edits,
                      unedited_owned_layer, warm_up)
from ._gc_freeze import freeze_long_lived
from ._jobs import JobPanel
from ._layout import scrolling
from ._state import get_state, remember, remembered

TASKS = ("nuclei", "glands", "semantic")
SEGMENT_KEY = "Alt+D"   # free in napari 0.9 (Alt+S is its File > Save Screenshot; tests/gui/test_layout.py)
OVERLAY_KEY = "Alt+O"   # show / hide this plugin's layers of the selected image
MAX_SLIDE_REGION = 4096 * 4096  # pixels of a slide segmented at once in the viewer (~1 min on a CPU)


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
    plane: tuple = ()            # leading indices of the plane of a stack image; () for 2D
    stack_shape: tuple = ()      # (..., Y, X) of the stack's labels; () for a 2D image
    image_shape: tuple = ()      # (Y, X) of the (plane of the) image; level 0 of a slide
    _count: int | None = None    # objects in `labels`, counted where the labels were made

    def make_labels(self) -> np.ndarray:
        """Labels for the current threshold / min size from the cached probabilities (no model).
        Call it in a worker: a watershed of a big image takes seconds."""
        self.set_labels(self.maker.labels(threshold=self.threshold, min_size=self.min_size))
        return self.labels

    def set_labels(self, labels: np.ndarray, count: int | None = None) -> None:
        """New labels (and their object count, counted now unless given: np.unique of a big
        image is slow, so workers count and the GUI thread only reads)."""
        self.labels = labels
        self._count = count_objects(labels) if count is None else int(count)

    @property
    def foreground(self) -> np.ndarray:
        return self.maker.foreground

    @property
    def n_objects(self) -> int:
        if self.labels is None:
            return 0
        if self._count is None:
            self._count = count_objects(self.labels)
        return self._count

    @property
    def full(self) -> bool:
        """Whether the result covers its whole image (plane)."""
        return bool(self.image_shape) and self.region == (slice(0, self.image_shape[0]),
                                                          slice(0, self.image_shape[1]))

    def covers(self, region: tuple[slice, slice]) -> bool:
        (r0, c0), (r1, c1) = self.region, region
        return r0.start <= r1.start and r1.stop <= r0.stop and c0.start <= c1.start and c1.stop <= c0.stop


def count_objects(labels: np.ndarray) -> int:
    """Distinct non-zero ids (a bincount when the ids are small, which is much faster than
    np.unique on a big image)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0
    top = int(labels.max())
    if 0 <= int(labels.min()) and top < 4 * labels.size + 1024:
        return int(np.count_nonzero(np.bincount(labels.ravel(), minlength=1)[1:]))
    return int(np.count_nonzero(np.unique(labels)))


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
                           threshold=part.threshold, min_size=part.min_size,
                           model_tag=part.model_tag, plane=base.plane, stack_shape=base.stack_shape,
                           image_shape=base.image_shape)
    merged.set_labels(labels)
    return merged


def put_image_layer(viewer, result: SegmentResult, role: str, data, name: str, **kwargs):
    """Updates the (never user-edited) image layer of `role` for the result's image, or adds it."""
    layer = find_owned_layer(viewer, role, result.source)
    if layer is not None and layer.__class__.__name__ == "Image":
        with one_refresh(layer):
            layer.data = np.array(data, copy=True)
            place(layer, result.scale, result.translate)
        layer.refresh()
        return layer
    return add_layer_keeping_selection(
        viewer, "image", np.array(data, copy=True), name=name, scale=result.scale,
        translate=result.translate, metadata=owned_metadata(role, result.source, task=result.task),
        **kwargs)


# A stack's labels layer holds every plane segmented so far. Up to this size it is a numpy array
# (zero pages cost no memory until a plane is written); beyond it, an in-memory zarr array whose
# untouched planes are never allocated.
STACK_NUMPY_BYTES = 1 << 30


def plane_stack(shape: tuple) -> object:
    """An all-zero int32 labels array of a stack's shape, allocated plane by plane if big."""
    if int(np.prod(shape, dtype=np.int64)) * 4 <= STACK_NUMPY_BYTES:
        return np.zeros(shape, np.int32)
    import zarr
    chunks = (1,) * (len(shape) - 2) + tuple(min(n, 4096) for n in shape[-2:])
    return zarr.zeros(shape, chunks=chunks, dtype=np.int32)


def place(layer, scale, translate) -> None:
    """Sets the layer's scale / translate only where they change (each set re-slices it)."""
    if not np.allclose(np.asarray(layer.scale)[-2:], scale):
        layer.scale = scale
    if not np.allclose(np.asarray(layer.translate)[-2:], translate):
        layer.translate = translate


def put_labels(viewer, result: SegmentResult, contours: bool = True):
    """Shows the result's labels (a copy) in the plugin's unedited Labels layer of its image, or a
    new one. -> (layer, note): `note` says where they went when the user's edited layer was kept.
    A plane of a stack goes into that plane of a labels layer of the stack's shape."""
    labels = result.labels if result.labels is not None else result.make_labels()
    edited, target = [], None
    for layer in find_owned_layers(viewer, "instances", result.source):
        if is_edited(layer):
            owner(layer)["role"] = "corrections"  # the user's work from now on: never rewritten
            edited.append(layer)
        elif not result.stack_shape or tuple(layer.data.shape) == tuple(result.stack_shape):
            target = layer
    edited += find_owned_layers(viewer, "corrections", result.source)
    if result.stack_shape:
        target = _put_plane(viewer, target, result, labels, bool(edited), contours)
    elif target is not None:
        with one_refresh(target):
            target.data = np.array(labels, copy=True)  # the layer's own array: never the result's
            place(target, result.scale, result.translate)
        target.refresh()
    else:
        base = f"{result.image_name} {result.task}"
        name = f"{base} (new run)" if edited else base
        # next to the user's corrected layer, which stays the active one: their brush goes on there
        target = new_labels_layer(viewer, np.array(labels, copy=True), contours, select=not edited,
                                  name=name, scale=result.scale, translate=result.translate, opacity=0.7,
                                  metadata=owned_metadata("instances", result.source, task=result.task))
        track_edits(target)
    note = ""
    if edited:
        kept = ", ".join(f"'{layer.name}'" for layer in edited)
        note = f"Your edited {kept} is kept as it is; this result is in '{target.name}'."
    return target, note


def _put_plane(viewer, target, result: SegmentResult, labels, edited: bool, contours: bool):
    """Writes a stack plane's labels into `target` (the plugin's unedited stack layer) or a new
    stack-shaped layer placed like the image."""
    image = image_by_key(viewer, result.source)
    if target is None:
        base = f"{result.image_name} {result.task}"
        kwargs = {}
        if image is not None:
            nd = len(result.stack_shape)
            kwargs = {"scale": np.asarray(image.scale)[-nd:], "translate": np.asarray(image.translate)[-nd:]}
        target = new_labels_layer(viewer, plane_stack(result.stack_shape), contours, select=not edited,
                                  name=f"{base} (new run)" if edited else base, opacity=0.7,
                                  metadata=owned_metadata("instances", result.source, task=result.task),
                                  **kwargs)
        track_edits(target)
    rows, cols = result.region
    target.data[result.plane + (rows, cols)] = labels  # the layer's array: a copy of the result's
    target.refresh()
    return target


def show_result(viewer, result: SegmentResult, probabilities: bool = False, contours: bool = True):
    """Makes `result` its image's result and puts it on the canvas. -> (labels layer, note)."""
    get_state(viewer).results.set(result.source, result)
    if probabilities and not result.stack_shape:
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
    where = f" (plane {', '.join(map(str, r.plane))})" if r.plane else ""
    if not r.full and r.image_shape:
        where += f" at y {r.region[0].start}-{r.region[0].stop}, x {r.region[1].start}-{r.region[1].stop}"
    return (f"{r.n_objects} {what} in {h} x {w} px of '{r.image_name}'{where} at threshold "
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
        if openvino_available():   # an optional extra
            self.runtime.addItem("openvino (exported graph, OpenVINO)", "openvino")
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
        self.draw_region = LayerCombo(viewer, (Shapes,), none_text="none")
        self.draw_region.setToolTip("A Shapes layer with a rectangle drawn around the part to "
                                    "segment (e.g. of a whole slide); none: the visible region "
                                    "(if ticked, or on a slide) or the whole image")
        self.run_button = QPushButton("Segment")
        self.run_button.setToolTip(f"Segment the chosen image with the current model ({SEGMENT_KEY}). "
                                   f"A stack: the plane on screen. A whole slide: what the canvas "
                                   f"shows, at full resolution (or the drawn region)")
        self.export_button = QPushButton("Export GeoJSON…")
        self.export_button.setToolTip("Save the current labels (the selected Labels layer, or this "
                                      "image's newest) as QuPath GeoJSON in level-0 pixels")
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
        region_form = QFormLayout()
        region_form.addRow("Drawn region", self.draw_region)
        inner.addLayout(region_form)
        inner.addWidget(self.run_button)
        inner.addWidget(self.jobs)
        inner.addWidget(self.summary)
        inner.addWidget(self.export_button)
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
        self.export_button.clicked.connect(lambda: self.export_geojson())
        self.image.currentIndexChanged.connect(self._sync_controls)
        self._connections = Connections([(self.state.events.model, self._on_model),
                                         (self.state.events.jobs, self._on_busy),
                                         (self.state.results.changed, self._on_results)])
        self.destroyed.connect(self._connections.disconnect)
        self._on_model()
        self._on_busy()
        self._add_shortcuts()
        warm_up()
        freeze_long_lived(viewer, self)  # short full garbage collections (_gc_freeze.py)

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
            self.export_button.setEnabled(not self.jobs.busy)

    def _on_params(self, *_):
        remember("segment/threshold", self.threshold.value())
        remember("segment/min_size", self.min_size.value())
        self._relabel_timer.start()

    # --- running the model -----------------------------------------------------------------------
    def _run_region(self, layer, shape) -> tuple[tuple[slice, slice], str]:
        """The region of the (plane of the) image this run segments, and a note on why: a drawn
        Shapes region, the visible region, or the whole image. A multiscale slide is never
        segmented whole: its visible region at full resolution, at most MAX_SLIDE_REGION px."""
        slide = bool(getattr(layer, "multiscale", False))
        drawn = self.draw_region.layer()
        if drawn is not None:
            region, note = shapes_region(layer, drawn, shape), f"the region drawn in '{drawn.name}'"
        elif self.visible_only.isChecked() or slide:
            region = layer_region(layer, shape, self.viewer)
            note = "the visible region at full resolution" if slide else "the visible region"
        else:
            return (slice(0, shape[0]), slice(0, shape[1])), ""
        h, w = region[0].stop - region[0].start, region[1].stop - region[1].start
        if slide and h * w > MAX_SLIDE_REGION:
            side = int(MAX_SLIDE_REGION ** 0.5)
            raise UserError(f"'{layer.name}' is a whole slide: Segment works on what the canvas "
                            f"shows at full resolution, and that is {h} x {w} px now (at most "
                            f"{side} x {side} at once). Zoom in, or draw a rectangle in a Shapes layer "
                            f"and pick it under 'Drawn region'. For the whole slide use "
                            f"'napari-dca segment' on the command line.")
        return region, note

    def run(self) -> None:
        """Segments the chosen image (the plane on screen of a stack; a region of a slide) in a
        worker; updates layers on return."""
        try:
            layer = self.image.layer()
            data, plane, stack_shape = check_plane_image(self.viewer, layer)
            if self.state.model is None:
                raise UserError("No model: choose one in the Model widget (Plugins > DCA segmentation "
                                "> Model) and press 'Load model'.")
            check_channels(layer, data, self.state.model, self.state.card)
            shape = tuple(int(n) for n in data.shape[:2])
            region, where = self._run_region(layer, shape)
        except UserError as err:
            show_error(str(err))
            return
        full = region == (slice(0, shape[0]), slice(0, shape[1]))
        model, card, device = self.state.model, self.state.card, self.state.device
        tag = self.state.model_tag()
        task = self.task.currentText()
        source, name = image_key(layer), layer.name
        scale, translate = region_placement(layer, region)
        box = None if full else (region[0].start, region[0].stop, region[1].start, region[1].stop)
        threshold, min_size = self.threshold.value(), self.min_size.value()
        runtime = self.runtime.currentData()
        if runtime in ("onnx", "openvino") and str(device) != "cpu":
            show_error(f"The {runtime} runtime runs on the CPU; the model is on {device}. "
                       "Choose auto or torch, or the CPU in the Model widget.")
            return
        old = self.state.results.get(source)
        base = old if (not full and old is not None and old.covers(region) and old.task == task
                       and old.plane == plane and old.labels is not None) else None
        base_labels = None if base is None else base.labels

        def job(report, cancel):
            from src_models.inference import predict
            from src_models.instances import InstanceMaker

            probs = predict(model, data, card, device=device, region=box, progress=report,
                            cancel=cancel, runtime=runtime)
            report(0, 0, stage="post-processing (finding objects)…")
            result = SegmentResult(source, name, task, region, probs,
                                   InstanceMaker(probs, card, mode=task), scale, translate,
                                   threshold=threshold, min_size=min_size, model_tag=tag,
                                   plane=plane, stack_shape=stack_shape, image_shape=shape)
            result.make_labels()  # the first labels here, off the GUI thread (watershed can be slow)
            merged = None
            if base is not None:  # a region run: merged into the image's result here, not on the GUI
                merged = merge_region(base, result, card)
                _ = merged.foreground
            _ = result.foreground
            return result, merged

        self._run_card = card
        self._run_base = (base, base_labels)
        self._run_where = where
        self.jobs.run(job, self._show, "segmentation",
                      hint="Check that the image is an H&E RGB (or grayscale) image the model fits.")

    def _show(self, value) -> None:
        result, merged = value if isinstance(value, tuple) else (value, None)
        image = image_by_key(self.viewer, result.source)
        if image is None:  # the image was closed while the job ran: nothing to show it on
            self.summary.setText(f"'{result.image_name}' was closed; its segmentation was dropped.")
            return
        result.image_name = image.name
        old = self.state.results.get(result.source)
        base, base_labels = getattr(self, "_run_base", (None, None))
        note = f"Segmented {self._run_where}. " if getattr(self, "_run_where", "") else ""
        if merged is not None and old is base and old.labels is base_labels:
            result = merged  # merged in the worker, and the image's result has not changed since
            result.image_name = image.name
            note += "Only that region was replaced; the rest of the result is unchanged. "
        elif (not result.full and old is not None and old.covers(result.region)
              and old.task == result.task and old.plane == result.plane):
            result = merge_region(old, result, self._run_card)  # the result changed meanwhile
            note += "Only that region was replaced; the rest of the result is unchanged. "
        layer, where = show_result(self.viewer, result, self.show_probabilities.isChecked(),
                                   self.contours.isChecked())
        self.summary.setText(f"{describe(result)}. {note}{where}".strip())

    def export_geojson(self, path: str | Path | None = None) -> bool:
        """Writes the current labels (the active Labels layer, else the selected image's newest
        labels, the user's corrected ones first) as QuPath GeoJSON in level-0 pixels, in a
        worker. False when nothing was started."""
        try:
            labels_layer, image = self._export_source()
            data = np.asarray(labels_layer.data[0] if labels_layer.multiscale else labels_layer.data)
            if data.ndim > 2:
                data = data[current_plane(self.viewer, labels_layer)]
            if data.ndim != 2:
                raise UserError(f"'{labels_layer.name}' is not a 2D labels layer.")
        except UserError as err:
            show_error(str(err))
            return False
        ref = image if image is not None else labels_layer
        offset = tuple(int(round(v)) for v in (np.asarray(labels_layer.translate)[-2:]
                                                - np.asarray(ref.translate)[-2:])
                       / np.asarray(ref.scale)[-2:])
        if path is None:
            folder = remembered("segment/export_dir", "")
            if not folder or not Path(folder).is_dir():
                folder = str(Path.home())
            stem = (image.name if image is not None else labels_layer.name).replace("/", "_")
            path, _ = QFileDialog.getSaveFileName(self, "Export labels as QuPath GeoJSON",
                                                  str(Path(folder) / f"{stem}.geojson"),
                                                  "GeoJSON (*.geojson *.json)")
            if not path:
                return False
        path = Path(path)
        remember("segment/export_dir", str(path.parent))
        task = owner(labels_layer).get("task")
        class_name = "Gland" if task == "glands" else "Nucleus"
        labels = np.array(data, copy=True)  # the worker never reads the layer the user may paint
        image_name = image.name if image is not None else labels_layer.name

        existed = path.exists()

        def job(report, cancel):
            from src_models.inference import Cancelled
            from src_models.slide.geojson import labels_to_geojson
            report(0, 0, stage="tracing object outlines…")

            def progress(done, total):
                # Cancel stops the writer here, between two objects: it removes its temporary
                # file, so the target keeps whatever it held before (or stays absent)
                if cancel.is_set():
                    raise Cancelled(f"GeoJSON export cancelled after {done} of {total} objects")
                if done:
                    report(done, total)
            return labels_to_geojson(labels, path, class_name=class_name, offset=offset,
                                     image_name=image_name, progress=progress)

        def done(written):
            n = count_objects(labels)
            self.summary.setText(f"Exported {n} objects of '{labels_layer.name}' to {Path(written).name} "
                                 f"(QuPath GeoJSON, level-0 pixels{' from y %d, x %d' % offset if any(offset) else ''}).")

        def cancelled() -> str:
            kept = (f"the existing {path.name} is unchanged" if existed
                    else f"no {path.name} was created")
            line = f"GeoJSON export cancelled: nothing was written, {kept}."
            if alive(self):
                self.summary.setText(line)
            return line
        return self.jobs.run(job, done, "GeoJSON export", hint="Choose a writable folder.",
                             unit="object", on_cancelled=cancelled)

    def _export_source(self):
        """(labels layer to export, its image layer or None)."""
        from napari.layers import Labels
        active = self.viewer.layers.selection.active
        if isinstance(active, Labels):
            return active, image_by_key(self.viewer, owner(active).get("source", "")) or self.image.layer()
        image = self.image.layer()
        if image is not None:
            key = image_key(image)
            mine = [l for l in self.viewer.layers if owner(l).get("source") == key
                    and owner(l).get("role") in ("instances", "corrections")]
            edited = [l for l in mine if is_edited(l) or owner(l).get("role") == "corrections"]
            if edited or mine:
                return (edited or mine)[-1], image
        raise UserError("No labels to export: segment the image first, or select a Labels layer.")

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
                labels = r.maker.labels(threshold=threshold, min_size=min_size)
                return labels, count_objects(labels)  # counted here, not on the GUI thread
            except Exception as err:  # shown as a message, never a traceback
                return err

        def done(value):
            if not alive(self):
                return
            if isinstance(value, Exception):
                show_error(f"Could not make labels: {value}.")
                return
            if self.state.results.get(r.source) is not r or image_by_key(self.viewer, r.source) is None:
                return  # a newer segmentation replaced it meanwhile, or the image was closed
            labels, count = value
            r.threshold, r.min_size = threshold, min_size
            r.set_labels(labels, count)
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
        return unedited_owned_layer(self.viewer, "instances", r.source)
