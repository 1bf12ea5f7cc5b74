"""Small helpers the widgets share: messages, layer lookup, devices, worker bookkeeping."""
from __future__ import annotations

import os

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import QComboBox

__all__ = ["show_error", "show_info", "show_warning", "UserError", "find_owned_layer", "LayerCombo",
           "owned_metadata", "available_devices", "resolve_device", "check_image", "check_channels",
           "worker_threads", "layer_region"]

OWNER_KEY = "napari_dca"  # layer.metadata[OWNER_KEY] = {"role": ..., "source": ...} marks our layers


class UserError(ValueError):
    """Bad input the user can fix; its message says what to do next."""


def find_owned_layer(viewer, role: str, source: str):
    """The layer this plugin made for `role` ("labels", "probabilities", ...) of image `source`."""
    for layer in viewer.layers:
        meta = layer.metadata.get(OWNER_KEY)
        if isinstance(meta, dict) and meta.get("role") == role and meta.get("source") == source:
            return layer
    return None


def owned_metadata(role: str, source: str, **extra) -> dict:
    return {OWNER_KEY: {"role": role, "source": source, **extra}}


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
        raise UserError(f"'{layer.name}' is {what} of shape {tuple(data.shape)}; napari-dca segments "
                        f"2D images. Take one plane first (e.g. layer.data[i] in the console, or "
                        f"Image > Split stack).")
    if rgb and data.shape[-1] not in (3, 4):
        raise UserError(f"'{layer.name}' has {data.shape[-1]} colour channels; expected RGB or RGBA.")
    return data


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


def layer_region(layer, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The part of `layer` the canvas shows now, as (rows, cols) slices of its data, clipped to
    `shape`; the whole image when nothing sensible is known (no canvas yet, region under 16 px)."""
    corners = np.asarray(getattr(layer, "corner_pixels", np.zeros((2, 0))))
    if corners.shape[-1] < 2:
        return slice(0, shape[0]), slice(0, shape[1])
    lo = np.clip(corners[0, -2:], 0, shape).astype(int)
    hi = np.clip(corners[1, -2:] + 1, 0, shape).astype(int)
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


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of some kinds, kept in sync with the layer list.

    Layers this plugin made (outputs) are left out unless `include_owned`."""

    def __init__(self, viewer, kinds: tuple, none_text: str | None = None,
                 include_owned: bool = False, exclude_roles: tuple = (), parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.kinds = kinds
        self.none_text = none_text
        self.include_owned = include_owned
        self.exclude_roles = exclude_roles
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed,
                      viewer.layers.events.moved):
            event.connect(self.refresh)
        viewer.layers.events.connect(self._on_layer_event)
        self.refresh()

    def _accept(self, layer) -> bool:
        if not isinstance(layer, self.kinds):
            return False
        meta = layer.metadata.get(OWNER_KEY)
        if not isinstance(meta, dict):
            return True
        return self.include_owned and meta.get("role") not in self.exclude_roles

    def _on_layer_event(self, event) -> None:
        if event.type == "name":
            self.refresh()

    def refresh(self, *_) -> None:
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        if self.none_text is not None:
            self.addItem(self.none_text)
        self.addItems([layer.name for layer in self.viewer.layers if self._accept(layer)][::-1])
        idx = self.findText(current)
        self.setCurrentIndex(idx if idx >= 0 else 0)
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self):
        name = self.currentText()
        if not name or (self.none_text is not None and name == self.none_text):
            return None
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def select(self, name: str) -> None:
        idx = self.findText(name)
        if idx >= 0:
            self.setCurrentIndex(idx)
