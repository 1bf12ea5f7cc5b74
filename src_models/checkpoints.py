"""Checkpoints are data: safetensors weights + a JSON model card, never pickled code.

`save_checkpoint` writes `<name>.safetensors` with the card embedded in its metadata (one file is a
complete checkpoint: a user can drop it on napari) and a readable `<name>.json` copy beside it,
both atomically (safe_write: the bytes are made here, not left to the installed safetensors'
version). A path that does not end in .safetensors gets it appended: `mymodel.v2` ->
`mymodel.v2.safetensors` + `mymodel.v2.json` (never `mymodel.safetensors`).

`load_checkpoint` takes a bundled name ("nuclei", "glands"), one of our files, or a checkpoint
from the official DCA code (.pt/.pth, read weights-only and converted; its card is passed in or is
the `.json` beside it). Before anything is built, the card is validated field by field
(card_schema) and the model it describes is built on PyTorch's `meta` device (no memory) and
compared with the tensor names and shapes in the file's header; its size is bounded. Weights with
NaN/inf are refused.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .card_schema import CheckpointError, validate_card
from .preprocess import DEFAULT_NORMALIZATION
from .registry import build_model
from .safe_write import write_bytes_atomic, write_text_atomic

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
CARD_METADATA_KEY = "napari_dca_model_card"
# A model larger than this is refused before it is built (the paper's largest, V-Net at k = 0.5,
# has about 0.1 G parameters).
MAX_PARAMETERS = 500_000_000

__all__ = ["CheckpointError", "ModelCard", "card_for", "checkpoint_path", "load_checkpoint",
           "save_checkpoint"]


@dataclass
class ModelCard:
    """What a checkpoint is: how to build it, how to feed it, what it learned from, how well it does."""
    architecture: str
    model_kwargs: dict[str, Any]
    normalization: dict[str, list[float]] = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    tile_size: int = 256
    # fraction of a tile shared by neighbours when `predict` tiles an image; None: the library's
    # default (inference.DEFAULT_OVERLAP). A model whose scores hold at a smaller overlap runs on
    # fewer tiles (at 384-pixel tiles, 0.125 needs 9 per 1000x1000 instead of 16; measured for
    # glands and not taken: benchmarks/results/overlap_1000_glands.md).
    overlap: float | None = None
    class_names: list[str] = field(default_factory=lambda: ["foreground"])
    task: str = "semantic"                      # "nuclei" | "glands" | "semantic"
    head: str = "binary"                        # what the outputs mean: one of targets.HEADS
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
        """A card from its JSON form; CheckpointError naming the field for any bad value
        (card_schema.validate_card)."""
        return cls(**validate_card(d, known_fields={f.name for f in fields(cls)}))

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
    if not path.is_file():
        hint = f"bundled names: {sorted(bundled)}" if bundled else "no bundled checkpoints are installed"
        what = "is a folder" if path.is_dir() else "not a file"
        raise CheckpointError(f"no checkpoint {str(name_or_path)!r}: {what}, and not a bundled name ({hint})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name}: empty file (0 bytes); was it copied or saved completely?")
    return path


def checkpoint_path(path: str | Path) -> Path:
    """The .safetensors path a checkpoint saved as `path` gets: `path` itself when it ends in
    .safetensors, else `path` + ".safetensors" (the user's own suffix, e.g. `.v2`, is kept)."""
    path = Path(path)
    return path if path.suffix.lower() == ".safetensors" else path.with_name(path.name + ".safetensors")


def card_path(weights: str | Path) -> Path:
    """The readable .json card beside a checkpoint's weights (x.safetensors -> x.json)."""
    return checkpoint_path(weights).with_suffix(".json")


def non_finite_weights(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf."""
    return [k for k, v in state.items()
            if v.is_floating_point() and v.device.type != "meta" and not bool(torch.isfinite(v).all())]


def _json_value(value: Any) -> Any:
    """numpy scalars and arrays as JSON numbers and lists; anything else as its text."""
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def save_checkpoint(model: nn.Module, path: str | Path, card: ModelCard | dict,
                    overwrite: bool = True) -> Path:
    """Write the .safetensors (card embedded) and the .json card beside it, each atomically.
    Returns the .safetensors path (see checkpoint_path for the naming rule). Refuses
    (CheckpointError) weights with NaN/inf and an invalid card; overwrite=False refuses an
    existing file (safe_write.OutputExistsError)."""
    from safetensors.torch import save

    card = ModelCard.from_dict(card.to_dict() if isinstance(card, ModelCard) else card)
    path = checkpoint_path(path)
    card_json = json.dumps(card.to_dict(), indent=1, sort_keys=True, default=_json_value)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = non_finite_weights(state)
    if bad:
        raise CheckpointError(f"not saving {path.name}: {len(bad)} weight tensor(s) hold NaN or inf "
                              f"(e.g. {bad[0]!r}); the training diverged")
    data = save(state, metadata={CARD_METADATA_KEY: card_json, "format": "pt"})
    write_bytes_atomic(path, data, overwrite=overwrite)
    write_text_atomic(card_path(path), card_json + "\n", overwrite=True)
    return path


def _safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, {tensor name: shape}) from the header only; no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path.name} is not a readable safetensors file ({err}); "
                              f"is it truncated or another format?") from err
    return meta, shapes


def _card_text(path: Path, meta: dict[str, str]) -> str:
    text = meta.get(CARD_METADATA_KEY)
    sidecar = card_path(path)
    if text is None and sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace")
    if text is None:
        raise CheckpointError(f"{path.name} has no model card (neither embedded nor {sidecar.name}); "
                              f"it cannot say which model to build")
    return text


def _parse_card(text: str, source: str) -> ModelCard:
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"the model card of {source} is not valid JSON: {err}") from err
    return ModelCard.from_dict(d)


def _read_card(path: Path) -> ModelCard:
    meta, _ = _safetensors_header(path)
    return _parse_card(_card_text(path, meta), path.name)


def _build(card: ModelCard, device: str | torch.device | None = None) -> nn.Module:
    try:
        if device is None:
            return build_model(card.architecture, **card.model_kwargs)
        with torch.device(device):
            return build_model(card.architecture, **card.model_kwargs)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, OverflowError) as err:
        raise CheckpointError(f"model card's model_kwargs do not fit {card.architecture}: {err}") from err


def planned_shapes(card: ModelCard) -> dict[str, tuple[int, ...]]:
    """{weight name: shape} of the model the card describes, built on the meta device (no memory
    is allocated however large the card says the model is). CheckpointError above MAX_PARAMETERS."""
    meta_model = _build(card, "meta")
    shapes = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    total = sum(math.prod(s) for s in shapes.values())
    if total > MAX_PARAMETERS:
        raise CheckpointError(f"the model card describes a {card.architecture} with {total / 1e6:.0f} M "
                              f"parameters (more than {MAX_PARAMETERS / 1e6:.0f} M); refusing to build it. "
                              f"Check model_kwargs (e.g. width)")
    return shapes


def _compare_shapes(ours: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]],
                    source: str) -> None:
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model its card describes: "
                              f"{len(missing)} missing weights {missing[:3]}, "
                              f"{len(unexpected)} unexpected {unexpected[:3]}")
    for key, shape in theirs.items():
        if tuple(shape) != tuple(ours[key]):
            raise CheckpointError(f"{source}: weight {key!r} has shape {tuple(shape)} but the model "
                                  f"needs {tuple(ours[key])} (e.g. a checkpoint for another number "
                                  f"of classes or input channels, or a card with another width)")


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    _compare_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                    {k: tuple(v.shape) for k, v in state.items()}, source)
    _refuse_non_finite(state, source)
    model.load_state_dict(state)


def _refuse_non_finite(state: dict[str, torch.Tensor], source: str) -> None:
    bad = non_finite_weights(state)
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]!r}); "
                              f"the model that saved them had diverged. Use an earlier checkpoint")


def load_checkpoint(name_or_path: str | Path, device: str | torch.device = "cpu",
                    card: ModelCard | dict | None = None) -> tuple[nn.Module, ModelCard]:
    """A ready model (eval mode, on `device`) and its card.

    For official .pt/.pth files the card is `card` or, when not given, the `.json` beside the file:
    at least architecture and model_kwargs, in the reference constructor's names under
    `model_kwargs["official"]` or in ours."""
    path = resolve_checkpoint(name_or_path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        meta, shapes = _safetensors_header(path)
        card_obj = _parse_card(_card_text(path, meta), path.name) if card is None else (
            ModelCard.from_dict(card.to_dict() if isinstance(card, ModelCard) else card))
        _compare_shapes(planned_shapes(card_obj), shapes, path.name)  # before allocating anything
        try:
            state = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"cannot read the weights in {path.name}: {err}") from err
        model = _build(card_obj)
        _load_into(model, state, path.name)
    elif suffix in (".pt", ".pth"):
        model, card_obj = _load_official(path, card)
    else:
        raise CheckpointError(f"{path.name}: unsupported checkpoint type {suffix!r}; expected a .safetensors "
                              f"checkpoint of napari-dca or a .pt/.pth state dict from the official DCA code")
    return model.to(device).eval(), card_obj


def _load_official(path: Path, card: ModelCard | dict | None) -> tuple[nn.Module, ModelCard]:
    from .convert import _REFERENCE_FIXED_KWARGS, convert_official_state_dict, official_kwargs_to_ours

    sidecar = path.with_suffix(".json")
    if card is None and sidecar.is_file():
        try:
            card = json.loads(sidecar.read_text(encoding="utf-8", errors="replace"))
        except (json.JSONDecodeError, RecursionError) as err:
            raise CheckpointError(f"{sidecar.name} (the card of {path.name}) is not valid JSON: {err}") from err
    if card is None:
        raise CheckpointError(f"{path.name} is a checkpoint of the official DCA code and carries no model "
                              f"card: put {sidecar.name} beside it, e.g. {{\"architecture\": \"unet\", "
                              f"\"model_kwargs\": {{\"official\": {{\"attention\": true, \"k\": 0.5}}}}}} "
                              f"with the reference constructor's arguments")
    card_d = card.to_dict() if isinstance(card, ModelCard) else card
    if not isinstance(card_d, dict):
        raise CheckpointError(f"the model card of {path.name} must be a JSON object")
    card_d = dict(card_d)
    kwargs = card_d.get("model_kwargs", {})
    if isinstance(kwargs, dict) and "official" in kwargs:
        if not isinstance(kwargs["official"], dict):
            raise CheckpointError("model card field 'model_kwargs.official' must be an object")
        try:
            kwargs = official_kwargs_to_ours(kwargs["official"])
        except ValueError as err:
            raise CheckpointError(f"model card of {path.name}: {err}") from err
        card_d["model_kwargs"] = {**kwargs, **_REFERENCE_FIXED_KWARGS.get(card_d.get("architecture"), {})}
    card_obj = ModelCard.from_dict(card_d)
    planned = planned_shapes(card_obj)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path.name} cannot be read as a weights-only PyTorch file ({err}); "
                              f"files that need arbitrary code to unpickle are refused") from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path.name} holds no state dict of tensors")
    meta_model = _build(card_obj, "meta")
    try:
        converted = convert_official_state_dict(card_obj.architecture, state, meta_model)
    except ValueError as err:
        raise CheckpointError(f"{path.name}: {err}") from err
    _compare_shapes(planned, {k: tuple(v.shape) for k, v in converted.items()}, path.name)
    _refuse_non_finite(converted, path.name)
    model = _build(card_obj)
    model.load_state_dict(converted)
    return model, card_obj
