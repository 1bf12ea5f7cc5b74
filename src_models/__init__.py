"""napari-dca's engine: DCA U-Nets, checkpoints, inference, training. Pure PyTorch + NumPy.

The names below are imported on first use (PEP 562), not with the package: a command that runs a
cached exported graph (runtime_onnx) imports numpy-only modules of this package and never torch."""
__version__ = "0.1.0"

_LAZY = {"DCA": "dca", "DCAAttention": "dca", "capture_attention": "dca",
         "build_model": "registry", "list_models": "registry", "PAPER_DEFAULTS": "registry",
         "from_official": "convert"}

__all__ = ["DCA", "DCAAttention", "capture_attention", "build_model", "list_models", "PAPER_DEFAULTS",
           "from_official", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
