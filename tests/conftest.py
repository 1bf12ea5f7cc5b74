"""Shared test setup. torch is imported before anything can create a QApplication (see STYLE.md)."""
import torch  # noqa: F401  (must come first)

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

torch.set_num_threads(1)

# The exported-graph runtime (src_models/runtime_onnx.py): tests that want it ask for it; by default
# `segment` runs torch here (one export costs ~20 s of CPU), and no test writes into the user's
# cache folder. Both are environment variables, so CLI subprocesses inherit them.
os.environ.setdefault("NAPARI_DCA_RUNTIME", "torch")
if "NAPARI_DCA_CACHE" not in os.environ:
    os.environ["NAPARI_DCA_CACHE"] = tempfile.mkdtemp(prefix="napari-dca-test-cache-")
    atexit.register(shutil.rmtree, os.environ["NAPARI_DCA_CACHE"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """../shared beside the repository (or NAPARI_DCA_SHARED)."""
    return Path(os.environ.get("NAPARI_DCA_SHARED", REPO.parent / "shared"))


@pytest.fixture
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set NAPARI_DCA_SHARED to point at it)")
    return path


@pytest.fixture(autouse=True)
def own_checkpoint_index(tmp_path, monkeypatch):
    """Each test its own record of which checkpoint files have cached graphs (runtime_cached's
    index; inherited by CLI subprocesses), over the exported graphs the session shares: two tests
    that save byte-identical tiny checkpoints would otherwise find each other's records."""
    monkeypatch.setenv("NAPARI_DCA_INDEX", str(tmp_path / "checkpoint-index"))
