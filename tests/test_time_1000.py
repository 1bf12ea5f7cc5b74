"""benchmarks/time_1000.py: times the Segment widget's job on a checkpoint and writes a JSON that a
model card's metrics accept as is. (What it measures is not asserted: speed lives in benchmarks.)"""
import importlib.util
import json
from pathlib import Path

import torch

from src_models import build_model
from src_models.checkpoints import ModelCard, card_for, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("time_1000", REPO / "benchmarks" / "time_1000.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_1000_writes_a_card_ready_json_for_a_tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("unet", width=0.0625, patch_size=16).eval()
    path = save_checkpoint(model, tmp_path / "tiny.safetensors",
                           card_for(model, tile_size=64, task="glands"))
    out = tmp_path / "speed.json"
    script = load_script()
    code = script.main([str(path), "--threads", "1", "--repeats", "2", "--runtime", "torch",
                        "--json", str(out), "--size", "96"])
    assert code == 0
    result = json.loads(out.read_text())
    assert {"seconds", "probabilities_s", "instances_s", "threads", "runtime", "cpu",
            "command"} <= set(result)
    assert result["seconds"] > 0 and result["probabilities_s"] > 0 and result["instances_s"] >= 0
    assert result["seconds"] >= result["probabilities_s"]
    assert result["threads"] == 1 and result["runtime"] == "torch" and result["task"] == "glands"
    assert result["command"].startswith("python benchmarks/time_1000.py ")
    assert "--runtime torch" in result["command"]
    assert result["cpu"]
    # the coordinator stores it in a card as metrics["speed_1000"]: the card schema accepts it
    card = card_for(model, tile_size=64, task="glands", metrics={"speed_1000": result})
    assert ModelCard.from_dict(card.to_dict()).metrics["speed_1000"] == result
