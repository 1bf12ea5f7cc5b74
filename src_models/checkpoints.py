"""Checkpoints are data: safetensors weights + a JSON model card, never pickled code.

`save_checkpoint` writes `<name>.safetensors` with the card embedded in its metadata (one file is a
complete checkpoint: a user can drop it on napari) and a readable `<name>.json` copy beside it.
`load_checkpoint` takes a bundled name ("nuclei", "glands"), one of our files, or a checkpoint
from the official DCA code (.pt/.pth, read weights-only and converted).
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .preprocess import DEFAULT_NORMALIZATION
from .registry import build_model, list_models

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
CARD_METADATA_KEY = "napari_dca_model_card"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message saying why."""


@dataclass
class ModelCard:
    """What a checkpoint is: how to build it, how to feed it, what it learned from, how well it does."""
    architecture: str
    model_kwargs: dict[str, Any]
    normalization: dict[str, list[float]] = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    tile_size: int = 256
    class_names: list[str] = field(default_factory=lambda: ["foreground"])
    task: str = "semantic"                      # "nuclei" | "glands" | "semantic"
    instance_params: dict[str, Any] = field(default_factory=dict)
    trained_on: str = ""
    data_split: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    corrections: dict[str, Any] | None = None
    licence: str = ""
    library_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    REQUIRED = ("architecture", "model_kwargs")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCard":
        if not isinstance(d, dict):
            raise CheckpointError(f"model card must be a JSON object, got {type(d).__name__}")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise CheckpointError(f"model card is missing required field(s) {missing}; "
                                  f"a card needs at least {list(cls.REQUIRED)}")
        known = {f.name for f in fields(cls)}
        card = cls(**{k: v for k, v in d.items() if k in known})
        if card.architecture not in list_models():
            raise CheckpointError(f"model card names architecture {card.architecture!r}, "
                                  f"which is not one of {list_models()}")
        if not isinstance(card.model_kwargs, dict):
            raise CheckpointError("model card field 'model_kwargs' must be an object of constructor arguments")
        return card

    @property
    def num_classes(self) -> int:
        return int(self.model_kwargs.get("num_classes", 1))

    @property
    def in_channels(self) -> int:
        return int(self.model_kwargs.get("in_channels", 3))


def card_for(model: nn.Module, **fields_) -> ModelCard:
    """A card for a model built by `build_model`, with its constructor arguments filled in."""
    return ModelCard(architecture=model.registry_name, model_kwargs=dict(model.config), **fields_)


def bundled_checkpoints() -> dict[str, Path]:
    """Default checkpoints shipped with the package, by name."""
    return {p.stem: p for p in sorted(PRETRAINED_DIR.glob("*.safetensors"))}


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    bundled = bundled_checkpoints()
    if isinstance(name_or_path, str) and name_or_path in bundled:
        return bundled[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.exists():
        hint = f"bundled names: {sorted(bundled)}" if bundled else "no bundled checkpoints are installed"
        raise CheckpointError(f"no checkpoint {str(name_or_path)!r}: not a file, and not a bundled name ({hint})")
    return path


def save_checkpoint(model: nn.Module, path: str | Path, card: ModelCard | dict) -> Path:
    """Write `path` (.safetensors, card embedded) and `<stem>.json`. Returns the .safetensors path."""
    from safetensors.torch import save_file

    if isinstance(card, dict):
        card = ModelCard.from_dict(card)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    card_json = json.dumps(card.to_dict(), indent=1, sort_keys=True, default=str)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={CARD_METADATA_KEY: card_json, "format": "pt"})
    path.with_suffix(".json").write_text(card_json + "\n")
    return path


def _read_card(path: Path) -> ModelCard:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path.name} is not a readable safetensors file ({err}); "
                              f"is it truncated or another format?") from err
    text = meta.get(CARD_METADATA_KEY)
    sidecar = path.with_suffix(".json")
    if text is None and sidecar.exists():
        text = sidecar.read_text()
    if text is None:
        raise CheckpointError(f"{path.name} has no model card (neither embedded nor {sidecar.name}); "
                              f"it cannot say which model to build")
    try:
        return ModelCard.from_dict(json.loads(text))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"the model card of {path.name} is not valid JSON: {err}") from err


def _build(card: ModelCard) -> nn.Module:
    try:
        return build_model(card.architecture, **card.model_kwargs)
    except TypeError as err:
        raise CheckpointError(f"model card's model_kwargs do not fit {card.architecture}: {err}") from err


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model its card describes: "
                              f"{len(missing)} missing weights {missing[:3]}, "
                              f"{len(unexpected)} unexpected {unexpected[:3]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(ours[key].shape):
            raise CheckpointError(f"{source}: weight {key!r} has shape {tuple(tensor.shape)} but the model "
                                  f"needs {tuple(ours[key].shape)} (e.g. a checkpoint for another number "
                                  f"of classes or input channels)")
    model.load_state_dict(state)


def load_checkpoint(name_or_path: str | Path, device: str | torch.device = "cpu",
                    card: ModelCard | dict | None = None) -> tuple[nn.Module, ModelCard]:
    """A ready model (eval mode, on `device`) and its card.

    For official .pt/.pth files pass `card` (at least architecture and model_kwargs in the reference
    constructor's names under `model_kwargs["official"]`, or ours) since they carry none."""
    path = resolve_checkpoint(name_or_path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        card_obj = _read_card(path) if card is None else (
            card if isinstance(card, ModelCard) else ModelCard.from_dict(card))
        model = _build(card_obj)
        try:
            state = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"cannot read the weights in {path.name}: {err}") from err
        _load_into(model, state, path.name)
    elif suffix in (".pt", ".pth"):
        model, card_obj = _load_official(path, card)
    else:
        raise CheckpointError(f"{path.name}: unsupported checkpoint type {suffix!r}; expected a .safetensors "
                              f"checkpoint of napari-dca or a .pt/.pth state dict from the official DCA code")
    return model.to(device).eval(), card_obj


def _load_official(path: Path, card: ModelCard | dict | None) -> tuple[nn.Module, ModelCard]:
    from .convert import convert_official_state_dict, official_kwargs_to_ours

    if card is None:
        raise CheckpointError(f"{path.name} is a reference-code checkpoint with no model card: pass "
                              f"card={{'architecture': ..., 'model_kwargs': {{'official': {{...}}}}}} "
                              f"with the reference constructor's arguments")
    card_d = card.to_dict() if isinstance(card, ModelCard) else dict(card)
    kwargs = dict(card_d.get("model_kwargs", {}))
    if "official" in kwargs:
        kwargs = official_kwargs_to_ours(kwargs["official"])
    card_d["model_kwargs"] = kwargs
    card_obj = ModelCard.from_dict(card_d)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path.name} cannot be read as a weights-only PyTorch file ({err}); "
                              f"files that need arbitrary code to unpickle are refused") from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path.name} holds no state dict of tensors")
    model = _build(card_obj)
    try:
        model.load_state_dict(convert_official_state_dict(card_obj.architecture, state, model))
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    return model, card_obj
