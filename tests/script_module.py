"""Load a script of scripts/ or benchmarks/ as a module, so its functions can be tested."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """The module of REPO/relative (e.g. "scripts/ship_bundled.py"); its folder joins sys.path
    first, for the scripts that import their neighbours."""
    path = REPO / relative
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
