"""A checkpoint at twice the width computing what its parent computes, to continue training from
("accurate" variants; the method: src_models/widen.py).

    python scripts/widen_checkpoint.py PARENT.safetensors OUT.safetensors [--noise 0.02] [--seed 0]

--noise perturbs each duplicated channel's reading weights by that relative amount so twins can
diverge in training (0: the widened model's outputs equal the parent's to float rounding). The card
is the parent's with the new width, `training.widened_from` (path, sha256, noise, seed) and
`metrics` cleared: the widened model has not been validated. OUT must not exist.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent")
    ap.add_argument("out")
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from src_models.checkpoints import load_checkpoint, save_checkpoint
    from src_models.registry import build_model
    from src_models.widen import WIDEN_FACTOR, widen_state

    narrow, card = load_checkpoint(args.parent)
    kwargs = dict(card.model_kwargs)
    kwargs["width"] = kwargs["width"] * WIDEN_FACTOR
    wide = build_model(card.architecture, **kwargs)
    generator = torch.Generator().manual_seed(args.seed)
    wide.load_state_dict(widen_state(narrow, wide, noise=args.noise, generator=generator))
    new_card = card.to_dict()
    new_card["model_kwargs"] = dict(wide.config)
    new_card.setdefault("training", {})["widened_from"] = {
        "path": str(args.parent), "file_sha256": hashlib.sha256(Path(args.parent).read_bytes()).hexdigest(),
        "noise": args.noise, "seed": args.seed}
    new_card["metrics"] = {}
    new_card["parent"] = Path(args.parent).name
    out = save_checkpoint(wide, args.out, new_card, overwrite=False)
    print(f"wrote {out}: width {card.model_kwargs['width']} -> {kwargs['width']}, noise {args.noise}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
