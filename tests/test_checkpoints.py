"""Checkpoints: round trip, bundled names, official files, and clear errors on bad input."""
import json

import numpy as np
import pytest
import torch

from src_models import build_model
from src_models.checkpoints import (CheckpointError, ModelCard, bundled_checkpoints, card_for,
                                    load_checkpoint, save_checkpoint)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_model("unet", width=0.125).eval()


def test_round_trip_gives_identical_outputs_and_card(tiny, tmp_path):
    card = card_for(tiny, task="nuclei", tile_size=128, trained_on="unit test", metrics={"dice": 0.5})
    path = save_checkpoint(tiny, tmp_path / "m.safetensors", card)
    assert path.exists() and path.with_suffix(".json").exists()
    model, loaded = load_checkpoint(path)
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        assert torch.equal(tiny(x), model(x))
    assert not model.training
    assert loaded.task == "nuclei" and loaded.tile_size == 128 and loaded.metrics == {"dice": 0.5}
    assert loaded.model_kwargs["width"] == 0.125 and loaded.library_version


def test_card_embedded_so_single_file_is_enough(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors", card_for(tiny))
    path.with_suffix(".json").unlink()
    _, card = load_checkpoint(path)
    assert card.architecture == "unet"


def test_mismatched_classes_names_the_weight(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "one.safetensors", card_for(tiny))
    three = build_model("unet", width=0.125, num_classes=3)
    with pytest.raises(CheckpointError, match=r"head\.(weight|bias).*has shape"):
        load_checkpoint(path, card=card_for(three))


def test_corrupt_file_says_so(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(bad)


def test_truncated_file_says_so(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors", card_for(tiny))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_card_fields(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="missing required field"):
        ModelCard.from_dict({"model_kwargs": {}})
    with pytest.raises(CheckpointError, match="not one of"):
        ModelCard.from_dict({"architecture": "nonet", "model_kwargs": {}})
    from safetensors.torch import save_file
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(bare))
    with pytest.raises(CheckpointError, match="no model card"):
        load_checkpoint(bare)


def test_unknown_name_and_extension(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint("no-such-model")
    other = tmp_path / "weights.onnx"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        load_checkpoint(other)


def test_official_pt_loads_weights_only_and_converts(shared, tmp_path):
    fixture = torch.load(shared / "fixtures/reference_dca/unet_dca.pt", weights_only=True)
    manifest = json.loads((shared / "fixtures/reference_dca/manifest.json").read_text())
    pt = tmp_path / "official.pth"
    torch.save(fixture["state_dict"], pt)
    card = {"architecture": "unet", "model_kwargs": {"official": manifest["unet"]["reference_kwargs"]}}
    model, loaded = load_checkpoint(pt, card=card)
    with torch.no_grad():
        assert (model(fixture["input"]) - fixture["output"]).abs().max() <= 1e-4
    assert loaded.model_kwargs["width"] == 0.125
    with pytest.raises(CheckpointError, match="no model card"):
        load_checkpoint(pt)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    pt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, pt)
    card = {"architecture": "unet", "model_kwargs": {"width": 0.125}}
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(pt, card=card)


def test_bundled_defaults_load_by_name():
    bundled = bundled_checkpoints()
    if not bundled:
        pytest.skip("no bundled checkpoints in this checkout")
    for name in ("nuclei", "glands"):
        assert name in bundled
        model, card = load_checkpoint(name)
        assert card.task == name and card.metrics and card.licence
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 64, 64)).shape == (1, card.num_classes, 64, 64)
