"""scripts/ship_bundled.py --final-of: the card of all-image weights takes the selected run's record."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src_models import build_model
from src_models.checkpoints import card_for, load_checkpoint, save_checkpoint

from script_module import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ship_bundled.py"


def ship_script():
    return load_script("scripts/ship_bundled.py")


def tiny(path, **card):
    torch.manual_seed(0)
    model = build_model("unet", width=0.125)
    return model, save_checkpoint(model, path, card_for(model, task="glands", tile_size=64, **card))


def test_final_card_records_the_selected_run(tmp_path):
    selected_split = {"dataset": "GlaS", "train": ["a", "b"], "validation": ["c"]}
    _, selected = tiny(tmp_path / "selected.safetensors", data_split=selected_split,
                       metrics={"validation": {"object_f1": 0.86, "step": 900}, "speed_1000": {"seconds": 1.5}},
                       instance_params={"mode": "glands", "threshold": 0.5, "min_size": 800},
                       training={"best_step": 900, "selection": [{"evaluation": "val.json"}], "steps": 1200})
    _, final = tiny(tmp_path / "final.safetensors", training={"steps": 900, "validate": False},
                    data_split={"dataset": "GlaS", "train": ["a", "b", "c"], "validation": []})
    _, card = load_checkpoint(final)
    ship_script().final_card(card, str(selected), "all-image run")
    assert card.metrics["validation"] == {"object_f1": 0.86, "step": 900}
    assert card.metrics["speed_1000"] == {"seconds": 1.5}
    assert card.instance_params["min_size"] == 800
    run = card.training["selected_run"]
    assert run["data_split"] == selected_split and run["best_step"] == 900 and len(run["weights_sha256"]) == 64
    assert card.training["steps"] == 900 and card.training["validate"] is False   # the final run's own recipe
    assert card.data_split["validation"] == [] and "all 3 images" in card.trained_on


def test_final_of_refuses_weights_that_have_a_validation_split(tmp_path):
    _, selected = tiny(tmp_path / "selected.safetensors", data_split={"train": ["a"], "validation": ["b"]})
    _, card = load_checkpoint(selected)
    with pytest.raises(SystemExit, match="not an all-image run"):
        ship_script().final_card(card, str(selected), "")


def test_bundled_all_image_models_keep_their_selected_weights():
    # A bundled model shipped with --final-of has seen its validation images; benchmarks score its
    # selected run instead, whose weights must be in benchmarks/weights/ and match the card's record.
    import sys
    sys.path.insert(0, str(SCRIPT.parents[1] / "benchmarks"))
    from selected_weights import for_validation
    from src_models.checkpoints import bundled_checkpoints
    for name in bundled_checkpoints():
        _, card = load_checkpoint(name)
        if not (card.training or {}).get("selected_run"):
            continue
        path = for_validation(name)
        assert path.endswith(f"{name}_selected.safetensors")
        _, selected = load_checkpoint(path)
        assert selected.data_split["validation"] and not card.data_split["validation"]
        assert set(selected.data_split["validation"]) <= set(card.data_split["train"])
        assert selected.metrics["validation"] == card.metrics["validation"]
        assert selected.instance_params == card.instance_params
