"""Checkpoints under bad input: cards validated field by field and sized before anything is built,
non-finite weights refused, atomic saves that keep the user's suffix, official .pt + .json card."""
import json

import numpy as np
import pytest
import torch

from src_models import build_model
from src_models.checkpoints import (CheckpointError, card_for, checkpoint_path, load_checkpoint,
                                    save_checkpoint)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("unet", width=0.0625, dca=False)


def with_card(path, edit):
    """A copy of checkpoint `path` whose embedded card is edit(card dict)."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        card = json.loads(f.metadata()["napari_dca_model_card"])
    edit(card)
    out = path.with_name("edited.safetensors")
    save_file(load_file(str(path)), str(out),
              metadata={"napari_dca_model_card": json.dumps(card), "format": "pt"})
    return out


def test_a_card_claiming_width_50_is_refused_before_building(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors", card_for(tiny))
    import resource
    import time
    start, peak = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="width' must be between"):
        load_checkpoint(with_card(path, lambda c: c["model_kwargs"].update(width=50)))
    with pytest.raises(CheckpointError, match="M parameters"):       # 2 G parameters, on meta
        load_checkpoint(with_card(path, lambda c: c["model_kwargs"].update(width=3.9)))
    with pytest.raises(CheckpointError, match="has shape"):           # fits, but not these weights
        load_checkpoint(with_card(path, lambda c: c["model_kwargs"].update(width=0.25)))
    assert time.perf_counter() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500_000  # kB


@pytest.mark.parametrize("field, value, words", [
    ("tile_size", 0, "tile_size"), ("tile_size", "256", "tile_size"), ("tile_size", 10 ** 9, "tile_size"),
    ("normalization", {"mu": [0.5]}, "normalization"),
    ("normalization", {"mean": [0.5, 0.5, 0.5], "std": [0, 1, 1]}, "normalization.std"),
    ("normalization", {"mean": ["a"], "std": [1]}, "normalization.mean"),
    ("task", "cells", "task"), ("class_names", "foreground", "class_names"),
    ("class_names", [], "class_names"), ("metrics", [1, 2], "metrics"),
    ("metrics", {"validation": [1, 2]}, "metrics"), ("data_split", {"train": "a"}, "data_split.train"),
    ("corrections", "yes", "corrections"), ("instance_params", {"threshold": 7}, "instance_params.threshold"),
    ("instance_params", {"mode": "x"}, "instance_params.mode"), ("parent", 3, "parent"),
    ("instance_params", {"min_mean_prob_over": "lumen"}, "instance_params.min_mean_prob_over"),
    ("instance_params", {"unseeded": 1}, "instance_params.unseeded"),
    ("instance_params", {"small_objects": "grow"}, "instance_params.small_objects"),
    ("instance_params", {"marker_opening": 10 ** 6}, "instance_params.marker_opening"),
    ("instance_params", {"grow": -1}, "instance_params.grow"),
    ("instance_params", {"min_mean_prob": 2}, "instance_params.min_mean_prob"),
    ("head", 7, "head"),
    ("model_kwargs", {"width": -1}, "model_kwargs.width"),
    ("model_kwargs", {"depth": 9}, "model_kwargs.depth"),
    ("model_kwargs", {"patch_size": 0}, "model_kwargs.patch_size"),
    ("model_kwargs", {"spatial_heads": "four"}, "model_kwargs.spatial_heads"),
    ("architecture", "resnet", "architecture"),
])
def test_every_card_field_is_validated_on_load(tiny, tmp_path, field, value, words):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors", card_for(tiny))

    def edit(card):
        if field == "model_kwargs":
            card["model_kwargs"].update(value)
        else:
            card[field] = value
    with pytest.raises(CheckpointError, match=words.replace(".", r"\.")):
        load_checkpoint(with_card(path, edit))


def test_non_finite_weights_are_refused_at_load_and_at_save(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    path = save_checkpoint(tiny, tmp_path / "m.safetensors", card_for(tiny))
    state = load_file(str(path))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][0] = float("nan")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_checkpoint(bad)
    broken = build_model("unet", width=0.0625, dca=False)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("inf"))
    with pytest.raises(CheckpointError, match="NaN or inf"):
        save_checkpoint(broken, tmp_path / "inf.safetensors", card_for(broken))
    assert not (tmp_path / "inf.safetensors").exists()


def test_the_users_suffix_is_kept(tiny, tmp_path):
    plain = save_checkpoint(tiny, tmp_path / "mymodel.safetensors", card_for(tiny))
    v2 = save_checkpoint(tiny, tmp_path / "mymodel.v2", card_for(tiny))
    assert v2.name == "mymodel.v2.safetensors" and (tmp_path / "mymodel.v2.json").exists()
    assert plain.exists() and checkpoint_path("a/b.c") .name == "b.c.safetensors"
    load_checkpoint(v2)


def test_a_failed_save_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors", card_for(tiny, trained_on="first"))
    before = path.read_bytes()
    import os
    import src_models.safe_write as sw

    def crash(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sw.os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tiny, path, card_for(tiny, trained_on="second"))
    monkeypatch.setattr(sw.os, "replace", os.replace)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_empty_and_folder_checkpoints_say_so(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_checkpoint(tmp_path / "e.safetensors")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


def test_official_pt_with_its_json_card_beside_it_works_from_segment(shared, tmp_path):
    import imageio.v3 as iio
    import tifffile
    from napari_dca import cli
    fixture = torch.load(shared / "fixtures/reference_dca/unet_dca.pt", weights_only=True)
    manifest = json.loads((shared / "fixtures/reference_dca/manifest.json").read_text())
    pt = tmp_path / "official.pth"
    torch.save(fixture["state_dict"], pt)
    (tmp_path / "official.json").write_text(json.dumps(
        {"architecture": "unet", "task": "nuclei", "tile_size": 64,
         "model_kwargs": {"official": manifest["unet"]["reference_kwargs"]}}))
    model, card = load_checkpoint(pt)
    with torch.no_grad():
        assert (model(fixture["input"]) - fixture["output"]).abs().max() <= 1e-4
    iio.imwrite(tmp_path / "x.png", np.zeros((40, 40, 3), np.uint8))
    assert cli.main(["segment", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "-c", str(pt),
                     "--quiet", "--device", "cpu"]) == 0
    assert tifffile.imread(tmp_path / "out" / "x.png.labels.tif").shape == (40, 40)


def test_the_head_field_is_checked_against_the_heads_src_models_defines(monkeypatch):
    import src_models.instances as instances
    from src_models.card_schema import validate_card
    monkeypatch.setattr(instances, "HEADS", ("binary", "three_class"), raising=False)
    base = {"architecture": "unet", "model_kwargs": {"width": 0.0625}}
    assert validate_card({**base, "head": "three_class"})["head"] == "three_class"
    with pytest.raises(CheckpointError, match="head.*three_class"):
        validate_card({**base, "head": "no_such_head"})


def test_numpy_numbers_in_a_card_are_saved_as_numbers(tiny, tmp_path):
    card = card_for(tiny, corrections={"objects": np.int64(3), "score": np.float32(0.5)},
                    metrics={"validation": {"dice": np.float32(0.25)}})
    path = save_checkpoint(tiny, tmp_path / "m.safetensors", card)
    _, loaded = load_checkpoint(path)
    assert loaded.corrections == {"objects": 3, "score": 0.5}
    assert loaded.metrics["validation"]["dice"] == 0.25
