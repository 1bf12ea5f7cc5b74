"""Model widget: pick a backbone or a checkpoint and a device; shows the model card."""
from __future__ import annotations

import html
from pathlib import Path

import napari
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel,
                            QPushButton, QSizePolicy, QVBoxLayout, QWidget)

from ._common import Connections, alive, available_devices, resolve_device, show_error, show_info
from ._gc_freeze import freeze_long_lived
from ._jobs import JobPanel
from ._layout import scrolling
from ._speed import ACCURATE_SUFFIX, picker_label, speed_details, speed_of, variant
from ._state import add_recent_checkpoint, get_state, recent_checkpoints, remember, remembered

NEW_MODEL = "__new__"


class ModelWidget(QWidget):
    """Chooses the current model of this viewer (shared with Segment, Fine-tune, Attention)."""

    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)

        self.checkpoint = QComboBox()
        self.checkpoint.setToolTip("Bundled defaults, recently opened files, or a new untrained model")
        self.browse = QPushButton("Open…")
        self.browse.setToolTip("Open a napari-dca .safetensors checkpoint")
        row = QHBoxLayout()
        row.addWidget(self.checkpoint, 1)
        row.addWidget(self.browse)

        self.backbone = QComboBox()
        from src_models import list_models
        self.backbone.addItems(list_models())
        self.backbone.setCurrentText("unet")  # the paper's base model; the lightest with DCA
        self.dca = QCheckBox("Dual cross-attention")
        self.dca.setToolTip("Build the new model with the DCA module (the paper's model)")
        self.dca.setChecked(True)
        self.task = QComboBox()
        self.task.addItems(["nuclei", "glands", "semantic"])
        self.task.setToolTip("Task of a new model (a checkpoint brings its own)")

        self.device = QComboBox()
        devices = available_devices()
        self.device.addItem(f"auto ({devices[0][0]})", "auto")
        for label, dev in devices:
            self.device.addItem(label, dev)

        self.device.setToolTip("Changing it moves the current model (fine-tuned weights included)")

        self.load_button = QPushButton("Load model")
        self.load_button.setToolTip("Load the checkpoint chosen above as the current model; results "
                                    "already on screen keep their labels")
        self.jobs = JobPanel(state=self.state)
        self.card = QLabel("No model loaded.")
        self.card.setWordWrap(True)
        self.card.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.card.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        self.card.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)  # wraps to the dock

        form = QFormLayout()
        form.addRow("Checkpoint", row)
        form.addRow("Backbone", self.backbone)
        form.addRow("", self.dca)
        form.addRow("Task", self.task)
        form.addRow("Device", self.device)
        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addWidget(self.load_button)
        layout.addWidget(self.jobs)
        layout.addWidget(self.card)
        layout.addStretch(1)
        scrolling(self, layout)
        self._device_shown = self.device.currentIndex()

        self._fill_checkpoints(select=remembered("model/checkpoint", "") or None)
        device_idx = self.device.findData(remembered("model/device", "auto"))
        if device_idx >= 0:
            self.device.setCurrentIndex(device_idx)
        self.checkpoint.currentIndexChanged.connect(self._on_checkpoint_choice)
        self.browse.clicked.connect(self._on_browse)
        self.load_button.clicked.connect(self.load)
        self.device.currentIndexChanged.connect(self._on_device)
        self._connections = Connections([(self.state.events.model, self._show_card),
                                         (self.state.events.version, self._show_card),
                                         (self.state.events.checkpoint, self._show_card),
                                         (self.state.events.saved, self._show_card),
                                         (self.state.events.device, self._show_device),
                                         (self.state.events.jobs, self._on_busy)])
        self.destroyed.connect(self._connections.disconnect)
        freeze_long_lived(viewer, self)  # short full garbage collections (_gc_freeze.py)
        self._on_checkpoint_choice()
        if self.state.model is not None:
            self._show_card()

    def _on_busy(self, *_):
        if not alive(self):
            return
        busy = self.state.busy
        self.load_button.setEnabled(not busy)
        self.device.setEnabled(not busy)  # never move weights a worker is using

    def _show_device(self, *_):
        """The Device box shows where the current model is (set elsewhere, e.g. by the reader)."""
        if not alive(self):
            return
        idx = self.device.currentIndex()
        if resolve_device(self.device.itemData(idx)) != self.state.device:
            idx = self.device.findData(self.state.device)
            if idx >= 0:
                self.device.blockSignals(True)
                self.device.setCurrentIndex(idx)
                self.device.blockSignals(False)
        self._device_shown = self.device.currentIndex()

    # --- choices ---------------------------------------------------------------------------------
    def _fill_checkpoints(self, select: str | None = None) -> None:
        from src_models.checkpoints import bundled_checkpoints

        self.checkpoint.blockSignals(True)
        self.checkpoint.clear()
        bundled = bundled_checkpoints()
        # each bundled model next to its accurate variant, the two defaults first
        first = [n for base in ("nuclei", "glands") for n in (base, base + ACCURATE_SUFFIX)]
        for name in [n for n in first if n in bundled] + [n for n in bundled if n not in first]:
            card = peek_card(bundled[name])
            self.checkpoint.addItem(picker_label(name, card), name)
            self._speed_tooltip(card, f"{name}: bundled with napari-dca ({variant(name)} variant)")
        for path in recent_checkpoints():
            card = peek_card(path)
            self.checkpoint.addItem(picker_label(Path(path).name, card, bundled=False), path)
            self._speed_tooltip(card, path)  # tooltip: the full path (and how fast)
        self.checkpoint.addItem("New untrained model of the chosen backbone", NEW_MODEL)
        if select is not None:
            idx = self.checkpoint.findData(select)
            if idx >= 0:
                self.checkpoint.setCurrentIndex(idx)
        self.checkpoint.blockSignals(False)
        self._on_checkpoint_choice()

    def _speed_tooltip(self, card, first_line: str) -> None:
        speed = speed_of(card)
        tip = first_line + (f"\n{speed_details(speed)}" if speed else "")
        self.checkpoint.setItemData(self.checkpoint.count() - 1, tip, Qt.ToolTipRole)

    def select_checkpoint(self, name_or_path: str) -> None:
        """Selects a bundled name or a file (added to the list if new)."""
        if self.checkpoint.findData(name_or_path) < 0 and name_or_path != NEW_MODEL:
            self.checkpoint.insertItem(0, Path(name_or_path).name, name_or_path)
        self.checkpoint.setCurrentIndex(self.checkpoint.findData(name_or_path))

    def _on_checkpoint_choice(self, *_):
        new = self.checkpoint.currentData() == NEW_MODEL
        for w in (self.backbone, self.dca, self.task):
            w.setEnabled(new)

    def _on_browse(self):
        path, _ = QFileDialog.getOpenFileName(self, "Open a napari-dca checkpoint", "",
                                              "DCA checkpoints (*.safetensors);;All files (*)")
        if path:
            self.select_checkpoint(path)
            self.load()

    def _on_device(self, *_):
        """Moves the current model (whatever it is: a dropped file, unsaved fine-tuned weights) to
        the chosen device; never reloads what the Checkpoint list shows."""
        remember("model/device", self.device.currentData())
        state = self.state
        if state.model is None:
            return
        if state.busy:  # the box is disabled while busy; a programmatic change is refused too
            self.device.blockSignals(True)
            self.device.setCurrentIndex(self._device_shown)
            self.device.blockSignals(False)
            show_info("napari-dca is busy; change the device once the running job is done.")
            return
        device = self.device_choice()
        if device == state.device:
            return
        try:
            state.model.to(device)
        except Exception as err:  # e.g. out of GPU memory: stay where it was
            show_error(f"Could not move the model to {device}: {err}.")
            self._show_device()
            return
        state.device = device
        self._show_card()
        show_info(f"napari-dca: the current model is now on {device}.")

    def device_choice(self) -> str:
        return resolve_device(self.device.currentData())

    # --- loading ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Loads the chosen checkpoint (or builds a new model) in a worker; sets the shared state."""
        if self.jobs.busy:
            return
        choice = self.checkpoint.currentData()
        device = self.device_choice()
        backbone, dca, task = self.backbone.currentText(), self.dca.isChecked(), self.task.currentText()
        if choice is None:
            show_error("Choose a checkpoint or 'New untrained model' first.")
            return
        remember("model/checkpoint", str(choice))
        def job(report, cancel):
            if choice == NEW_MODEL:
                from src_models import build_model
                from src_models.checkpoints import card_for
                model = build_model(backbone, dca=dca).to(device).eval()
                card = card_for(model, task=task, trained_on="nothing yet (random weights)",
                                licence="MIT")
                return model, card, "", device
            from src_models.checkpoints import load_checkpoint
            model, card = load_checkpoint(choice, device=device)
            return model, card, str(choice), device

        self.jobs.run(job, self._finish, "loading the model",
                      hint="Choose a napari-dca .safetensors checkpoint, a bundled default, or a new "
                           "untrained model.")

    def _finish(self, result) -> None:
        model, card, source, device = result
        self.state.device = device
        self.state.set_model(model, card, source, saved=True)
        from src_models.checkpoints import bundled_checkpoints
        if source and source not in bundled_checkpoints():
            add_recent_checkpoint(source)
        show_info(f"napari-dca: {card.architecture}{' + DCA' if _has_dca(model) else ''} ready on "
                  f"{device}.")

    # --- card ------------------------------------------------------------------------------------
    def _show_card(self, *_):
        if not alive(self):
            return
        self.card.setText(card_html(self.state))
        if self.state.model is not None:
            idx = self.backbone.findText(self.state.card.architecture) if self.state.card else -1
            if idx >= 0:
                self.backbone.setCurrentIndex(idx)
            self.dca.setChecked(_has_dca(self.state.model))
            if self.state.card is not None:
                i = self.task.findText(self.state.card.task)
                if i >= 0:
                    self.task.setCurrentIndex(i)


def peek_card(path):
    """A checkpoint's model card from its file header (no weights read), None if unreadable:
    the picker shows each model's measured speed before anything is loaded."""
    from src_models import checkpoints
    try:
        return checkpoints._read_card(checkpoints.resolve_checkpoint(path))
    except Exception:  # a moved or broken recent file: listed without details, refused on load
        return None


def _has_dca(model) -> bool:
    return getattr(model, "dca", None) is not None or any(
        type(m).__name__ == "DCA" for m in model.modules())


def card_html(state) -> str:
    """The model card as a short readable summary."""
    model, card = state.model, state.card
    if model is None:
        return "No model loaded."
    n_params = sum(p.numel() for p in model.parameters())
    esc = html.escape
    rows = []
    arch = card.architecture if card else type(model).__name__
    rows.append(("Model", f"{arch}{' + DCA' if _has_dca(model) else ''}, "
                          f"{n_params / 1e6:.2f} M parameters"))
    if state.checkpoint and state.saved:
        path = state.checkpoint
        try:
            from src_models.checkpoints import resolve_checkpoint
            p = resolve_checkpoint(path)
            size = f"{p.stat().st_size / 1e6:.1f} MB"
            rows.append(("Checkpoint", f"{p.name} ({size})"))
        except Exception:
            rows.append(("Checkpoint", str(path)))
    elif not state.saved:
        rows.append(("Checkpoint", f"not saved yet (fine-tuned from "
                                   f"{(card.parent if card else None) or 'a new model'}); "
                                   f"Fine-tune > 'Save…' keeps it"))
    else:
        rows.append(("Checkpoint", "none (new, untrained)"))
    rows.append(("Device", state.device))
    if card is not None:
        rows.append(("Task", f"{card.task}; classes {', '.join(map(str, card.class_names))}; "
                             f"tile {card.tile_size}"))
        if card.trained_on:
            rows.append(("Trained on", card.trained_on))
        if card.data_split:
            rows.append(("Split", ", ".join(f"{k}: {_short(v)}" for k, v in card.data_split.items())))
        speed = speed_of(card)
        if speed is not None:
            from src_models.checkpoints import bundled_checkpoints
            name = str(state.checkpoint or "")
            word = f"{variant(name)} variant: " if name in bundled_checkpoints() else ""
            rows.append(("Speed", word + speed_details(speed)))
        metrics = {k: v for k, v in (card.metrics or {}).items() if k != "speed_1000"}
        if metrics:
            rows.append(("Metrics", "; ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())))
        if card.parent:
            rows.append(("Fine-tuned from", card.parent))
        rows.append(("Corrections", corrections_summary(card.corrections)))
        rows.append(("Licence", card.licence or "not stated in the card"))
    # one short paragraph per row (not a table): it wraps to any dock width, nothing is clipped
    return "".join(f"<p style='margin:0 0 4px 0'><b>{esc(k)}</b>: {esc(str(v))}</p>" for k, v in rows)


def corrections_summary(corrections) -> str:
    """The card's corrections record in words ("2 rounds: 14 objects in 12,300 reviewed px, ...")."""
    if not corrections:
        return "none (not fine-tuned on corrections)"
    rounds = corrections.get("rounds") if isinstance(corrections, dict) else None
    if not isinstance(rounds, list):
        rounds = [corrections]
    parts = []
    for r in rounds:
        if not isinstance(r, dict):
            continue
        bits = []
        if "objects" in r:
            bits.append(f"{r['objects']} objects")
        if "reviewed_pixels" in r:
            bits.append(f"{int(r['reviewed_pixels']):,} reviewed px")
        steps = r.get("steps_done", r.get("steps"))
        if steps is not None:
            bits.append(f"{steps} steps")
        if "kept" in r:
            bits.append("kept" if r["kept"] else "rolled back")
        parts.append(", ".join(bits) or "1 round")
    n = len(parts)
    return f"{n} round{'s' if n != 1 else ''}: " + "; ".join(parts) if parts else "recorded"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return "(" + ", ".join(f"{k} {_fmt(x)}" for k, x in list(v.items())[:6]) + ")"
    return str(v)


def _short(v) -> str:
    if isinstance(v, (list, tuple)):   # an empty validation list: all-image weights
        return f"{len(v)} items" if len(v) > 4 else ", ".join(map(str, v)) or "none"
    return _fmt(v)
