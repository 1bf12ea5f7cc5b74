"""What a valid model card is: every field's type and bounds, checked when a card is loaded.

A checkpoint is data from anywhere (a download, a colleague, an edited JSON), so a bad value must
be refused here with a message naming the field, not fail later per image (`'mean'`) or in a
widget. `validate_card(d)` returns a cleaned copy of `d` (unknown top-level keys dropped) or
raises CheckpointError. Model size is bounded separately (checkpoints.check_weights_header).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

import numpy as np

TASKS = ("nuclei", "glands", "semantic")
MAX_CLASSES = 256
MAX_TILE_SIZE = 4096
MIN_TILE_SIZE = 16
MAX_OVERLAP = 0.9       # as the CLI allows: more multiplies the work by over 100
MAX_TEXT = 100_000          # characters in one free-text field
MAX_ITEMS = 100_000         # entries in one list (e.g. the data split's image names)
MAX_DEPTH = 8               # nesting of the free-form dicts (training, metrics, corrections)

# Constructor arguments every backbone shares, with their bounds (the paper's values are inside).
MODEL_KWARG_BOUNDS = {
    "dca": bool, "channel_att": bool, "spatial_att": bool,
    "in_channels": (int, 1, 4),
    "num_classes": (int, 1, MAX_CLASSES),
    "width": (float, 1e-3, 4.0),
    "patch_size": (int, 1, 128),
    "n_blocks": (int, 1, 16),
}
HEAD_LIST_KWARGS = {"channel_heads", "spatial_heads"}
# Instance settings that instances.InstanceParams knows, with their bounds; other keys (a newer
# head's settings) pass if they are plain JSON scalars.
INSTANCE_PARAM_BOUNDS = {
    "threshold": (float, 0.0, 1.0), "min_size": (int, 0, 10 ** 9), "min_distance": (int, 0, 10 ** 4),
    "smoothing": (float, 0.0, 1000.0), "fill_holes": bool, "split": (bool, None),
    # the marker-watershed settings; the radii and sigmas size a structuring element or a filter
    # kernel, so a card cannot make one of them as large as memory
    "marker_min_size": (int, 0, 10 ** 9), "marker_smoothing": (float, 0.0, 1000.0),
    "boundary_weight": (float, 0.0, 1000.0), "marker_opening": (int, 0, 1000),
    "marker_split_h": (float, 0.0, 10 ** 4), "min_mean_prob": (float, 0.0, 1.0),
    "grow": (int, 0, 1000),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message saying why."""


CARD_HINT = "fix the card (the .json beside the weights, or the embedded copy) or re-save the model"


def _fail(field: str, what: str, value: Any, hint: str = CARD_HINT) -> CheckpointError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return CheckpointError(f"model card field {field!r} {what}, got {shown}; {hint}")


def _number(field: str, value: Any, kind: type, low: float | None, high: float | None) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(field, f"must be a{'n integer' if kind is int else ' number'}", value)
    if kind is int and (isinstance(value, float) and not value.is_integer()):
        raise _fail(field, "must be an integer", value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise _fail(field, f"must be between {low} and {high}", value)
    return int(value) if kind is int else float(value)


def _check_bound(field: str, value: Any, spec: Any) -> Any:
    if spec is bool:
        if not isinstance(value, bool):
            raise _fail(field, "must be true or false", value)
        return value
    if spec == (bool, None):
        if value is not None and not isinstance(value, bool):
            raise _fail(field, "must be true, false or null", value)
        return value
    kind, low, high = spec
    return _number(field, value, kind, low, high)


def _text(field: str, value: Any, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise _fail(field, f"must be a text of at most {MAX_TEXT} characters", value)
    return value


def _plain_json(field: str, value: Any, depth: int = 0) -> None:
    """Free-form fields hold JSON only: dicts with text keys, lists, numbers, text, null."""
    if depth > MAX_DEPTH:
        raise _fail(field, f"nests deeper than {MAX_DEPTH} levels", "...")
    if isinstance(value, Mapping):
        if len(value) > MAX_ITEMS:
            raise _fail(field, f"has more than {MAX_ITEMS} entries", "...")
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(field, "must have text keys", key)
            _plain_json(f"{field}.{key}", item, depth + 1)
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            raise _fail(field, f"has more than {MAX_ITEMS} entries", "...")
        for item in value:
            _plain_json(field, item, depth + 1)
    elif isinstance(value, str):
        _text(field, value)
    elif not (value is None or isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating))):
        raise _fail(field, "must hold only JSON values", value)


def _dict(field: str, value: Any, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        raise _fail(field, "must be an object ({...})" + (" or null" if optional else ""), value)
    _plain_json(field, value)
    return dict(value)


def _constructor_parameters(architecture: str) -> set[str] | None:
    from .registry import _REGISTRY, _ensure_backbones_imported
    _ensure_backbones_imported()
    cls = _REGISTRY.get(architecture)
    if cls is None:
        return None
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {name for name in params if name != "self"}


def validate_model_kwargs(architecture: str, kwargs: Any) -> dict[str, Any]:
    if not isinstance(kwargs, Mapping):
        raise _fail("model_kwargs", "must be an object of constructor arguments", kwargs)
    accepted = _constructor_parameters(architecture)
    out = {}
    for key, value in kwargs.items():
        field = f"model_kwargs.{key}"
        if accepted is not None and key not in accepted:
            raise _fail(field, f"is not an argument of {architecture} (known: {sorted(accepted)})", value)
        if key in MODEL_KWARG_BOUNDS:
            value = _check_bound(field, value, MODEL_KWARG_BOUNDS[key])
        elif key in HEAD_LIST_KWARGS:
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 16:
                raise _fail(field, "must be a list of 1 to 16 head counts", value)
            value = [_number(field, v, int, 1, 64) for v in value]
        else:
            _plain_json(field, value)
        out[key] = value
    return out


def _normalization(value: Any, in_channels: int) -> dict[str, list[float]]:
    if not isinstance(value, Mapping) or set(value) != {"mean", "std"}:
        raise _fail("normalization", "must be an object with exactly 'mean' and 'std' lists", value)
    out = {}
    for key in ("mean", "std"):
        values = value[key]
        if not isinstance(values, (list, tuple)) or len(values) not in {1, 3, in_channels}:
            raise _fail(f"normalization.{key}", "must be a list of 1 or 3 numbers", values)
        low = 1e-6 if key == "std" else -1e6
        out[key] = [_number(f"normalization.{key}", v, float, low, 1e6) for v in values]
    if len(out["mean"]) != len(out["std"]):
        raise _fail("normalization", "needs as many 'std' as 'mean' values", value)
    return out


def _data_split(value: Any) -> dict[str, Any]:
    value = _dict("data_split", value)
    for key in ("train", "validation"):
        if key in value:
            names = value[key]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise _fail(f"data_split.{key}", "must be a list of image names", names)
    return value


def _metrics(value: Any) -> dict[str, Any]:
    value = _dict("metrics", value)

    def leaves(field: str, item: Any) -> None:
        if isinstance(item, Mapping):
            for k, v in item.items():
                leaves(f"{field}.{k}", v)
        elif not (item is None or isinstance(item, (bool, int, float, str, np.bool_, np.integer,
                                                     np.floating))):
            raise _fail(field, "must hold numbers (or objects of numbers)", item)
    leaves("metrics", value)
    return value


def _instance_params(value: Any) -> dict[str, Any]:
    value = _dict("instance_params", value)
    from .instances import MEAN_PROB_OVER, MODES, SMALL_OBJECTS, UNSEEDED
    # the settings that take one of a few words: a card with another is refused when it loads,
    # not when the user first segments with it
    choices = {"mode": MODES, "unseeded": UNSEEDED, "small_objects": SMALL_OBJECTS,
               "min_mean_prob_over": MEAN_PROB_OVER}
    for key, item in value.items():
        field = f"instance_params.{key}"
        if key in choices:
            if item not in choices[key]:
                raise _fail(field, f"must be one of {list(choices[key])}", item)
        elif key in INSTANCE_PARAM_BOUNDS:
            value[key] = _check_bound(field, item, INSTANCE_PARAM_BOUNDS[key])
        elif isinstance(item, (Mapping, list)):
            _plain_json(field, item)
    return value


def known_heads() -> tuple[str, ...] | None:
    """The heads src_models can build targets and instances for (the `HEADS` tuple the instances
    work defines; looked up where it may live). None when no module defines it yet."""
    import importlib
    for name in ("instances", "heads", "targets", "losses", "checkpoints"):
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ImportError:
            continue
        heads = getattr(module, "HEADS", None)
        if heads:
            return tuple(heads)
    return None


def validate_card(d: Any, known_fields: set[str] | None = None) -> dict[str, Any]:
    """A cleaned copy of the card dict `d`, or CheckpointError naming the first bad field."""
    from .registry import list_models

    if not isinstance(d, Mapping):
        raise CheckpointError(f"model card must be a JSON object, got {type(d).__name__}")
    missing = [k for k in ("architecture", "model_kwargs") if k not in d]
    if missing:
        raise CheckpointError(f"model card is missing required field(s) {missing}; "
                              f"a card needs at least ['architecture', 'model_kwargs']")
    out = {k: v for k, v in d.items() if known_fields is None or k in known_fields}
    if not isinstance(d["architecture"], str) or d["architecture"] not in list_models():
        raise CheckpointError(f"model card names architecture {d['architecture']!r}, "
                              f"which is not one of {list_models()}")
    out["model_kwargs"] = kwargs = validate_model_kwargs(d["architecture"], d["model_kwargs"])
    in_channels = int(kwargs.get("in_channels", 3))
    if "normalization" in d:
        out["normalization"] = _normalization(d["normalization"], in_channels)
    if "tile_size" in d:
        out["tile_size"] = _number("tile_size", d["tile_size"], int, MIN_TILE_SIZE, MAX_TILE_SIZE)
    if d.get("overlap") is not None:
        out["overlap"] = _number("overlap", d["overlap"], float, 0.0, MAX_OVERLAP)
    if "task" in d and d["task"] not in TASKS:
        raise _fail("task", f"must be one of {list(TASKS)}", d["task"])
    if "class_names" in d:
        names = d["class_names"]
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_CLASSES + 1 \
                or not all(isinstance(n, str) and len(n) <= 200 for n in names):
            raise _fail("class_names", f"must be a list of 1 to {MAX_CLASSES + 1} short texts", names)
    if "instance_params" in d:
        out["instance_params"] = _instance_params(d["instance_params"])
    if "data_split" in d:
        out["data_split"] = _data_split(d["data_split"])
    if "training" in d:
        out["training"] = _dict("training", d["training"])
    if "metrics" in d:
        out["metrics"] = _metrics(d["metrics"])
    if "corrections" in d:
        out["corrections"] = _dict("corrections", d["corrections"], optional=True)
    for key in ("trained_on", "licence", "library_version", "created"):
        if key in d:
            out[key] = _text(key, d[key])
    if "parent" in d:
        out["parent"] = _text("parent", d["parent"], optional=True)
    if "head" in d:
        heads = known_heads()
        if not isinstance(d["head"], str) or len(d["head"]) > 64 or (heads and d["head"] not in heads):
            raise _fail("head", f"must be one of {list(heads or ('binary',))}", d["head"])
    return out
