"""Small helpers the widgets share: messages, layer lookup, devices, worker bookkeeping."""
from __future__ import annotations

import os

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import QComboBox

__all__ = ["show_error", "show_info", "show_warning", "UserError", "find_owned_layer", "LayerCombo",
           "owned_metadata", "available_devices", "resolve_device", "check_image", "check_channels",
           "worker_threads", "layer_region", "image_key", "image_by_key", "is_edited", "track_edits",
           "alive", "add_layer_keeping_selection", "find_owned_layers", "unedited_owned_layer", "owner", "current_plane",
           "check_plane_image", "shapes_region", "warm_up", "one_refresh", "new_labels_layer"]

OWNER_KEY = "napari_dca"  # layer.metadata[OWNER_KEY] = {"role": ..., "source": ...} marks our layers
IMAGE_KEY = "napari_dca_image_id"  # a stable id in an image layer's metadata: survives renaming


class UserError(ValueError):
    """Bad input the user can fix; its message says what to do next."""


def image_key(layer) -> str:
    """The stable id of an image layer (made on first use, kept in its metadata): results and the
    plugin's layers refer to an image by this, never by its name, so renaming keeps them."""
    key = layer.metadata.get(IMAGE_KEY)
    if not isinstance(key, str):
        import uuid
        key = uuid.uuid4().hex
        layer.metadata[IMAGE_KEY] = key
    return key


def image_by_key(viewer, key: str):
    """The image layer with stable id `key`, or None (closed meanwhile)."""
    for layer in viewer.layers:
        if layer.metadata.get(IMAGE_KEY) == key:
            return layer
    return None


def owner(layer) -> dict:
    meta = layer.metadata.get(OWNER_KEY)
    return meta if isinstance(meta, dict) else {}


def find_owned_layers(viewer, role: str, source: str) -> list:
    """The layers this plugin made for `role` ("instances", "probabilities", ...) of image `source`
    (its stable id, see `image_key`)."""
    return [layer for layer in viewer.layers
            if owner(layer).get("role") == role and owner(layer).get("source") == source]


def find_owned_layer(viewer, role: str, source: str):
    found = find_owned_layers(viewer, role, source)
    return found[-1] if found else None


def unedited_owned_layer(viewer, role: str, source: str, shape: tuple | None = None):
    """The latest layer this plugin made for `role` of image `source` that the user has not
    edited (an edited one is theirs: never rewritten), of data shape `shape` when given; or None."""
    found = [layer for layer in find_owned_layers(viewer, role, source) if not is_edited(layer)
             and (shape is None or tuple(layer.data.shape) == tuple(shape))]
    return found[-1] if found else None


def owned_metadata(role: str, source: str, **extra) -> dict:
    return {OWNER_KEY: {"role": role, "source": source, **extra}}


# --- the user's edits ------------------------------------------------------------------------------
def is_edited(layer) -> bool:
    """Whether the user painted, filled, erased or drew a polygon in this Labels layer (napari's
    paint / labels_update events, or anything in its undo history)."""
    return bool(owner(layer).get("edited")) or bool(getattr(layer, "_undo_history", None))


def track_edits(layer) -> None:
    """From the user's first edit on, mark the layer as edited: no plugin action rewrites it."""
    def edited(*_):
        meta = owner(layer)
        if meta and not meta.get("edited"):
            meta["edited"] = True
    layer.events.paint.connect(edited)
    layer.events.labels_update.connect(edited)


def alive(widget) -> bool:
    """False once Qt has deleted the C++ side of `widget` (e.g. the viewer was closed)."""
    try:
        widget.objectName()
        return True
    except RuntimeError:
        return False


def one_refresh(layer):
    """Context in which several changes to `layer` (data, scale, translate, contour) cause no
    refresh; refresh once afterwards. Each napari setter re-slices the layer and redraws its
    thumbnail and contours on the GUI thread, which for a big Labels layer takes ~0.2 s each."""
    import contextlib
    block = getattr(layer, "_block_refresh", None)  # napari >= 0.5; without it, refresh as usual
    return block() if callable(block) else contextlib.nullcontext()


def new_labels_layer(viewer, data, contours: bool = False, select: bool = True, **kwargs):
    """viewer.add_labels(data, **kwargs) drawn as outlines when `contours`, sliced and drawn once
    (setting `contour` after adding would refresh it a second time). Without `select` the active
    layer stays the active one (e.g. the user's corrected layer, which they go on painting)."""
    from napari.layers import Labels

    layer = Labels(data, **kwargs)
    if contours:
        with one_refresh(layer):
            layer.contour = 1
    if select:
        viewer.add_layer(layer)
        return layer
    with _kept_selection(viewer):
        viewer.add_layer(layer)
    return layer


class _kept_selection:
    """Context in which layers added to the viewer do not stay the active one: napari selects a
    new layer, and the layer that was active before is selected again afterwards. (Inserting it
    unselected would spare napari one switch of the layer controls, but only through a private
    attribute that napari forbids plugins to use.)"""

    def __init__(self, viewer):
        self.layers = viewer.layers

    def __enter__(self):
        self.active = self.layers.selection.active
        return self

    def __exit__(self, *exc):
        active = self.active
        if active is not None and active in self.layers and self.layers.selection.active is not active:
            self.layers.selection.active = active
        return False


def add_layer_keeping_selection(viewer, kind: str, data, **kwargs):
    """viewer.add_<kind>(...) without making the new layer the active one (the user's brush stays
    on the layer they were painting)."""
    with _kept_selection(viewer):
        return getattr(viewer, f"add_{kind}")(data, **kwargs)


def check_image(layer) -> np.ndarray:
    """The 2D image of an Image layer as an (H, W) or (H, W, C) array, or a UserError saying why not."""
    if layer is None:
        raise UserError("No image layer: open an H&E image (File > Open, or File > Open Sample > "
                        "napari-dca) and pick it in the widget.")
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    rgb = bool(getattr(layer, "rgb", False))
    spatial = data.ndim - (1 if rgb else 0)
    if spatial != 2:
        what = "an RGB stack" if rgb else "a stack"
        raise UserError(f"'{layer.name}' is {what} of shape {tuple(data.shape)}; this works on "
                        f"2D images (the Segment widget does the plane on screen). Take one plane "
                        f"first (e.g. layer.data[i] in the console, or Image > Split stack).")
    if rgb and data.shape[-1] not in (3, 4):
        raise UserError(f"'{layer.name}' has {data.shape[-1]} colour channels; expected RGB or RGBA.")
    return data


def current_plane(viewer, layer) -> tuple[int, ...]:
    """The indices of the plane of a stack `layer` ((T, Y, X), (Z, Y, X, 3), ...) that the viewer
    shows now (from viewer.dims), as its leading data indices; () for a 2D image. UserError when
    the canvas does not show the image's last two axes (e.g. a rolled or 3D view)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    rgb = bool(getattr(layer, "rgb", False))
    lead = data.ndim - (1 if rgb else 0) - 2
    if lead <= 0:
        return ()
    displayed = tuple(viewer.dims.displayed)
    ndim = viewer.dims.ndim
    if len(displayed) != 2 or tuple(d - (ndim - layer.ndim) for d in displayed) != (layer.ndim - 2,
                                                                                    layer.ndim - 1):
        raise UserError(f"'{layer.name}' is a stack and the canvas does not show one of its planes "
                        f"(rows x columns); switch to the 2D view with its last two axes shown.")
    point = np.asarray(layer.world_to_data(viewer.dims.point))[:lead]
    return tuple(int(np.clip(np.round(v), 0, n - 1)) for v, n in zip(point, data.shape[:lead]))


def check_plane_image(viewer, layer):
    """-> (2D image of the plane the viewer shows, plane indices, stack shape of the labels):
    for a 2D image (image, (), ()); for a stack (stack[plane], plane, stack's (..., Y, X))."""
    if layer is None:
        return check_image(layer), (), ()
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    rgb = bool(getattr(layer, "rgb", False))
    if data.ndim - (1 if rgb else 0) <= 2:
        return check_image(layer), (), ()
    if getattr(layer, "multiscale", False):
        raise UserError(f"'{layer.name}' is a multiscale stack; napari-dca segments 2D slides and "
                        f"stacks of plain planes.")
    if rgb and data.shape[-1] not in (3, 4):
        raise UserError(f"'{layer.name}' has {data.shape[-1]} colour channels; expected RGB or RGBA.")
    plane = current_plane(viewer, layer)
    stack_shape = tuple(int(n) for n in (data.shape[:-1] if rgb else data.shape))
    return data[plane], plane, stack_shape


def check_channels(layer, data, model, card) -> None:
    """UserError when the model cannot take this image's channels (e.g. a 4-channel checkpoint and
    an RGB image). Grayscale goes into RGB models and RGB into grayscale ones (averaged)."""
    config = getattr(model, "config", None) or {}
    wanted = int(getattr(card, "in_channels", None) or config.get("in_channels", 3))
    rgb = bool(getattr(layer, "rgb", False))
    have = (3 if data.shape[-1] == 4 else data.shape[-1]) if rgb else 1
    if have == wanted or have == 1 or wanted == 1:
        return
    raise UserError(f"The current model takes {wanted}-channel images but '{layer.name}' has {have} "
                    f"channels. Load a checkpoint made for {'RGB H&E' if have == 3 else f'{have}-channel'} "
                    f"images in the Model widget (e.g. the bundled 'nuclei' or 'glands').")


def visible_box(viewer, layer):
    """(lo, hi) level-0 pixel coordinates (rows, cols) of what the canvas shows of `layer`, from
    the camera (napari's corner pixels of a multiscale layer are widened to whole chunks, which
    can be a whole level); None without a 2D canvas."""
    size = getattr(getattr(viewer, "canvas", None), "size", None) or getattr(viewer, "_canvas_size", None)
    try:
        if size is None or len(viewer.dims.displayed) != 2 or min(size) < 2:
            return None
        center = np.asarray(viewer.camera.center, float)[-2:]
        half = np.asarray(size, float)[-2:] / (2.0 * float(viewer.camera.zoom))
    except Exception:
        return None
    scale, translate = np.asarray(layer.scale, float)[-2:], np.asarray(layer.translate, float)[-2:]
    # pixel i covers [i - 0.5, i + 0.5) in data coordinates
    return (center - half - translate) / scale + 0.5, (center + half - translate) / scale + 0.5


def layer_region(layer, shape: tuple[int, int], viewer=None) -> tuple[slice, slice]:
    """The part of `layer` the canvas shows now, as (rows, cols) slices of its data, clipped to
    `shape`; the whole image when nothing sensible is known (no canvas yet, region under 16 px).
    With `viewer`, from its camera; else from the layer's corner pixels."""
    box = visible_box(viewer, layer) if viewer is not None else None
    if box is not None:
        lo = np.clip(np.floor(box[0]), 0, shape).astype(int)
        hi = np.clip(np.ceil(box[1]), 0, shape).astype(int)
        if np.any(hi - lo < 16):
            return slice(0, shape[0]), slice(0, shape[1])
        return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))
    corners = np.asarray(getattr(layer, "corner_pixels", np.zeros((2, 0))))
    if corners.shape[-1] < 2:
        return slice(0, shape[0]), slice(0, shape[1])
    lo, hi = corners[0, -2:].astype(float), corners[1, -2:].astype(float) + 1
    if getattr(layer, "multiscale", False):
        # a multiscale layer's corner pixels are in its current level: scale them to level 0,
        # the level `shape` (and the segmentation) is in
        level = int(getattr(layer, "data_level", 0))
        factors = np.asarray(layer.downsample_factors, float)[level][-2:]
        lo, hi = lo * factors, hi * factors
    lo = np.clip(np.floor(lo), 0, shape).astype(int)
    hi = np.clip(np.ceil(hi), 0, shape).astype(int)
    if np.any(hi - lo < 16):
        return slice(0, shape[0]), slice(0, shape[1])
    return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))


def available_devices() -> list[tuple[str, str]]:
    """[(label shown, torch device)], best first, always ending with the CPU."""
    import torch
    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.append((f"CUDA: {torch.cuda.get_device_name(i)}", f"cuda:{i}"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(("MPS (Apple GPU)", "mps"))
    out.append((f"CPU ({os.cpu_count()} cores)", "cpu"))
    return out


def resolve_device(choice: str) -> str:
    return available_devices()[0][1] if choice in ("", "auto") else choice


class worker_threads:
    """Context manager for code running in a worker: fewer torch CPU threads than cores, so the
    GUI thread keeps one core to itself (restored afterwards)."""

    def __init__(self, reserve: int = 1):
        self.reserve = reserve

    def __enter__(self):
        import torch
        self._old = torch.get_num_threads()
        n = max(1, min(self._old, (os.cpu_count() or 2) - self.reserve))
        torch.set_num_threads(n)
        return self

    def __exit__(self, *exc):
        import torch
        torch.set_num_threads(self._old)
        return False


class Connections:
    """Signal/slot pairs a widget connects when it is made and lets go when it goes: the shared
    state and the viewer outlive every widget, and a slot of a deleted widget must not fire."""

    def __init__(self, pairs):
        self.pairs = tuple(pairs)
        for signal, slot in self.pairs:
            signal.connect(slot)

    def disconnect(self, *_):
        for signal, slot in self.pairs:
            try:
                signal.disconnect(slot)
            except Exception:  # already gone with the viewer
                pass


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of some kinds, kept in sync with the layer list.

    Items refer to the layer objects (a renamed layer stays selected). Layers this plugin made
    (outputs) are left out unless `include_owned`; `follow_new` selects a newly added layer."""

    def __init__(self, viewer, kinds: tuple, none_text: str | None = None,
                 include_owned: bool = False, exclude_roles: tuple = (), follow_new: bool = False,
                 parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.kinds = kinds
        self.none_text = none_text
        self.include_owned = include_owned
        self.exclude_roles = exclude_roles
        self.follow_new = follow_new
        self._layers: list = []
        self._events = Connections([(viewer.layers.events.inserted, self._on_inserted),
                                    (viewer.layers.events.removed, self.refresh),
                                    (viewer.layers.events.moved, self.refresh),
                                    (viewer.layers.events, self._on_layer_event)])
        self.destroyed.connect(self._events.disconnect)
        self.refresh()

    def _accept(self, layer) -> bool:
        if not isinstance(layer, self.kinds):
            return False
        meta = owner(layer)
        if not meta:
            return True
        return self.include_owned and meta.get("role") not in self.exclude_roles

    def _on_inserted(self, event) -> None:
        if not alive(self):
            return
        self.refresh()
        layer = getattr(event, "value", None)
        if self.follow_new and layer is not None and self._accept(layer):
            self.set_layer(layer)

    def _on_layer_event(self, event) -> None:
        if event.type == "name" and alive(self):
            self.refresh()

    def refresh(self, *_) -> None:
        if not alive(self):
            return
        current = self.layer()
        self.blockSignals(True)
        self.clear()
        self._layers = ([None] if self.none_text is not None else []) + [
            layer for layer in self.viewer.layers if self._accept(layer)][::-1]
        for layer in self._layers:
            self.addItem(self.none_text if layer is None else layer.name)
        idx = next((i for i, layer in enumerate(self._layers) if layer is current and layer is not None), 0)
        self.setCurrentIndex(idx)
        self.blockSignals(False)
        if self.layer() is not current:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self):
        i = self.currentIndex()
        if not 0 <= i < len(self._layers):
            return None
        layer = self._layers[i]
        return layer if layer is not None and layer in self.viewer.layers else None

    def set_layer(self, layer) -> None:
        for i, item in enumerate(self._layers):
            if item is layer:
                self.setCurrentIndex(i)
                return

    def select(self, name: str) -> None:
        idx = self.findText(name)
        if idx >= 0:
            self.setCurrentIndex(idx)


def shapes_region(image_layer, shapes_layer, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The bounding box of the shapes drawn in `shapes_layer`, as (rows, cols) slices of the
    image's pixels (level 0 of a multiscale image), clipped to `shape`."""
    if shapes_layer is None or len(shapes_layer.data) == 0:
        name = getattr(shapes_layer, "name", "the Shapes layer")
        raise UserError(f"'{name}' has no shapes: draw a rectangle around the region to segment.")
    points = np.concatenate([np.asarray(v, float)[:, -2:] for v in shapes_layer.data])
    world = points * np.asarray(shapes_layer.scale)[-2:] + np.asarray(shapes_layer.translate)[-2:]
    pixels = (world - np.asarray(image_layer.translate)[-2:]) / np.asarray(image_layer.scale)[-2:]
    lo = np.clip(np.floor(pixels.min(0) + 0.5), 0, shape).astype(int)
    hi = np.clip(np.ceil(pixels.max(0) + 0.5), 0, shape).astype(int)
    if np.any(hi - lo < 1):
        raise UserError(f"The shapes in '{shapes_layer.name}' do not overlap '{image_layer.name}'.")
    return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))


_WARMED = []


def warm_up() -> None:
    """Prepares what napari's first Labels layer needs in a background thread, once per process:
    pandas (for layer features; imported on the GUI thread it froze the viewer for ~1 s at the
    first result) and vispy's line dash patterns."""
    if _WARMED:
        return
    _WARMED.append(True)
    import threading

    def work():
        try:
            import pandas  # noqa: F401
        except Exception:
            pass
        try:
            # vispy computes its 13 line dash patterns (pure numpy, lru-cached for the process)
            # when the first Labels layer's outline overlays are made: ~0.45 s of the GUI thread
            # at the first result, unless they are already in the cache
            from vispy.visuals.line.dash_atlas import DashAtlas
            DashAtlas()
        except Exception:
            pass
    threading.Thread(target=work, name="napari-dca warm-up", daemon=True).start()
