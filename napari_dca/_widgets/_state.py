"""The model every napari-dca widget of one viewer shares: one evented object per viewer.

The Model widget (and the .safetensors reader) set it; Segment, Fine-tune and Attention read it and
listen to `state.events.model` (a new model) and `state.events.version` (same model, new weights).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from psygnal import evented


@evented
@dataclass
class ModelState:
    model: Any = None            # torch.nn.Module in eval mode, or None
    card: Any = None             # src_models.checkpoints.ModelCard, or None for an untrained model
    device: str = "cpu"          # torch device string the model lives on
    checkpoint: str = ""         # path or bundled name it came from ("" for a new model)
    version: int = 0             # bumped whenever the weights change (fine-tune, revert)
    result: Any = None           # the last segmentation (segment.SegmentResult), for live relabeling

    def set_model(self, model, card, checkpoint: str = "") -> None:
        with self.events.paused():  # one batch of events, after every field is consistent
            self.card = card
            self.checkpoint = str(checkpoint)
            self.model = model
            self.version += 1

    def weights_changed(self) -> None:
        self.version += 1


_STATES: "weakref.WeakKeyDictionary[Any, ModelState]" = weakref.WeakKeyDictionary()
_FALLBACK: dict[int, ModelState] = {}


def get_state(viewer) -> ModelState:
    """The shared state of `viewer` (created on first use); widgets of another viewer get their own."""
    try:
        state = _STATES.get(viewer)
        if state is None:
            state = _STATES[viewer] = ModelState()
        return state
    except TypeError:  # not weak-referenceable: keep it by id
        return _FALLBACK.setdefault(id(viewer), ModelState())


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
    state.set_model(model, card, str(name_or_path))
    if str(name_or_path) not in bundled_checkpoints():
        add_recent_checkpoint(name_or_path)
