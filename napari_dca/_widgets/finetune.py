"""Fine-tune widget: teach the current model from corrected labels of one image, see what changed,
revert, or save the result as a new checkpoint (card.parent / card.corrections filled in).

The corrected labels are copied before training; the user's layer is never written to."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import napari
import numpy as np
from napari.layers import Image, Labels, Shapes
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout,
                            QLabel, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from ._common import (Connections, LayerCombo, UserError, add_layer_keeping_selection, alive, check_channels,
                      check_plane_image, find_owned_layers, image_by_key, image_key, is_edited,
                      one_refresh, owned_metadata, owner, show_error, show_info, unedited_owned_layer,
                      warm_up)
from ._gc_freeze import freeze_long_lived
from ._jobs import JobPanel
from .loss_plot import LossPlot
from ._layout import scrolling
from ._state import add_recent_checkpoint, get_state, remember, remembered
from .segment import SegmentResult, put_labels, region_placement, show_result

# Steps 0 shows as "auto": the engine's default round (src_models.finetune: DEFAULT_STEPS on a few
# corrected objects, DEFAULT_STEPS_MANY on many; not imported here: that would import torch when
# the panel opens; tests/gui/test_finetune_widget.py checks the text against the engine)
AUTO_STEPS = 0
AUTO_STEPS_TEXT = "auto"     # short: the box is narrow in a docked panel; the tooltip has the numbers
AUTO_STEPS_TIP = "Training steps of a round; auto: 30, or 45 when you corrected 50 objects or more"

CHANGE_COLORS = {None: "transparent", 0: "transparent", 1: "lime", 2: "red"}


@dataclass(eq=False)
class Round:
    """One fine-tuning round: enough to show it, revert it and save it. Revert belongs to
    `new_model`: once another model is current, this round can no longer be reverted."""
    old_model: object
    old_card: object
    old_checkpoint: str
    old_saved: bool
    old_result: SegmentResult         # the old model's prediction on the image (for "changes")
    previous: SegmentResult | None    # the image's result before the round (restored by Revert)
    old_layers: list                  # the plugin's layers of this image before the round
    new_model: object
    new_card: object
    new_result: SegmentResult
    losses: list
    stopped: str
    outcome: str = ""                 # the engine's summary of the round, when it gives one
    saved_as: str = ""
    changes: tuple | None = None      # compare(old labels, new labels), made in the worker
    plane_before: np.ndarray | None = None  # a stack: the plugin layer's plane before the round


def _owner(layer) -> dict:
    return owner(layer)


def engine_summary(out) -> str:
    """The fine-tuning engine's own words on the round (objects matching the corrections before /
    after, kept or rolled back), when the installed engine provides them."""
    for name in ("summary", "user_summary", "outcome"):
        value = getattr(out, name, None)
        if callable(value):
            try:
                value = value()
            except TypeError:
                continue
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def labels_window(image_layer, labels_layer, shape) -> tuple[slice, slice]:
    """The part of the image (rows, cols of its level-0 pixels) that `labels_layer` covers, by its
    translate: a region result of a slide covers a window of it."""
    scale = np.asarray(image_layer.scale)[-2:]
    offset = np.round((np.asarray(labels_layer.translate)[-2:] - np.asarray(image_layer.translate)[-2:])
                      / scale).astype(int)
    size = np.asarray(labels_layer.data.shape[-2:])
    lo = np.clip(offset, 0, shape)
    hi = np.clip(offset + size, 0, shape)
    if np.any(hi <= lo):
        raise UserError(f"'{labels_layer.name}' does not overlap '{image_layer.name}'.")
    return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))


def corrections_on_image(image_layer, labels_layer, shapes_layer, shape,
                         origin: tuple[int, int] = (0, 0),
                         plane: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W) int copy aligned with the image, reviewed-pixels mask (H, W) bool).

    `shape` is that of the image, or of a window of it starting at image pixel `origin` (a region
    of a slide). Labels that cover only part of it (e.g. a visible-region run) are placed by their
    translate; only that part counts as reviewed, intersected with the Shapes layer if one is given.
    `plane`: the leading indices of the plane of a stack image being trained on; a stack-shaped
    labels layer gives that same plane, a 2D one (shown on every plane) itself."""
    h, w = shape
    data = labels_layer.data
    if plane and data.ndim == len(plane) + 2:
        data = data[plane]
    data = np.asarray(data)
    if data.ndim != 2:
        raise UserError(f"'{labels_layer.name}' is {data.ndim}D; fine-tuning needs 2D labels of the "
                        f"image.")
    scale = np.asarray(image_layer.scale)[-2:]
    offset = np.round((np.asarray(labels_layer.translate)[-2:] - np.asarray(image_layer.translate)[-2:])
                      / scale).astype(int) - np.asarray(origin, int)
    labels = np.zeros((h, w), np.int32)
    valid = np.zeros((h, w), bool)
    y0, x0 = max(0, offset[0]), max(0, offset[1])
    y1, x1 = min(h, offset[0] + data.shape[0]), min(w, offset[1] + data.shape[1])
    if y1 <= y0 or x1 <= x0:
        raise UserError(f"'{labels_layer.name}' does not overlap '{image_layer.name}'.")
    labels[y0:y1, x0:x1] = data[y0 - offset[0]:y1 - offset[0], x0 - offset[1]:x1 - offset[1]]
    valid[y0:y1, x0:x1] = True
    if shapes_layer is not None:
        if len(shapes_layer.data) == 0:
            raise UserError(f"'{shapes_layer.name}' has no shapes: draw a rectangle or polygon around "
                            f"the region you reviewed, or choose 'whole labels layer'.")
        if tuple(origin) == (0, 0) and not plane:
            valid &= np.asarray(shapes_layer.to_masks(mask_shape=(h, w))).any(axis=0)
        else:  # a window of a slide, or a plane of a stack: rasterise only that
            valid &= shapes_mask(image_layer, shapes_layer, (h, w), origin, plane)
    return labels, valid


def _on_plane(image_layer, shapes_layer, vertices: np.ndarray, plane: tuple) -> bool:
    """Whether a shape drawn on a stack lies on `plane` (shapes with only 2D vertices lie on every
    plane)."""
    lead = len(plane)
    if not lead or vertices.shape[1] < lead + 2:
        return True
    first = np.asarray(vertices[0], float)
    world = first * np.asarray(shapes_layer.scale)[-len(first):] + np.asarray(shapes_layer.translate)[-len(first):]
    at = np.asarray(image_layer.world_to_data(
        np.concatenate([np.zeros(image_layer.ndim - len(world)), world])[-image_layer.ndim:]))[:lead]
    return tuple(int(round(v)) for v in at) == tuple(plane)


def shapes_mask(image_layer, shapes_layer, shape, origin=(0, 0), plane: tuple = ()) -> np.ndarray:
    """(H, W) bool: inside any shape of `shapes_layer`, on the image's pixel grid from `origin`
    (only the window is rasterised, never a whole slide); on a stack, the shapes of `plane`."""
    from skimage.draw import polygon2mask

    mask = np.zeros(shape, bool)
    to_world = np.asarray(shapes_layer.scale)[-2:], np.asarray(shapes_layer.translate)[-2:]
    img_scale, img_translate = np.asarray(image_layer.scale)[-2:], np.asarray(image_layer.translate)[-2:]
    for vertices, kind in zip(shapes_layer.data, shapes_layer.shape_type):
        if not _on_plane(image_layer, shapes_layer, np.asarray(vertices), plane):
            continue
        pts = np.asarray(vertices, float)[:, -2:] * to_world[0] + to_world[1]
        pts = (pts - img_translate) / img_scale - np.asarray(origin, float)
        if kind in ("line", "path") or len(pts) < 3:
            continue
        if kind == "ellipse":
            from skimage.draw import ellipse
            (cy, cx), (ry, rx) = pts.mean(0), (pts.max(0) - pts.min(0)) / 2
            rr, cc = ellipse(cy, cx, max(ry, 0.5), max(rx, 0.5), shape=shape)
            mask[rr, cc] = True
        else:
            mask |= polygon2mask(shape, pts)
    return mask


def compare(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(changes map: 1 where only the new labels have an object, 2 where only the old ones do;
    pixels newly found; pixels no longer found). Made in the worker: big images take a while."""
    changes = np.zeros(before.shape, np.uint8)
    new_only = (after > 0) & (before == 0)
    old_only = (after == 0) & (before > 0)
    changes[new_only] = 1
    changes[old_only] = 2
    return changes, int(new_only.sum()), int(old_only.sum())


def clear_changes(layer) -> None:
    """Hides the plugin's changes layer and empties it (hidden first, so napari does not redraw it
    for the new data)."""
    layer.visible = False
    if np.asarray(layer.data).any():
        layer.data = np.zeros(layer.data.shape, np.uint8)


def check_same_grid(image_layer, labels_layer, shape, plane_shape=None) -> None:
    """UserError unless `labels_layer` was made for this image: the same shape, or the plugin's own
    result of a region of it (placed by its translate). On a stack (`shape` its labels' shape), a
    2D layer of one plane's shape (`plane_shape`) fits too."""
    data_shape = tuple(labels_layer.data.shape)
    if data_shape == tuple(shape) or (plane_shape is not None and data_shape == tuple(plane_shape)):
        return
    meta = _owner(labels_layer)
    if meta.get("source") == image_key(image_layer) and len(data_shape) == 2:
        return  # a visible-region result of this image
    raise UserError(f"'{labels_layer.name}' is {' x '.join(map(str, data_shape))} px but "
                    f"'{image_layer.name}' is {shape[0]} x {shape[1]}: pick labels drawn on this image.")


def is_reference_mask(layer) -> bool:
    """Ground truth shipped with a sample (or another plugin's reference mask): never a default."""
    meta = layer.metadata or {}
    return "napari_dca_sample" in meta or "ground truth" in layer.name.lower()


class FinetuneWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)
        self.round: Round | None = None

        self.image = LayerCombo(viewer, (Image,), follow_new=True)
        self.labels = LayerCombo(viewer, (Labels,), none_text="choose the labels you corrected",
                                 include_owned=True, exclude_roles=("changes",))
        self.labels.setToolTip("Labels you corrected (e.g. the Segment widget's output after "
                               "painting / erasing in it); a sample's ground truth is never "
                               "picked for you")
        self.region = LayerCombo(viewer, (Shapes,), none_text="whole labels layer")
        self.region.setToolTip("Shapes drawn around the part you reviewed; only labels there count")
        self.steps = QSpinBox()
        self.steps.setRange(AUTO_STEPS, 5000)
        # "auto" by default, so a round here is the benchmarked one
        self.steps.setSpecialValueText(AUTO_STEPS_TEXT)
        self.steps.setToolTip(AUTO_STEPS_TIP)
        self.steps.setValue(remembered("finetune/steps", AUTO_STEPS))
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1e-1)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(remembered("finetune/lr", 3e-4))
        self.train = QComboBox()
        # "auto": the engine's default (decoder only on a few corrected objects, e.g. glands)
        self.train.addItem("automatic (decoder only on few objects)", "auto")
        self.train.addItem("all layers", "all")
        self.train.addItem("decoder only (encoder frozen)", "decoder")
        idx = self.train.findData(remembered("finetune/train", "auto"))
        self.train.setCurrentIndex(max(idx, 0))
        self.run_button = QPushButton("Fine-tune")
        self.jobs = JobPanel(state=self.state, unit="step")
        self.plot = LossPlot(viewer)
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("Back to the model (and result) from before this round")
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the fine-tuned model as a new checkpoint (its card records "
                                    "the parent and the corrections)")
        for b in (self.revert_button, self.save_button):
            b.setEnabled(False)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image)
        form.addRow("Corrected labels", self.labels)
        form.addRow("Reviewed region", self.region)
        form.addRow("Steps", self.steps)
        form.addRow("Learning rate", self.lr)
        form.addRow("Train", self.train)
        buttons = QHBoxLayout()
        buttons.addWidget(self.revert_button)
        buttons.addWidget(self.save_button)
        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.jobs)
        layout.addWidget(self.plot)
        layout.addWidget(self.summary)
        layout.addLayout(buttons)
        layout.addStretch(1)
        scrolling(self, layout)

        self.run_button.clicked.connect(self.run)
        self.revert_button.clicked.connect(self.revert)
        self.save_button.clicked.connect(lambda: self.save())
        self.jobs.info.connect(self.plot.append)
        self.steps.valueChanged.connect(lambda v: remember("finetune/steps", v))
        self.lr.valueChanged.connect(lambda v: remember("finetune/lr", v))
        self.train.currentIndexChanged.connect(lambda *_: remember("finetune/train", self.train.currentData()))
        self.image.currentIndexChanged.connect(lambda *_: self.suggest_labels())
        viewer.layers.events.inserted.connect(self._on_layer_added)
        self._connections = Connections([(self.state.events.model, self._on_model),
                                         (self.state.events.jobs, self._on_busy)])
        self.destroyed.connect(lambda *_: self._disconnect())
        self.suggest_labels()
        warm_up()
        freeze_long_lived(viewer, self)  # short full garbage collections (_gc_freeze.py)

    def _disconnect(self):
        self._connections.disconnect()
        try:
            self.viewer.layers.events.inserted.disconnect(self._on_layer_added)
        except Exception:
            pass

    # --- choices ---------------------------------------------------------------------------------
    def _on_layer_added(self, event):
        layer = getattr(event, "value", None)
        if alive(self) and isinstance(layer, Labels):
            layer.events.paint.connect(self._on_paint)
            self.suggest_labels()

    def _on_paint(self, *_):
        if alive(self):
            self.suggest_labels()

    def suggest_labels(self) -> None:
        """When nothing is chosen yet: the labels the user edited for the chosen image (never a
        sample's ground truth, never an untouched result)."""
        if not alive(self) or self.labels.layer() is not None:
            return
        image = self.image.layer()
        if image is None:
            return
        key = image_key(image)
        for layer in reversed(list(self.viewer.layers)):
            if (isinstance(layer, Labels) and not is_reference_mask(layer) and is_edited(layer)
                    and _owner(layer).get("source") in (key, None)
                    and _owner(layer).get("role") != "changes"):
                self.labels.set_layer(layer)
                return

    def _on_busy(self, *_):
        if alive(self):
            self.run_button.setEnabled(not self.jobs.busy)
            self._update_buttons()

    def _on_model(self, *_):
        if alive(self):
            self._update_buttons()

    def _update_buttons(self) -> None:
        r = self.round
        current = r is not None and self.state.model is r.new_model
        self.revert_button.setEnabled(current and not self.jobs.busy)
        self.revert_button.setToolTip(
            "Back to the model (and result) from before this round" if current or r is None else
            "This round's model is no longer the current one, so there is nothing of it to revert")
        self.save_button.setEnabled(r is not None and not self.jobs.busy)

    # --- training --------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            image_layer = self.image.layer()
            # a stack trains on the plane on screen: that plane of the image and of the labels
            data, plane, stack_shape = check_plane_image(self.viewer, image_layer)
            labels_layer = self.labels.layer()
            if labels_layer is None:
                raise UserError("No corrected labels chosen: segment the image (Segment widget), "
                                "correct the labels with napari's paint/erase tools, then pick that "
                                "layer under 'Corrected labels'.")
            if self.state.model is None:
                raise UserError("No model: load one in the Model widget first.")
            check_channels(image_layer, data, self.state.model, self.state.card)
            shape = data.shape[:2]
            check_same_grid(image_layer, labels_layer, stack_shape or shape,
                            plane_shape=shape if stack_shape else None)
            # a slide is never read whole: fine-tune on the window its labels cover
            window = (labels_window(image_layer, labels_layer, shape)
                      if getattr(image_layer, "multiscale", False) else
                      (slice(0, shape[0]), slice(0, shape[1])))
            origin = (window[0].start, window[1].start)
            wshape = (window[0].stop - window[0].start, window[1].stop - window[1].start)
            labels, valid = corrections_on_image(image_layer, labels_layer, self.region.layer(),
                                                 wshape, origin, plane)
            if not valid.any():
                raise UserError("The reviewed region does not overlap the labels: draw it over the "
                                "part you corrected.")
        except UserError as err:
            show_error(str(err))
            return
        image = np.asarray(data[window]) if getattr(image_layer, "multiscale", False) else np.asarray(data)
        state = self.state
        old_model, old_card, device = state.model, state.card, state.device
        old_checkpoint, old_saved = state.checkpoint, state.saved
        old_tag = state.model_tag()
        source, name = image_key(image_layer), image_layer.name
        full = window
        previous = state.results.get(source)
        # the old model's own prediction of this image, when the cached one is exactly that
        cached = previous if (previous is not None and previous.region == full
                              and previous.model_tag == old_tag and previous.plane == plane) else None
        old_layers = [layer for layer in self.viewer.layers if _owner(layer).get("source") == source]
        plane_before = None
        if stack_shape:  # what Revert puts back into this plane of the plugin's stack layer
            mine = unedited_owned_layer(self.viewer, "instances", source, stack_shape)
            plane_before = None if mine is None else np.array(mine.data[plane], copy=True)
        scale, translate = region_placement(image_layer, full)
        threshold = previous.threshold if previous is not None else None
        min_size = previous.min_size if previous is not None else None
        task = previous.task if previous is not None else getattr(old_card, "task", "nuclei")
        steps, lr, train = self.steps.value(), self.lr.value(), self.train.currentData()
        self.plot.clear()

        def job(report, cancel):
            from src_models.finetune import finetune
            from src_models.inference import predict
            from src_models.instances import InstanceMaker

            def progress(step, total, loss):
                report(step, total, loss)

            def segment(model, card_, tag, threshold=threshold, min_size=min_size):
                probs = predict(model, image, card_, device=device)
                maker = InstanceMaker(probs, card_, mode=task)
                result = SegmentResult(source, name, task, full, probs, maker, scale, translate,
                                       threshold=threshold if threshold is not None else maker.params.threshold,
                                       min_size=min_size if min_size is not None else maker.params.min_size,
                                       model_tag=tag, image_shape=tuple(shape), plane=plane,
                                       stack_shape=stack_shape)
                result.make_labels()
                return result

            out = finetune(old_model, image, labels, region=valid,
                           steps=None if steps == AUTO_STEPS else steps, lr=lr,
                           train=None if train == "auto" else train,
                           card=old_card, progress=progress, cancel=cancel.is_set)
            if not getattr(out, "kept", True):  # the engine rolled the round back: nothing changes
                return out, None, None, None, None
            card = out.card(old_card, parent=(old_checkpoint if old_saved else None) or None)
            report(0, 0, stage="segmenting with the new model…")
            tuned = getattr(out, "instance_params", None) or {}
            new_result = segment(out.model, card, (id(out.model), -1),
                                 threshold=tuned.get("threshold", threshold),
                                 min_size=tuned.get("min_size", min_size))
            if cached is not None:
                before = cached
            else:
                report(0, 0, stage="segmenting with the previous model (for the comparison)…")
                before = segment(old_model, old_card, old_tag)
            return out, card, new_result, before, compare(before.labels, new_result.labels)

        def done(value):
            out, card, new_result, before, changes = value
            if new_result is None:
                loss = (f"loss {out.loss_history[0]:.3f} → {out.loss_history[-1]:.3f}. "
                        if out.loss_history else "")
                self.summary.setText(f"{len(out.loss_history)} steps, {loss}{engine_summary(out)} "
                                     f"Nothing changed: the current model and its results stay.")
                return
            if image_by_key(self.viewer, source) is None:
                self.summary.setText(f"'{name}' was closed while fine-tuning; the new model is "
                                     f"kept as the current model (not saved yet).")
            self.round = Round(old_model, old_card, old_checkpoint, old_saved, before, previous,
                               old_layers, out.model, card, new_result, list(out.loss_history),
                               out.stopped, outcome=engine_summary(out), changes=changes,
                               plane_before=plane_before)
            self._apply_new()

        self.jobs.run(job, done, "fine-tuning",
                      hint="Check that the labels hold corrected objects inside the reviewed region.")

    def _apply_new(self) -> None:
        r = self.round
        self.state.set_model(r.new_model, r.new_card, "", saved=False)  # unsaved: no file yet
        r.new_result.model_tag = self.state.model_tag()
        image = image_by_key(self.viewer, r.new_result.source)
        where = ""
        if image is not None:
            r.new_result.image_name = image.name
            _, where = show_result(self.viewer, r.new_result)
            self._show_changes(r, image)
        stop = {"steps": "", "cancelled": " (cancelled early)",
                "non-finite loss": " (stopped: loss became non-finite)",
                "time budget": " (stopped at the time budget)"}.get(r.stopped, f" ({r.stopped})")
        loss = f"loss {r.losses[0]:.3f} → {r.losses[-1]:.3f}" if r.losses else "no step finished"
        before, after = r.old_result, r.new_result
        what = "classes" if after.task == "semantic" else "objects"
        _, added, removed = r.changes if r.changes is not None else compare(before.labels, after.labels)
        change_text = (f"Previous model vs fine-tuned model on '{after.image_name}': {what} "
                       f"{before.n_objects} → {after.n_objects}; {added} px newly found, {removed} px "
                       f"no longer found (green / red in the changes layer).")
        outcome = f" {r.outcome}" if r.outcome else ""
        self.summary.setText(f"{len(r.losses)} steps{stop}, {loss}.{outcome} {change_text} {where} "
                             f"Not saved yet: 'Save…' keeps it, 'Revert' undoes it.")
        self._update_buttons()

    def _show_changes(self, r: Round, image) -> None:
        changes = (r.changes if r.changes is not None
                   else compare(r.old_result.labels, r.new_result.labels))[0]
        result = r.new_result
        scale, translate = result.scale, result.translate
        if result.stack_shape:  # a stack: the changes of this round's plane, on that plane only
            stack = np.zeros(result.stack_shape, np.uint8)
            stack[result.plane] = changes
            changes = stack
            nd = len(result.stack_shape)
            scale, translate = np.asarray(image.scale)[-nd:], np.asarray(image.translate)[-nd:]
        # one the user painted in is theirs: never rewritten
        layer = unedited_owned_layer(self.viewer, "changes", result.source)
        if layer is not None and layer.data.shape != changes.shape:
            self.viewer.layers.remove(layer)  # the plugin's own, of an earlier other shape
            layer = None
        if layer is None:
            add_layer_keeping_selection(
                self.viewer, "labels", changes,
                name=f"{image.name} changes (green: new model only, red: previous model only)",
                scale=scale, translate=translate, opacity=0.7,
                colormap=CHANGE_COLORS, metadata=owned_metadata("changes", result.source))
        else:  # the plugin's changes layer of an earlier round (hidden by a Revert): reused
            with one_refresh(layer):
                layer.data = changes
                if not np.allclose(layer.scale, scale):  # each set re-slices the layer
                    layer.scale = scale
                if not np.allclose(layer.translate, translate):
                    layer.translate = translate
            if layer.visible:
                layer.refresh()
            else:
                layer.visible = True  # refreshes it once

    def revert(self) -> None:
        """Back to the model and result from before the last round (only while that round's model
        is still the current one)."""
        r = self.round
        if r is None:
            return
        if self.jobs.busy:
            show_info("Wait for the running job to finish (or cancel it) before reverting.")
            return
        if self.state.model is not r.new_model:
            show_info("The fine-tuned model is no longer the current one; nothing to revert.")
            self._update_buttons()
            return
        self.state.set_model(r.old_model, r.old_card, r.old_checkpoint, saved=r.old_saved)
        source = r.new_result.source
        other_plane = r.previous is not None and r.previous.plane != r.new_result.plane
        if r.new_result.stack_shape and r.plane_before is not None:
            mine = unedited_owned_layer(self.viewer, "instances", source, r.new_result.stack_shape)
            if mine is not None:  # this plane as it was; the other planes were never touched
                mine.data[r.new_result.plane] = r.plane_before
                mine.refresh()
        if r.previous is not None:
            if r.previous.model_tag == r.old_result.model_tag:  # made by the model now current again
                r.previous.model_tag = self.state.model_tag()
            self.state.results.set(source, r.previous)
            if image_by_key(self.viewer, source) is not None and not other_plane:
                put_labels(self.viewer, r.previous)
        else:
            self.state.results.drop(source)
        # the changes layer stays, hidden and empty (this round's comparison is void), and the next
        # round shows its changes there: removing a layer costs napari a full garbage collection
        # on the GUI thread (~1 s with torch loaded) and adding one back another ~0.5 s
        for layer in find_owned_layers(self.viewer, "changes", source):
            if not is_edited(layer):
                clear_changes(layer)
        # other layers this round added (and that did not exist before) go away, unless the user
        # edited them
        for layer in list(self.viewer.layers):
            meta = _owner(layer)
            if (meta.get("source") == source and not any(layer is old for old in r.old_layers)
                    and not is_edited(layer) and meta.get("role") in ("instances", "probabilities")):
                self.viewer.layers.remove(layer)
        self.round = None
        self._update_buttons()
        self.summary.setText("Reverted to the model and result from before fine-tuning.")

    def save(self, path: str | Path | None = None) -> Path | None:
        """Saves the fine-tuned model (card.parent, card.corrections filled in) as a checkpoint."""
        r = self.round
        if r is None:
            show_error("Nothing to save: fine-tune first.")
            return None
        if path is None:
            parent = Path(r.old_checkpoint).stem if r.old_checkpoint else "model"
            folder = remembered("finetune/save_dir", "")
            if not folder or not Path(folder).is_dir():
                old = Path(r.old_checkpoint)
                folder = str(old.parent) if old.is_file() else str(Path.home())
            path, _ = QFileDialog.getSaveFileName(self, "Save the fine-tuned model",
                                                  str(Path(folder) / f"{parent}_finetuned.safetensors"),
                                                  "DCA checkpoints (*.safetensors)")
            if not path:
                return None
        from src_models.checkpoints import save_checkpoint

        try:
            saved = save_checkpoint(r.new_model, path, r.new_card)
        except (OSError, ValueError) as err:
            show_error(f"Could not save to {path}: {err}. Choose a writable folder.")
            return None
        remember("finetune/save_dir", str(Path(saved).parent))
        r.saved_as = str(saved)
        if self.state.model is r.new_model:
            with self.state.events.paused():
                self.state.checkpoint = str(saved)
                self.state.saved = True
        add_recent_checkpoint(saved)
        text = self.summary.text()
        marker = "Not saved yet:"
        if marker in text:
            text = text[:text.index(marker)].rstrip()
        self.summary.setText(f"{text} Saved as {Path(saved).name}.")
        show_info(f"napari-dca: saved {Path(saved).name} (fine-tuned from "
                  f"{r.new_card.parent or 'a new model'}).")
        return saved
