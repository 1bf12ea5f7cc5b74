"""The state every napari-dca widget of one viewer shares: one evented object per viewer.

`ModelState` is the one source of truth for the current model: its weights, card, device, where it
came from (`checkpoint`), whether it is saved, and a `version` bumped whenever the weights change.
The Model widget (and the .safetensors reader) set it; every widget shows what it says and listens
to `state.events.<field>`. `state.results` holds each image layer's last segmentation (keyed by the
image's stable id, never its name): a result belongs to an image, not to the viewer.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from psygnal import Signal, evented


class ImageResults:
    """Segmentation results by image (stable id from `_common.image_key`), with a `changed(key)`
    signal. Results are the plugin's own arrays: layers only ever get copies of them."""
    changed = Signal(str)

    def __init__(self):
        self._by_key: dict[str, Any] = {}

    def get(self, key: str | None):
        return None if key is None else self._by_key.get(key)

    def set(self, key: str, result) -> None:
        self._by_key[key] = result
        self.changed.emit(key)

    def drop(self, key: str) -> None:
        if self._by_key.pop(key, None) is not None:
            self.changed.emit(key)

    def keys(self) -> list[str]:
        return list(self._by_key)


@evented
@dataclass
class ModelState:
    model: Any = None            # torch.nn.Module in eval mode, or None
    card: Any = None             # src_models.checkpoints.ModelCard, or None for an untrained model
    device: str = "cpu"          # torch device string the model lives on
    checkpoint: str = ""         # path or bundled name the weights are saved in ("" for none)
    saved: bool = True           # False for a fine-tuned model not saved yet
    version: int = 0             # bumped whenever the weights change (new model, fine-tune, revert)
    jobs: int = 0                # napari-dca workers running now (controls disable while > 0)
    results: ImageResults = field(default_factory=ImageResults, compare=False, repr=False)

    def set_model(self, model, card, checkpoint: str = "", saved: bool = True) -> None:
        with self.events.paused():  # one batch of events, after every field is consistent
            self.card = card
            self.checkpoint = str(checkpoint)
            self.saved = bool(saved)
            self.model = model
            self.version += 1

    def weights_changed(self) -> None:
        self.version += 1

    def model_tag(self) -> tuple:
        """Identifies the weights now current: a result made with other weights says so."""
        return (id(self.model), self.version)

    @property
    def busy(self) -> bool:
        return self.jobs > 0


_STATES: "weakref.WeakKeyDictionary[Any, ModelState]" = weakref.WeakKeyDictionary()
_FALLBACK: dict[int, ModelState] = {}


def get_state(viewer) -> ModelState:
    """The shared state of `viewer` (created on first use); widgets of another viewer get their own."""
    try:
        state = _STATES.get(viewer)
        if state is None:
            state = _STATES[viewer] = ModelState()
            _forget_closed_images(viewer, state)
        return state
    except TypeError:  # not weak-referenceable: keep it by id
        return _FALLBACK.setdefault(id(viewer), ModelState())


def _forget_closed_images(viewer, state: ModelState) -> None:
    """Deleting an image layer drops its results (and a job finishing later finds no image)."""
    from ._common import IMAGE_KEY

    layers = getattr(viewer, "layers", None)
    if layers is None:
        return
    results = weakref.ref(state.results)

    def removed(event):
        key = getattr(event.value, "metadata", {}).get(IMAGE_KEY)
        store = results()
        if store is not None and isinstance(key, str):
            store.drop(key)
    layers.events.removed.connect(removed)


# --- recently opened checkpoint files (a small JSON list in the user's config folder) -------------
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

MAX_RECENT = 8


def _config_dir() -> Path:
    env = os.environ.get("NAPARI_DCA_CONFIG_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or (Path.home() / ".config")
    return Path(base) / "napari-dca"


def recent_checkpoints() -> list[str]:
    try:
        items = json.loads((_config_dir() / "recent.json").read_text())
    except (OSError, ValueError):
        return []
    return [p for p in items if isinstance(p, str) and Path(p).exists()][:MAX_RECENT]


def add_recent_checkpoint(path: str | Path) -> None:
    path = str(Path(path).resolve())
    items = [path] + [p for p in recent_checkpoints() if p != path]
    try:
        _config_dir().mkdir(parents=True, exist_ok=True)
        (_config_dir() / "recent.json").write_text(json.dumps(items[:MAX_RECENT], indent=1))
    except OSError:  # a read-only home must not break loading a model
        pass


def load_model_into(state: ModelState, name_or_path: str | Path, device: str = "cpu") -> None:
    """Load a checkpoint (bundled name or file) and make it the current model (GUI thread)."""
    from src_models.checkpoints import bundled_checkpoints, load_checkpoint

    model, card = load_checkpoint(name_or_path, device=device)
    state.device = device
    state.set_model(model, card, str(name_or_path), saved=True)
    if str(name_or_path) not in bundled_checkpoints():
        add_recent_checkpoint(name_or_path)


# --- settings remembered between sessions (Qt's QSettings; an ini file under NAPARI_DCA_CONFIG_DIR
# when that is set, e.g. in tests) -----------------------------------------------------------------
def settings():
    from qtpy.QtCore import QSettings

    env = os.environ.get("NAPARI_DCA_CONFIG_DIR")
    if env:
        return QSettings(str(Path(env) / "settings.ini"), QSettings.IniFormat)
    return QSettings("napari-dca", "napari-dca")


def remembered(key: str, default, kind=None):
    """The remembered value of `key` as the type of `default` (default when unset or unreadable)."""
    kind = kind or type(default)
    try:
        value = settings().value(key, None)
        if value is None:
            return default
        if kind is bool:
            return value in (True, "true", "1", 1)
        return kind(value)
    except (TypeError, ValueError):
        return default


def remember(key: str, value) -> None:
    try:
        settings().setValue(key, value)
    except Exception:  # a read-only config folder must not break the widget
        pass
