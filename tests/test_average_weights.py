"""scripts/average_weights.py: the uniform average of runs of one recipe, as one checkpoint."""
from __future__ import annotations

import pytest
import torch

from src_models import build_model
from src_models.checkpoints import card_for, load_checkpoint, save_checkpoint

from script_module import load_script


def average_script():
    return load_script("scripts/average_weights.py")


def run(path, seed, width=0.125):
    torch.manual_seed(seed)
    model = build_model("unet", width=width)
    for m in model.modules():            # BatchNorm statistics differ between the runs too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(seed + 1)
    card = card_for(model, task="glands", tile_size=64, metrics={"validation": {"object_f1": 0.9}})
    return model, save_checkpoint(model, path, card)


def test_every_float_tensor_is_the_mean_and_the_card_names_the_runs(tmp_path):
    runs = [run(tmp_path / f"seed{s}.safetensors", s) for s in (0, 1, 2)]
    out = tmp_path / "soup.safetensors"
    assert average_script().main([str(out)] + [str(p) for _, p in runs]) == 0
    soup, card = load_checkpoint(out)
    states = [m.state_dict() for m, _ in runs]
    for key, value in soup.state_dict().items():
        if value.is_floating_point():
            expected = sum(s[key].double() for s in states) / 3
            assert torch.allclose(value.double(), expected, atol=1e-6), key
        else:
            assert torch.equal(value, states[0][key]), key
    assert [r["path"] for r in card.training["averaged_from"]] == [str(p) for _, p in runs]
    assert all(len(r["file_sha256"]) == 64 for r in card.training["averaged_from"])
    assert not card.metrics          # not validated: the first run's scores are not the average's
    with pytest.raises(Exception):    # never over an existing file
        average_script().main([str(out)] + [str(p) for _, p in runs])


def test_runs_of_another_architecture_are_refused(tmp_path):
    _, a = run(tmp_path / "a.safetensors", 0)
    _, b = run(tmp_path / "b.safetensors", 1, width=0.0625)
    with pytest.raises(SystemExit, match="architecture"):
        average_script().main([str(tmp_path / "soup.safetensors"), str(a), str(b)])
    assert not (tmp_path / "soup.safetensors").exists()
