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
                            QLabel, QPushButton, QSizePolicy, QSpinBox, QVBoxLayout, QWidget)

from ._common import (OWNER_KEY, LayerCombo, UserError, check_channels, check_image, find_owned_layer,
                      owned_metadata, show_error, show_info)
from ._jobs import JobPanel
from ._state import add_recent_checkpoint, get_state
from .segment import SegmentResult, region_placement, show_result

CHANGE_COLORS = {None: "transparent", 0: "transparent", 1: "lime", 2: "red"}


@dataclass(eq=False)
class Round:
    """One fine-tuning round: enough to show it, revert it and save it."""
    old_model: object
    old_card: object
    old_checkpoint: str
    old_result: SegmentResult         # the old model's segmentation of the image (for "changes")
    had_result: bool                  # whether old_result was on screen before the round
    old_labels: np.ndarray | None     # our output layer's data before the round (None: no layer)
    old_roles: set                    # roles of our layers for this image before the round
    new_model: object
    new_card: object
    new_result: SegmentResult
    losses: list
    stopped: str


def _owner(layer) -> dict:
    meta = layer.metadata.get(OWNER_KEY)
    return meta if isinstance(meta, dict) else {}


def corrections_on_image(image_layer, labels_layer, shapes_layer, shape) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W) int copy aligned with the image, reviewed-pixels mask (H, W) bool).

    Labels that cover only part of the image (e.g. a visible-region run) are placed by their
    translate; only that part counts as reviewed, intersected with the Shapes layer if one is given."""
    h, w = shape
    data = np.asarray(labels_layer.data)
    if data.ndim != 2:
        raise UserError(f"'{labels_layer.name}' is {data.ndim}D; fine-tuning needs 2D labels of the "
                        f"image.")
    scale = np.asarray(image_layer.scale)[-2:]
    offset = np.round((np.asarray(labels_layer.translate)[-2:] - np.asarray(image_layer.translate)[-2:])
                      / scale).astype(int)
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
        masks = shapes_layer.to_masks(mask_shape=(h, w))
        valid &= np.asarray(masks).any(axis=0)
    return labels, valid


class LossPlot(QWidget):
    """A small live plot of the training loss (matplotlib)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 1.6), dpi=90, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(130)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.axes = self.figure.add_subplot(111)
        self.figure.patch.set_alpha(0.0)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.values: list[float] = []
        self.clear()

    def clear(self) -> None:
        self.values = []
        self._draw()

    def append(self, value: float) -> None:
        self.values.append(float(value))
        self._draw()

    def _draw(self) -> None:
        ax = self.axes
        ax.clear()
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        if self.values:
            ax.plot(np.arange(1, len(self.values) + 1), self.values, color="tab:orange", lw=1.5)
        self.canvas.draw_idle()


class FinetuneWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)
        self.round: Round | None = None

        self.image = LayerCombo(viewer, (Image,))
        self.labels = LayerCombo(viewer, (Labels,), include_owned=True, exclude_roles=("changes",))
        self.labels.setToolTip("Labels you corrected (e.g. the Segment widget's output after editing)")
        self.region = LayerCombo(viewer, (Shapes,), none_text="whole labels layer")
        self.region.setToolTip("Shapes drawn around the part you reviewed; only labels there count")
        self.steps = QSpinBox()
        self.steps.setRange(1, 5000)
        self.steps.setValue(60)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1e-1)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(3e-4)
        self.train = QComboBox()
        self.train.addItem("all layers", "all")
        self.train.addItem("decoder only (encoder frozen)", "decoder")
        self.run_button = QPushButton("Fine-tune")
        self.jobs = JobPanel()
        self.plot = LossPlot()
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("Back to the weights (and outputs) before this round")
        self.save_button = QPushButton("Save as checkpoint…")
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
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.jobs)
        layout.addWidget(self.plot)
        layout.addWidget(self.summary)
        layout.addLayout(buttons)
        layout.addStretch(1)

        self.run_button.clicked.connect(self.run)
        self.revert_button.clicked.connect(self.revert)
        self.save_button.clicked.connect(lambda: self.save())
        self.jobs.info.connect(self.plot.append)

    # --- training --------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            image_layer = self.image.layer()
            data = check_image(image_layer)
            labels_layer = self.labels.layer()
            if labels_layer is None:
                raise UserError("No labels layer: segment the image first (Segment widget), correct "
                                "the labels with napari's paint/erase tools, then fine-tune.")
            if self.state.model is None:
                raise UserError("No model: load one in the Model widget first.")
            check_channels(image_layer, data, self.state.model, self.state.card)
            shape = data.shape[:2]
            labels, valid = corrections_on_image(image_layer, labels_layer, self.region.layer(), shape)
            if not valid.any():
                raise UserError("The reviewed region does not overlap the labels: draw it over the "
                                "part you corrected.")
        except UserError as err:
            show_error(str(err))
            return
        image = np.asarray(data)
        state = self.state
        old_model, old_card, old_checkpoint, device = state.model, state.card, state.checkpoint, state.device
        source = image_layer.name
        # Our output layer becomes the user's corrections: later runs must not overwrite it.
        owner = _owner(labels_layer)
        if owner.get("role") == "instances":
            labels_layer.metadata = {**labels_layer.metadata,
                                     OWNER_KEY: {**owner, "role": "corrections"}}
            labels_layer.name = f"{labels_layer.name} (corrected)"
        full = (slice(0, shape[0]), slice(0, shape[1]))
        old_result = state.result
        had_result = (old_result is not None and old_result.source == source
                      and old_result.region == full)
        old_output = find_owned_layer(self.viewer, "instances", source)
        old_labels = None if old_output is None else np.array(old_output.data, copy=True)
        old_roles = {_owner(layer).get("role") for layer in self.viewer.layers
                     if _owner(layer).get("source") == source}
        if not had_result:
            old_result = None
        scale, translate = region_placement(image_layer, full)
        threshold = old_result.threshold if old_result is not None else 0.5
        min_size = old_result.min_size if old_result is not None else None
        task = old_result.task if old_result is not None else getattr(old_card, "task", "nuclei")
        steps, lr, train = self.steps.value(), self.lr.value(), self.train.currentData()
        self.plot.clear()

        def job(report, cancel):
            from src_models.finetune import finetune
            from src_models.inference import predict
            from src_models.instances import InstanceMaker

            def progress(step, total, loss):
                report(step, total + 1, loss)  # +1: the re-segmentation after training

            def segment(model, card_):
                probs = predict(model, image, card_, device=device)
                maker = InstanceMaker(probs, card_, mode=task)
                result = SegmentResult(source, task, full, probs, maker, scale, translate,
                                       threshold=threshold, min_size=(
                                           min_size if min_size is not None else maker.params.min_size))
                result.make_labels()
                return result

            out = finetune(old_model, image, labels, region=valid, steps=steps, lr=lr, train=train,
                           card=old_card, progress=progress, cancel=cancel.is_set)
            card = out.card(old_card, parent=old_checkpoint or None)
            new_result = segment(out.model, card)
            before = old_result if old_result is not None else segment(old_model, old_card)
            report(steps + 1, steps + 1)
            return out, card, new_result, before

        def done(value):
            out, card, new_result, before = value
            self.round = Round(old_model, old_card, old_checkpoint, before, had_result, old_labels,
                               old_roles, out.model, card, new_result, list(out.loss_history),
                               out.stopped)
            self._apply_new()

        self.jobs.run(job, done, "fine-tuning",
                      hint="Check that the labels hold corrected objects inside the reviewed region.")

    def _apply_new(self) -> None:
        r = self.round
        self.state.set_model(r.new_model, r.new_card, "")  # unsaved: no file yet
        show_result(self.viewer, r.new_result)
        before = r.old_result.labels
        if before is not None:
            changes = np.zeros(before.shape, np.uint8)
            changes[(r.new_result.labels > 0) & (before == 0)] = 1   # added
            changes[(r.new_result.labels == 0) & (before > 0)] = 2   # removed
            layer = find_owned_layer(self.viewer, "changes", r.new_result.source)
            if layer is None:
                self.viewer.add_labels(changes, name=f"{r.new_result.source} changes (green added, red removed)",
                                       scale=r.new_result.scale, translate=r.new_result.translate,
                                       opacity=0.7, colormap=CHANGE_COLORS,
                                       metadata=owned_metadata("changes", r.new_result.source))
            else:
                layer.data = changes
                layer.visible = True
            n_before = int(np.count_nonzero(np.unique(before)))
            added, removed = int((changes == 1).sum()), int((changes == 2).sum())
            change_text = (f"Objects {n_before} → {int(np.count_nonzero(np.unique(r.new_result.labels)))}; "
                           f"{added} px added, {removed} px removed.")
        else:
            change_text = (f"{int(np.count_nonzero(np.unique(r.new_result.labels)))} objects after "
                           f"fine-tuning.")
        stop = {"steps": "", "cancelled": " (cancelled early)",
                "non-finite loss": " (stopped: loss became non-finite)"}.get(r.stopped, "")
        loss = f"loss {r.losses[0]:.3f} → {r.losses[-1]:.3f}" if r.losses else "no step finished"
        self.summary.setText(f"{len(r.losses)} steps{stop}, {loss}. {change_text} "
                             f"Not saved yet: 'Save as checkpoint…' keeps it, 'Revert' undoes it.")
        self.revert_button.setEnabled(True)
        self.save_button.setEnabled(True)

    def revert(self) -> None:
        """The weights and outputs from before the last round."""
        r = self.round
        if r is None:
            return
        if self.jobs.busy:
            show_info("Wait for the running job to finish (or cancel it) before reverting.")
            return
        self.state.set_model(r.old_model, r.old_card, r.old_checkpoint)
        source = r.new_result.source
        if r.had_result:
            show_result(self.viewer, r.old_result)
        else:
            self.state.result = None
        layer = find_owned_layer(self.viewer, "instances", source)
        if layer is not None and r.old_labels is not None:
            layer.data = r.old_labels
        # layers this round added (and that did not exist before) go away again
        for role in ("instances", "probabilities", "changes"):
            layer = find_owned_layer(self.viewer, role, source)
            if layer is not None and role not in r.old_roles:
                self.viewer.layers.remove(layer)
        self.round = None
        self.revert_button.setEnabled(False)
        self.save_button.setEnabled(False)
        self.summary.setText("Reverted to the previous weights.")

    def save(self, path: str | Path | None = None) -> Path | None:
        """Saves the fine-tuned model (card.parent, card.corrections filled in) as a checkpoint."""
        r = self.round
        if r is None:
            show_error("Nothing to save: fine-tune first.")
            return None
        if path is None:
            parent = Path(r.old_checkpoint).stem if r.old_checkpoint else "model"
            path, _ = QFileDialog.getSaveFileName(self, "Save the fine-tuned model",
                                                  f"{parent}_finetuned.safetensors",
                                                  "DCA checkpoints (*.safetensors)")
            if not path:
                return None
        from src_models.checkpoints import save_checkpoint

        try:
            saved = save_checkpoint(r.new_model, path, r.new_card)
        except (OSError, ValueError) as err:
            show_error(f"Could not save to {path}: {err}. Choose a writable folder.")
            return None
        self.state.checkpoint = str(saved)
        add_recent_checkpoint(saved)
        show_info(f"napari-dca: saved {saved.name} (fine-tuned from {r.new_card.parent or 'a new model'}).")
        return saved
