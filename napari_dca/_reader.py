"""Dropping a DCA `.safetensors` checkpoint on napari makes it the current model (no layers)."""
from __future__ import annotations

from pathlib import Path


def get_reader(path):
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not str(path).lower().endswith(".safetensors"):
        return None
    if not _has_card(Path(path)):
        return None  # some other safetensors file: let another reader have it
    return read_checkpoint


def _has_card(path: Path) -> bool:
    try:
        from safetensors import safe_open

        from src_models.checkpoints import CARD_METADATA_KEY
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return CARD_METADATA_KEY in meta or path.with_suffix(".json").exists()
    except Exception:
        return False


def read_checkpoint(path):
    """Loads the checkpoint into the current viewer's napari-dca state; returns napari's
    "read, but no layers" sentinel [(None,)]."""
    import napari
    from napari.utils.notifications import show_error, show_info

    from ._widgets._state import get_state, load_model_into

    path = path[0] if isinstance(path, list) else path
    viewer = napari.current_viewer()
    if viewer is None:
        show_error("Open a napari viewer first, then drop the checkpoint on it.")
        return [(None,)]
    state = get_state(viewer)
    try:
        load_model_into(state, path, device=state.device or "cpu")
    except Exception as err:  # CheckpointError and friends: tell the user, don't raise into napari
        show_error(f"Could not load {Path(path).name}: {err}. Pick a napari-dca checkpoint "
                   f"(.safetensors with a model card) in the Model widget.")
        return [(None,)]
    show_info(f"napari-dca: loaded {Path(path).name} ({state.card.architecture}, task "
              f"{state.card.task}) as the current model. Open Plugins > DCA segmentation > Segment.")
    return [(None,)]
