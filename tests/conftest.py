"""Shared test setup. torch is imported before anything can create a QApplication (see STYLE.md)."""
import torch  # noqa: F401  (must come first)

import os
from pathlib import Path

import pytest

torch.set_num_threads(1)

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
