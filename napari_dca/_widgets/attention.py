"""Attention widget: what the DCA module looks at, in plain words, as overlays on the image.

- "Where the clicked point looks": the spatial attention (SCA) of the clicked location over its
  tile (mean of heads, or one head under "Advanced");
- "Which places get looked at most": how much attention every location receives (1 = as much as
  the average location);
- under "Advanced": "channel emphasis (CCA)" and the CCA channel matrix.
The analysed tile is outlined on the canvas. Click-to-query is opt-in: it listens on the canvas only
while this widget is visible, the box is ticked and the active layer is not in a drawing mode (a
brush stroke in a Labels layer never runs attention); it never changes the active layer.
"""
from __future__ import annotations

import time
import weakref

import napari
import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QLabel, QPushButton, QSizePolicy,
                            QVBoxLayout, QWidget)
from superqt import QCollapsible

from ._common import (Connections, OWNER_KEY, LayerCombo, UserError, add_layer_keeping_selection, alive,
                      check_channels, check_plane_image, find_owned_layer, image_by_key, image_key,
                      layer_region, owned_metadata, show_error)
from ._jobs import JobPanel
from ._layout import scrolling, style_axes, theme_colors
from ._state import get_state

MAPS = {"query": "where the clicked point looks", "received": "which places get looked at most",
        "channels": "channel emphasis (CCA, advanced)"}
COLORMAP = "inferno"
MAX_REGION = 2048  # pixels per side analysed at once when no query is given
NAVIGATION_MODES = ("pan_zoom", "transform")  # other modes draw: clicks belong to the layer


def _has_dca(model) -> bool:
    return model is not None and any(type(m).__name__ == "DCA" for m in model.modules())


def drawing(viewer) -> bool:
    """Whether the active layer is in a mode where a click edits it (paint, fill, erase, polygon,
    add points / shapes, select...)."""
    layer = viewer.layers.selection.active
    mode = str(getattr(layer, "mode", "pan_zoom"))
    return layer is not None and mode not in NAVIGATION_MODES


def display_limits(overlay: np.ndarray, uniform: float) -> tuple[float, float]:
    """Colour limits from 0 to at least twice the uniform value: a near-uniform map stays one flat
    colour instead of being stretched to look structured."""
    hi = float(np.nanmax(overlay)) if overlay.size else uniform
    return 0.0, max(hi, 2.0 * uniform, 1e-9)


def analysed_tiles(region, tile: int) -> list[tuple[int, int, int, int]]:
    """The tiles attention_maps lays edge to edge over `region` (y0, y1, x0, x1), clipped to it."""
    y0, y1, x0, x1 = (int(v) for v in region)
    tile = max(1, int(tile))
    return [(ty, min(y1, ty + tile), tx, min(x1, tx + tile))
            for ty in range(y0, y1, tile) for tx in range(x0, x1, tile)]


def tiles_text(n: int) -> str:
    if n == 1:
        return "1 tile, outlined"
    return f"{n} tiles, each outlined; attention never crosses a tile's edge"


class AttentionPlot(QWidget):
    """Colour bar of the overlay (with where 'uniform' lies) and, optionally, the CCA matrix."""

    def __init__(self, viewer=None, with_cca: bool = False, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.colors = theme_colors(viewer)
        self.with_cca = with_cca
        self.figure = Figure(figsize=(3.0, 2.6 if with_cca else 0.9), dpi=90, constrained_layout=True)
        self.figure.patch.set_facecolor(self.colors["background"])
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(200 if with_cca else 70)
        self.canvas.setMaximumHeight(260 if with_cca else 90)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

    def show_bar(self, limits: tuple[float, float], label: str, uniform: float | None) -> None:
        import matplotlib as mpl

        fig = self.figure
        fig.clear()
        ax = fig.add_subplot(111)
        norm = mpl.colors.Normalize(*limits)
        fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=COLORMAP), cax=ax, orientation="horizontal")
        if uniform is not None:
            ax.axvline(uniform, color=self.colors["foreground"], lw=1.5)
        ax.set_title(label, fontsize=8, pad=12)
        style_axes(ax, self.colors)
        self.canvas.draw_idle()

    def show_cca(self, cca: np.ndarray | None, features: tuple, stage: int, head_label: str) -> None:
        fig = self.figure
        fig.clear()
        ax = fig.add_subplot(111)
        if cca is not None:
            im = ax.imshow(cca, aspect="auto", cmap="viridis", interpolation="nearest")
            heads_total = cca.shape[1]
            total = sum(features)
            edge = 0.0
            for c in features[:-1]:  # stage boundaries along the concatenated channels
                edge += c * heads_total / total
                ax.axvline(edge - 0.5, color="white", lw=0.6)
            ax.set_xlabel("channels of all stages", fontsize=8)
            ax.set_ylabel(f"stage {stage + 1} channels", fontsize=8)
            ax.set_title(f"channel attention (CCA), stage {stage + 1}, {head_label}", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7,
                                                                colors=self.colors["foreground"])
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no channel attention", ha="center", va="center", fontsize=8,
                    color=self.colors["foreground"])
        style_axes(ax, self.colors)
        self.canvas.draw_idle()


class AttentionWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)
        self.maps = None        # src_models.attention.AttentionMaps of the last run
        self.source = None      # stable id (image_key) of the image of the last run
        self.plane = ()         # the plane of a stack image that the last run analysed
        self._pending = None    # query waiting for the running job to finish (follow mouse)
        self._last_move = 0.0
        self._callbacks = None  # (drag, move) while installed on the canvas

        self.image = LayerCombo(viewer, (Image,), follow_new=True)
        self.kind = QComboBox()
        for key, label in MAPS.items():
            self.kind.addItem(label, key)
        self.stage = QComboBox()
        self.stage.setToolTip("Depth in the network: stage 1 sees fine detail, the last stage "
                              "coarse context")
        self.head = QComboBox()
        self.head.setToolTip("Attention head: spatial maps and the channel (CCA) matrix; "
                             "a model with fewer CCA heads shows its last one")
        self.pick = QCheckBox("Click on the image to query")
        self.pick.setToolTip("A click shows where that point looks; only while this panel is "
                             "visible and the active layer is not being painted or drawn on")
        self.pick.setChecked(False)  # opt-in
        self.follow = QCheckBox("Follow the mouse")
        self.visible_only = QCheckBox("Whole visible region")
        self.visible_only.setToolTip("Analyse everything the canvas shows (else the tile "
                                     "around the point)")
        self.run_button = QPushButton("Show attention")
        self.jobs = JobPanel(state=self.state, unit="tile")
        self.plot = AttentionPlot(viewer)
        self.cca_plot = AttentionPlot(viewer, with_cca=True)
        self.summary = QLabel("Tick 'Click on the image to query' and click a spot, or press "
                              "'Show attention' for the visible region.")
        self.summary.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image)
        form.addRow("Show", self.kind)
        form.addRow("Depth", self.stage)
        advanced = QCollapsible("Advanced")
        adv_inner = QWidget()
        adv_form = QFormLayout(adv_inner)
        adv_form.addRow("Head", self.head)
        adv_form.addRow(self.cca_plot)
        advanced.addWidget(adv_inner)
        self.advanced = advanced
        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addWidget(self.pick)
        layout.addWidget(self.follow)
        layout.addWidget(self.visible_only)
        layout.addWidget(self.run_button)
        layout.addWidget(self.jobs)
        layout.addWidget(self.summary)
        layout.addWidget(self.plot)
        layout.addWidget(advanced)
        layout.addStretch(1)
        scrolling(self, layout)

        self.run_button.clicked.connect(lambda: self.run(query=self._last_query()))
        for combo in (self.kind, self.stage, self.head):
            combo.currentIndexChanged.connect(lambda *_: self.show_maps())
        self.pick.toggled.connect(lambda *_: self._update_callbacks())
        self.follow.toggled.connect(lambda *_: self._update_callbacks())
        self.jobs.finished.connect(self._after_job)
        self._connections = Connections([(self.state.events.model, self._on_model),
                                         (self.state.events.version, self._on_model)])
        self.destroyed.connect(lambda *_: self._teardown())
        self._on_model()

    def _teardown(self):
        self._remove_callbacks()
        self._connections.disconnect()

    # --- model / choices -------------------------------------------------------------------------
    def _on_model(self, *_):
        if not alive(self):
            return
        model = self.state.model
        dca = next((m for m in model.modules() if type(m).__name__ == "DCA"), None) if model else None
        self.stage.blockSignals(True)
        self.head.blockSignals(True)
        self.stage.clear()
        self.head.clear()
        if dca is not None:
            n = len(dca.features)
            for i, c in enumerate(dca.features):
                depth = "fine detail" if i == 0 else "coarse context" if i == n - 1 else "middle"
                self.stage.addItem(f"stage {i + 1} of {n} ({depth})", i)
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

    # --- mouse: only while visible, opted in, and not drawing ------------------------------------
    def showEvent(self, event):
        super().showEvent(event)
        self._update_callbacks()

    def hideEvent(self, event):
        super().hideEvent(event)
        self._remove_callbacks()

    def closeEvent(self, event):
        self._remove_callbacks()
        super().closeEvent(event)

    @property
    def listening(self) -> bool:
        return self._callbacks is not None

    def _update_callbacks(self) -> None:
        if self.isVisible() and (self.pick.isChecked() or self.follow.isChecked()):
            self._install_callbacks()
        else:
            self._remove_callbacks()

    def _install_callbacks(self) -> None:
        if self._callbacks is not None:
            return
        me = weakref.ref(self)

        def on_drag(viewer, event):
            widget = me()
            if widget is None or not alive(widget) or not widget.pick.isChecked() or drawing(viewer):
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
            if (widget is None or not alive(widget) or not widget.follow.isChecked()
                    or drawing(viewer) or event.buttons):
                return
            now = time.monotonic()
            if now - widget._last_move < 0.15:  # throttle: at most ~7 queries per second
                return
            widget._last_move = now
            widget.query_at_world(np.asarray(event.position))

        self.viewer.mouse_drag_callbacks.append(on_drag)
        self.viewer.mouse_move_callbacks.append(on_move)
        self._callbacks = (on_drag, on_move)

    def _remove_callbacks(self) -> None:
        if self._callbacks is None:
            return
        on_drag, on_move = self._callbacks
        for callbacks, cb in ((self.viewer.mouse_drag_callbacks, on_drag),
                              (self.viewer.mouse_move_callbacks, on_move)):
            if cb in callbacks:
                callbacks.remove(cb)
        self._callbacks = None

    def query_at_world(self, world) -> None:
        """Sets the query to the image pixel under world coordinates `world` and runs."""
        layer = self.image.layer()
        if layer is None:
            return
        data_pos = np.asarray(layer.world_to_data(world))[-2:]
        try:
            shape = check_plane_image(self.viewer, layer)[0].shape[:2]
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
            data, plane, _ = check_plane_image(self.viewer, layer)  # a stack: the plane on screen
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
            rows, cols = layer_region(layer, shape, self.viewer)
            cy, cx = (rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2
            half = MAX_REGION // 2
            region = (max(rows.start, cy - half), min(rows.stop, cy + half),
                      max(cols.start, cx - half), min(cols.stop, cx + half))
            if query is not None and not (region[0] <= query[0] < region[1]
                                          and region[2] <= query[1] < region[3]):
                query = None
        device = self.state.device
        source = image_key(layer)

        def job(report, cancel):
            from src_models.attention import attention_maps
            return attention_maps(model, data, card, query=query, region=region, device=device,
                                  progress=report, cancel=cancel)

        def done(maps):
            if image_by_key(self.viewer, source) is None:
                return  # the image was closed meanwhile
            self.maps, self.source, self.plane = maps, source, plane
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
        """Overlay for the chosen map and stage (no model run), the analysed tile's outline, the
        query marker and the plots. Never changes the active layer."""
        m = self.maps
        image_layer = image_by_key(self.viewer, self.source) if self.source else None
        if m is None or image_layer is None or not m.stages:
            return
        stage_idx = self.stage.currentData()
        stage_idx = 0 if stage_idx is None else min(int(stage_idx), len(m.stages) - 1)
        st = m.stages[stage_idx]
        kind = self.kind.currentData()
        if kind == "query" and st.query_map is None:
            kind = "received"
        head = self.head.currentData()
        head = -1 if head is None else int(head)
        cells = m.grid[0] * m.grid[1]  # locations of one tile at this map's resolution
        if kind == "channels":
            overlay = st.channel_summary
            lo, hi = float(np.min(overlay)), float(np.max(overlay))
            limits, uniform = (lo, hi if hi > lo else lo + 1e-6), None
        elif kind == "received":
            overlay = st.sca_map(kind, head) * cells  # 1 = as much as the average location
            uniform = 1.0
            limits = display_limits(overlay, uniform)
        else:
            overlay = st.sca_map(kind, head)          # fractions of the point's attention
            uniform = 1.0 / cells
            limits = display_limits(overlay, uniform)
        img_scale = np.asarray(image_layer.scale)[-2:]
        img_translate = np.asarray(image_layer.translate)[-2:]
        scale = img_scale * np.asarray(m.scale)
        translate = img_translate + img_scale * np.asarray(m.translate)
        if self.plane:  # one plane of a stack: a one-plane layer placed at it, empty elsewhere
            lead_scale, lead_translate = self._plane_placement(image_layer)
            overlay = overlay[(None,) * len(self.plane)]
            scale = np.concatenate([lead_scale, scale])
            translate = np.concatenate([lead_translate, translate])
        layer = find_owned_layer(self.viewer, "attention", self.source)
        if layer is None:
            layer = add_layer_keeping_selection(
                self.viewer, "image", overlay, name=f"{image_layer.name} attention", scale=scale,
                translate=translate, colormap=COLORMAP, blending="additive", opacity=0.7,
                contrast_limits=limits, metadata=owned_metadata("attention", self.source))
        else:
            layer.data = overlay
            layer.scale, layer.translate = scale, translate
            layer.contrast_limits = limits
        layer.metadata[OWNER_KEY]["map"] = kind
        layer.metadata[OWNER_KEY]["stage"] = stage_idx
        self._show_query(image_layer)
        self._outline(image_layer, [m.query_tile] if kind == "query" and m.query_tile
                      else analysed_tiles(m.region, m.tile_size))
        cca_head = min(head, st.cca.shape[0] - 1)
        cca = st.cca.mean(0) if head < 0 else st.cca[cca_head]
        head_label = "mean of heads" if head < 0 else f"head {cca_head + 1}"
        features = tuple(s.channels for s in m.stages)
        label = {"query": "share of the point's attention (line: even)",
                 "received": "times the average location (line: even)",
                 "channels": "channel-weighted response"}[kind]
        self.plot.show_bar(limits, label, uniform)
        self.cca_plot.show_cca(cca, features, stage_idx, head_label)
        y0, y1, x0, x1 = m.region
        flat = uniform is not None and float(np.nanmax(overlay)) < 1.5 * uniform
        if kind == "query" and m.query:
            where = (f"Where the point at y {m.query[0]}, x {m.query[1]} looks, within its tile "
                     f"(outlined; attention never leaves the tile)")
        elif kind == "received":
            where = (f"Which places get looked at most in y {y0}-{y1}, x {x0}-{x1} "
                     f"({tiles_text(m.tiles)})")
        else:
            where = f"Channel emphasis in y {y0}-{y1}, x {x0}-{x1} ({tiles_text(m.tiles)})"
        note = " The map is close to even: this stage spreads its attention evenly here." if flat else ""
        if self.plane:
            where += f" of plane {', '.join(map(str, self.plane))}"
        self.summary.setText(f"{where}, stage {stage_idx + 1}, "
                             f"{'mean of heads' if head < 0 else f'head {head + 1}'}.{note}")

    def _plane_placement(self, image_layer) -> tuple[np.ndarray, np.ndarray]:
        """Scale and translate of the leading (stack) axes that put a one-plane layer on the
        analysed plane of `image_layer`."""
        lead = len(self.plane)
        lead_scale = np.asarray(image_layer.scale)[:lead]
        return lead_scale, np.asarray(image_layer.translate)[:lead] + np.asarray(self.plane) * lead_scale

    def _on_plane(self, image_layer, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(points (n, 2) of image pixels -> (n, lead + 2) on the analysed plane, scale, translate):
        markers of a stack's plane are drawn on that plane only."""
        scale = np.asarray(image_layer.scale)[-2:]
        translate = np.asarray(image_layer.translate)[-2:]
        if not self.plane:
            return points, scale, translate
        lead = len(self.plane)
        lifted = np.concatenate([np.tile(np.asarray(self.plane, float), (len(points), 1)), points], 1)
        return (lifted, np.asarray(image_layer.scale)[-(lead + 2):],
                np.asarray(image_layer.translate)[-(lead + 2):])

    def _outline(self, image_layer, boxes) -> None:
        """A rectangle around each analysed tile (image pixels (y0, y1, x0, x1)): what the text
        counts is what the canvas shows."""
        rects = [np.array([[y0 - 0.5, x0 - 0.5], [y0 - 0.5, x1 - 0.5], [y1 - 0.5, x1 - 0.5],
                           [y1 - 0.5, x0 - 0.5]], float) for y0, y1, x0, x1 in boxes]
        rects = [self._on_plane(image_layer, r)[0] for r in rects]
        layer = find_owned_layer(self.viewer, "attention tile", self.source)
        _, scale, translate = self._on_plane(image_layer, np.zeros((0, 2)))
        name = f"{image_layer.name} analysed tile{'s' if len(rects) != 1 else ''}"
        if layer is None:
            add_layer_keeping_selection(
                self.viewer, "shapes", rects, shape_type="rectangle", edge_color="cyan",
                face_color="transparent", edge_width=2, name=name,
                scale=scale, translate=translate, metadata=owned_metadata("attention tile", self.source))
        else:
            layer.data = rects
            layer.shape_type = ["rectangle"] * len(rects)
            layer.edge_color = "cyan"
            layer.name = name

    def _show_query(self, image_layer) -> None:
        m = self.maps
        layer = find_owned_layer(self.viewer, "query", self.source)
        if m.query is None:
            if layer is not None:
                layer.data = np.zeros((0, layer.ndim))
            return
        point, scale, translate = self._on_plane(image_layer, np.asarray([m.query], float))
        if layer is None:
            add_layer_keeping_selection(
                self.viewer, "points", point, name=f"{image_layer.name} attention query", scale=scale,
                translate=translate, size=8, face_color="cyan", border_color="white",
                metadata=owned_metadata("query", self.source))
        else:
            layer.data = point
