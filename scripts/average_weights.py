"""One checkpoint whose weights are the uniform average of several runs of one recipe ("model soup").

    python scripts/average_weights.py OUT.safetensors RUN1.safetensors RUN2.safetensors [...]

The runs must share the architecture, its settings and the card's head (runs of one recipe that
differ only by seed, continued from the same weights). Every floating-point tensor is averaged,
BatchNorm's running statistics included (not re-estimated); integer tensors (BatchNorm's step
counters) are taken from the first run. The card is the first run's, with `training.averaged_from`
naming every run (path and file sha256) and `metrics` cleared: the average has not been
validated. OUT must not exist.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def average_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform mean of state dicts with the same keys and shapes (integer tensors: the first's)."""
    keys = list(states[0])
    for k, s in enumerate(states[1:], 2):
        if list(s) != keys:
            raise ValueError(f"run {k} has other tensors than run 1: not runs of one architecture")
    out = {}
    for key in keys:
        tensors = [s[key] for s in states]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError(f"{key}: shapes differ between runs ({[tuple(t.shape) for t in tensors]})")
        if tensors[0].is_floating_point():
            out[key] = torch.stack([t.double() for t in tensors]).mean(0).to(tensors[0].dtype)
        else:
            out[key] = tensors[0].clone()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("give at least two runs to average")
    from src_models.checkpoints import load_checkpoint, save_checkpoint

    loaded = [load_checkpoint(p) for p in args.runs]
    first_card = loaded[0][1]
    for path, (_, card) in zip(args.runs[1:], loaded[1:]):
        same = (card.architecture, card.model_kwargs, card.head) == \
            (first_card.architecture, first_card.model_kwargs, first_card.head)
        if not same:
            raise SystemExit(f"{path}: another architecture, its settings or head than {args.runs[0]}")
    model = loaded[0][0]
    model.load_state_dict(average_state([m.state_dict() for m, _ in loaded]))
    card = first_card.to_dict()
    card.setdefault("training", {})["averaged_from"] = [
        {"path": str(p), "file_sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()}
        for p in args.runs]   # as ship_bundled.py records a run: checkpoints are a few MB
    card["metrics"] = {}
    out = save_checkpoint(model, args.out, card, overwrite=False)
    print(f"wrote {out}: the mean of {len(args.runs)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
