"""benchmarks/find_false_glands.py: which checkpoints count as all-image weights (every image a
training image, so the hard negatives come from all of them and there is no validation split)."""
from __future__ import annotations

import torch

from src_models import build_model
from src_models.checkpoints import card_for, save_checkpoint

from script_module import load_script


def script():
    return load_script("benchmarks/find_false_glands.py")


def checkpoint(path, validation):
    torch.manual_seed(0)
    model = build_model("unet", width=0.125)
    split = {"dataset": "GlaS", "train": ["a", "b"], "validation": validation}
    return str(save_checkpoint(model, path, card_for(model, task="glands", tile_size=64, data_split=split)))


def test_only_a_card_with_an_empty_validation_split_is_all_image_weights(tmp_path):
    find = script()
    from selected_weights import scored_model
    card = lambda name: scored_model(name)[1]            # noqa: E731  (what main() looks at)
    assert find.all_image_weights(card(checkpoint(tmp_path / "final.safetensors", [])))
    assert not find.all_image_weights(card(checkpoint(tmp_path / "selected.safetensors", ["c"])))
    assert not find.all_image_weights(card("glands"))    # a bundled name: its selected run is used
