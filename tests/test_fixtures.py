"""Models converted from the official code's state dicts reproduce its outputs.

Fixtures live in the shared folder (`$NAPARI_DCA_SHARED`, else `<repo>/../shared`):
fixtures/reference_dca/<name>_dca.pt with `state_dict` (official names), `input`, `output` (eval),
and manifest.json with each reference constructor's arguments and parameter count.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from src_models import capture_attention, from_official
from src_models.dca import DCA

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NAPARI_DCA_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "reference_dca"
NAMES = ["unet", "resunetpp", "multiresunet", "r2unet"]

pytestmark = pytest.mark.skipif(
    not (FIXTURES / "manifest.json").is_file(),
    reason=f"reference fixtures not found at {FIXTURES} (set NAPARI_DCA_SHARED to the shared folder)")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


def load(name: str, manifest: dict):
    data = torch.load(FIXTURES / f"{name}_dca.pt", weights_only=True)
    model = from_official(name, data["state_dict"], manifest[name]["reference_kwargs"])
    return model, data


@pytest.mark.parametrize("name", NAMES)
def test_converted_official_model_reproduces_reference_output(name, manifest):
    model, data = load(name, manifest)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == manifest[name]["params"]
    with torch.no_grad():
        out = model(data["input"])
    assert out.shape == tuple(manifest[name]["output_shape"])
    diff = (out - data["output"]).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs diff {diff:.3g} from the reference"


@pytest.mark.parametrize("name", ["unet", "resunetpp"])
def test_tuned_model_explicit_attention_equals_fused_and_maps_have_documented_shapes(name, manifest):
    """With the reference's weights: capturing (explicit softmax) changes no output beyond 1e-5,
    and the maps are (B, heads, C_i/heads, C/heads) and (B, heads, N, N) with rows summing to 1."""
    model, data = load(name, manifest)
    x = data["input"]
    kwargs = manifest[name]["reference_kwargs"]
    with torch.no_grad():
        fused = model(x)
        with capture_attention(model) as records:
            explicit = model(x)
    assert (fused - explicit).abs().max().item() <= 1e-5
    assert len(records) == 1
    rec = records[0]
    grid = x.shape[-1] // kwargs["patch_size"]
    assert rec.grid == (grid, grid)
    assert rec.input_size == tuple(x.shape[-2:])
    b, n, total = x.shape[0], grid * grid, sum(rec.features)
    ch, sh = kwargs["channel_head_dim"], kwargs["spatial_head_dim"]
    dca = next(m for m in model.modules() if isinstance(m, DCA))
    assert rec.features == dca.features
    assert len(rec.cca) == len(rec.sca) == kwargs["n"]
    for stage, c in enumerate(rec.features):
        cca, sca = rec.cca[0][stage], rec.sca[0][stage]
        assert cca.shape == (b, ch[stage], c // ch[stage], total // ch[stage])
        assert sca.shape == (b, sh[stage], n, n)
        for att in (cca, sca):
            assert (att >= 0).all()
            torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]), atol=1e-5, rtol=0)
