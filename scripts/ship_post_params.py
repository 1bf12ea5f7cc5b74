"""Give a bundled model the post-processing tuned on a copy of it: a card-only change.

    cp src_models/pretrained/glands.safetensors /tmp/glands_tuned.safetensors
    python scripts/tune_instances.py /tmp/glands_tuned.safetensors DATA --write ...   # training images
    napari-dca evaluate -c /tmp/glands_tuned.safetensors ... --split val -o NEW       # and the old: OLD
    python scripts/ship_post_params.py glands /tmp/glands_tuned.safetensors NEW/evaluation.json \
        OLD/evaluation.json --note TEXT

The tuned copy must hold the same weights as the bundled model (checked tensor by tensor). The
bundled card gets the copy's instance_params and training.instance_tuning, its validation scores
become NEW's means (the step and image count stay), and training.post_processing records the
previous settings with OLD's scores, NEW's, and the note. Every other card field, and the
weights, stay as they were. Both files are written atomically (checkpoints.save_checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="bundled model name (glands, nuclei)")
    ap.add_argument("tuned", help="the tuned copy (.safetensors)")
    ap.add_argument("new_eval", help="evaluation.json of the tuned copy on the validation split")
    ap.add_argument("old_eval", help="evaluation.json of the bundled model as it is")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from src_models.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint

    path = resolve_checkpoint(args.name)
    model, card = load_checkpoint(path)
    tuned_model, tuned_card = load_checkpoint(args.tuned)
    mine, theirs = model.state_dict(), tuned_model.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        sys.exit(f"{args.tuned} does not hold the weights of {path}: not a card-only change")
    new, old = (json.loads(Path(p).read_text()) for p in (args.new_eval, args.old_eval))
    if new["task"] != card.task or old["task"] != card.task:
        sys.exit("the evaluations are not of this model's task")
    validation = dict((card.metrics or {}).get("validation") or {})
    validation |= {k: v for k, v in new["overall"].items() if v is not None}
    history = list((card.training or {}).get("post_processing") or [])
    history.append({"previous_instance_params": dict(card.instance_params),
                    "previous_validation": old["overall"], "new_validation": new["overall"],
                    "evaluations": [str(args.old_eval), str(args.new_eval)], "note": args.note})
    card.instance_params = dict(tuned_card.instance_params)
    card.metrics = dict(card.metrics or {}) | {"validation": validation}
    card.training = dict(card.training) | {
        "instance_tuning": tuned_card.training.get("instance_tuning"), "post_processing": history}
    print(f"wrote {save_checkpoint(model, path, card)}: instance_params {json.dumps(card.instance_params)}")


if __name__ == "__main__":
    main()
