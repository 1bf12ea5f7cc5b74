"""Attention widget: what the DCA module looks at, as overlays on the image.

- "where the query looks (SCA)": the spatial cross-attention row of the clicked token (mean of
  heads, or the head chosen);
- "attention received (SCA)": how much every location is attended to, per stage;
- "channel emphasis (CCA)": the stage's refined tokens weighted by the channel attention they get;
  the CCA channel matrix itself is drawn below, with a colour bar for the overlay.
Click on the canvas to set the query (optionally follow the mouse); the model runs on the tile around
the query (or on the visible region), so big images cost one tile.
"""
from __future__ import annotations

import time
import weakref

import napari
import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QLabel, QPushButton, QSizePolicy,
                            QVBoxLayout, QWidget)

from ._common import (OWNER_KEY, LayerCombo, UserError, check_channels, check_image, find_owned_layer,
                      layer_region, owned_metadata, show_error)
from ._jobs import JobPanel
from ._state import get_state

MAPS = {"query": "where the query looks (SCA)", "received": "attention received (SCA)",
        "channels": "channel emphasis (CCA)"}
COLORMAP = "inferno"
MAX_REGION = 2048  # pixels per side analysed at once when no query is given


def _has_dca(model) -> bool:
    return model is not None and any(type(m).__name__ == "DCA" for m in model.modules())


class AttentionPlot(QWidget):
    """Colour bar of the overlay and the CCA channel matrix of the chosen stage and head."""

    def __init__(self, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 3.0), dpi=90, constrained_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(240)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

    def show(self, overlay: np.ndarray | None, overlay_label: str, cca: np.ndarray | None,
             features: tuple, stage: int, head_label: str) -> None:
        import matplotlib as mpl

        fig = self.figure
        fig.clear()
        gs = fig.add_gridspec(2, 1, height_ratios=[1, 6])
        ax_bar = fig.add_subplot(gs[0])
        if overlay is not None and overlay.size:
            lo, hi = float(np.nanmin(overlay)), float(np.nanmax(overlay))
            hi = hi if hi > lo else lo + 1e-9
            norm = mpl.colors.Normalize(lo, hi)
            fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=COLORMAP), cax=ax_bar,
                         orientation="horizontal")
        else:
            ax_bar.set_axis_off()
        ax_bar.set_title(overlay_label, fontsize=8)
        ax_bar.tick_params(labelsize=7)
        ax = fig.add_subplot(gs[1])
        if cca is not None:
            im = ax.imshow(cca, aspect="auto", cmap="viridis", interpolation="nearest")
            # stage boundaries along the concatenated channels (per head: C_j / heads each)
            heads_total = cca.shape[1]
            total = sum(features)
            edge = 0.0
            for c in features[:-1]:
                edge += c * heads_total / total
                ax.axvline(edge - 0.5, color="white", lw=0.6)
            ax.set_xlabel("channels of all stages (keys)", fontsize=8)
            ax.set_ylabel(f"stage {stage + 1} channels", fontsize=8)
            ax.set_title(f"CCA, stage {stage + 1}, {head_label}", fontsize=8)
            ax.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no channel attention", ha="center", va="center", fontsize=8)
        self.canvas.draw_idle()


class AttentionWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)
        self.maps = None        # src_models.attention.AttentionMaps of the last run
        self.source = None      # image layer name of the last run
        self._pending = None    # query waiting for the running job to finish (follow mouse)
        self._last_move = 0.0

        self.image = LayerCombo(viewer, (Image,))
        self.kind = QComboBox()
        for key, label in MAPS.items():
            self.kind.addItem(label, key)
        self.stage = QComboBox()
        self.head = QComboBox()
        self.head.setToolTip("Attention head: spatial (SCA) maps and the channel (CCA) matrix; "
                             "a model with fewer CCA heads shows its last one")
        self.pick = QCheckBox("Click on the image to set the query")
        self.pick.setChecked(True)
        self.follow = QCheckBox("Follow the mouse")
        self.visible_only = QCheckBox("Whole visible region (else the tile around the query)")
        self.run_button = QPushButton("Show attention")
        self.jobs = JobPanel()
        self.plot = AttentionPlot()
        self.summary = QLabel("Click on the image (or press 'Show attention').")
        self.summary.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image)
        form.addRow("Map", self.kind)
        form.addRow("DCA stage", self.stage)
        form.addRow("Head", self.head)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.pick)
        layout.addWidget(self.follow)
        layout.addWidget(self.visible_only)
        layout.addWidget(self.run_button)
        layout.addWidget(self.jobs)
        layout.addWidget(self.summary)
        layout.addWidget(self.plot)
        layout.addStretch(1)

        self.run_button.clicked.connect(lambda: self.run(query=self._last_query()))
        for combo in (self.kind, self.stage, self.head):
            combo.currentIndexChanged.connect(lambda *_: self.show_maps())
        self.jobs.finished.connect(self._after_job)
        self.state.events.model.connect(self._on_model)
        self.state.events.version.connect(self._on_model)
        self._on_model()
        self._install_mouse_callbacks()

    # --- model / choices -------------------------------------------------------------------------
    def _on_model(self, *_):
        model = self.state.model
        dca = next((m for m in model.modules() if type(m).__name__ == "DCA"), None) if model else None
        self.stage.blockSignals(True)
        self.head.blockSignals(True)
        self.stage.clear()
        self.head.clear()
        if dca is not None:
            for i, c in enumerate(dca.features):
                self.stage.addItem(f"stage {i + 1} ({c} channels)", i)
            heads = 1
            block = dca.blocks[0] if len(dca.blocks) else None
            if block is not None and getattr(block, "channel_att", False):
                heads = max(heads, max(a.heads for a in block.channel_attn))
            if block is not None and getattr(block, "spatial_att", False):
                heads = max(heads, max(a.heads for a in block.spatial_attn))
            self.head.addItem("mean of heads", -1)
            for h in range(heads):
                self.head.addItem(f"head {h + 1}", h)
        self.stage.blockSignals(False)
        self.head.blockSignals(False)
        self.maps = None  # maps of another model are stale

    def _last_query(self):
        return None if self.maps is None else self.maps.query

    # --- mouse -----------------------------------------------------------------------------------
    def _install_mouse_callbacks(self) -> None:
        me = weakref.ref(self)

        def on_drag(viewer, event):
            widget = me()
            if widget is None or not widget.pick.isChecked():
                return
            start = np.asarray(event.position)
            moved = False
            yield
            while event.type == "mouse_move":
                moved = moved or np.linalg.norm(np.asarray(event.position) - start) > 2 / max(
                    viewer.camera.zoom, 1e-9)
                yield
            if not moved:  # a click, not a pan
                widget.query_at_world(start)

        def on_move(viewer, event):
            widget = me()
            if widget is None or not widget.follow.isChecked():
                return
            now = time.monotonic()
            if now - widget._last_move < 0.15:  # throttle: at most ~7 queries per second
                return
            widget._last_move = now
            widget.query_at_world(np.asarray(event.position))

        self.viewer.mouse_drag_callbacks.append(on_drag)
        self.viewer.mouse_move_callbacks.append(on_move)
        self._callbacks = (on_drag, on_move)

    def query_at_world(self, world) -> None:
        """Sets the query to the image pixel under world coordinates `world` and runs."""
        layer = self.image.layer()
        if layer is None:
            return
        data_pos = np.asarray(layer.world_to_data(world))[-2:]
        try:
            shape = check_image(layer).shape[:2]
        except UserError:
            return
        if not (0 <= data_pos[0] < shape[0] and 0 <= data_pos[1] < shape[1]):
            return
        self.run(query=(float(data_pos[0]), float(data_pos[1])))

    # --- running ---------------------------------------------------------------------------------
    def run(self, query=None) -> None:
        """Computes attention around `query` (image pixels (y, x)) or over the visible region."""
        try:
            layer = self.image.layer()
            data = check_image(layer)
            model = self.state.model
            if model is None:
                raise UserError("No model: load one in the Model widget first.")
            if not _has_dca(model):
                raise UserError("This model has no DCA module, so it has no attention to show: load a "
                                "checkpoint built with DCA, or a new model with 'DCA' ticked.")
            check_channels(layer, data, self.state.model, self.state.card)
        except UserError as err:
            show_error(str(err))
            return
        if self.jobs.busy:
            self._pending = query  # follow-mouse: only the latest query waits
            return
        from src_models.attention import tile_around

        card = self.state.card
        tile = int(getattr(card, "tile_size", 256) or 256)
        shape = data.shape[:2]
        if query is not None and not self.visible_only.isChecked():
            region = tile_around(query, shape, tile)
        else:
            rows, cols = layer_region(layer, shape)
            cy, cx = (rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2
            half = MAX_REGION // 2
            region = (max(rows.start, cy - half), min(rows.stop, cy + half),
                      max(cols.start, cx - half), min(cols.stop, cx + half))
            if query is not None and not (region[0] <= query[0] < region[1]
                                          and region[2] <= query[1] < region[3]):
                query = None
        device = self.state.device
        source = layer.name

        def job(report, cancel):
            from src_models.attention import attention_maps
            return attention_maps(model, data, card, query=query, region=region, device=device,
                                  progress=report, cancel=cancel)

        def done(maps):
            self.maps, self.source = maps, source
            if query is None and self.kind.currentData() == "query":
                self.kind.setCurrentIndex(self.kind.findData("received"))
            self.show_maps()

        self.jobs.run(job, done, "attention",
                      hint="Check that the image fits the model (channels) and try a smaller region.")

    def _after_job(self) -> None:
        if self._pending is not None:
            query, self._pending = self._pending, None
            self.run(query=query)

    # --- layers ----------------------------------------------------------------------------------
    def show_maps(self) -> None:
        """Overlay for the chosen map and stage (no model run), the query marker and the plot."""
        m = self.maps
        if m is None or self.source not in self.viewer.layers or not m.stages:
            return
        image_layer = self.viewer.layers[self.source]
        stage_idx = self.stage.currentData()
        stage_idx = 0 if stage_idx is None else min(int(stage_idx), len(m.stages) - 1)
        st = m.stages[stage_idx]
        kind = self.kind.currentData()
        if kind == "query" and st.query_map is None:
            kind = "received"
        head = self.head.currentData()
        head = -1 if head is None else int(head)
        overlay = st.channel_summary if kind == "channels" else st.sca_map(kind, head)
        if kind == "received":
            overlay = overlay * (m.grid[0] * m.grid[1])  # 1 = as much as the average location
        img_scale = np.asarray(image_layer.scale)[-2:]
        img_translate = np.asarray(image_layer.translate)[-2:]
        scale = img_scale * np.asarray(m.scale)
        translate = img_translate + img_scale * np.asarray(m.translate)
        name = f"{self.source} attention"
        layer = find_owned_layer(self.viewer, "attention", self.source)
        lo, hi = float(np.min(overlay)), float(np.max(overlay))
        limits = (lo, hi if hi > lo else lo + 1e-6)
        if layer is None:
            layer = self.viewer.add_image(overlay, name=name, scale=scale, translate=translate,
                                          colormap=COLORMAP, blending="additive", opacity=0.7,
                                          contrast_limits=limits,
                                          metadata=owned_metadata("attention", self.source))
        else:
            layer.data = overlay
            layer.scale, layer.translate = scale, translate
            layer.contrast_limits = limits
        layer.metadata[OWNER_KEY]["map"] = kind
        layer.metadata[OWNER_KEY]["stage"] = stage_idx
        self._show_query(image_layer)
        cca_head = min(head, st.cca.shape[0] - 1)
        cca = st.cca.mean(0) if head < 0 else st.cca[cca_head]
        head_label = "mean of heads" if head < 0 else f"head {cca_head + 1}"
        features = tuple(s.channels for s in m.stages)
        label = {"query": "attention from the query (fraction)",
                 "received": "attention received (1 = average)",
                 "channels": "channel-weighted response"}[kind]
        self.plot.show(overlay, label, cca, features, stage_idx, head_label)
        y0, y1, x0, x1 = m.region
        where = f"query (y {m.query[0]}, x {m.query[1]})" if m.query else "no query"
        self.summary.setText(f"{MAPS[kind]}, stage {stage_idx + 1}: region y {y0}-{y1}, x {x0}-{x1} "
                             f"({m.tiles} tile{'s' if m.tiles != 1 else ''}), {where}.")

    def _show_query(self, image_layer) -> None:
        m = self.maps
        layer = find_owned_layer(self.viewer, "query", self.source)
        if m.query is None:
            if layer is not None:
                layer.data = np.zeros((0, 2))
            return
        point = np.asarray([m.query], float)
        scale = np.asarray(image_layer.scale)[-2:]
        translate = np.asarray(image_layer.translate)[-2:]
        if layer is None:
            self.viewer.add_points(point, name=f"{self.source} attention query", scale=scale,
                                   translate=translate, size=8, face_color="cyan", border_color="white",
                                   metadata=owned_metadata("query", self.source))
            self.viewer.layers.selection.active = image_layer  # keep clicks going to the image
        else:
            layer.data = point
