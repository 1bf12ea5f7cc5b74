"""Make a trained checkpoint the bundled model of its task, its card recording the runs compared.

    python scripts/ship_bundled.py TASK WINNER.safetensors WINNER_EVAL.json LOSER_EVAL.json [...]
        [--note TEXT]

The card gets the winner's validation scores (means over the validation images, from
`napari-dca evaluate --split val` JSON), a `training.selection` record naming every run compared
with its scores, and the note (e.g. that the weights are the validation-selected ones).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("glands", "nuclei"))
    ap.add_argument("checkpoint")
    ap.add_argument("evaluations", nargs="+", help="evaluation.json of the winner first, then the others")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from src_models.checkpoints import PRETRAINED_DIR, load_checkpoint, save_checkpoint

    model, card = load_checkpoint(args.checkpoint)
    runs = []
    for path in args.evaluations:
        report = json.loads(Path(path).read_text())
        runs.append({"evaluation": str(path), "overall": report["overall"],
                     "checkpoint": report.get("meta", {}).get("checkpoint")})
    card.metrics = {"validation": {k: v for k, v in runs[0]["overall"].items() if v is not None}
                    | {"step": card.training.get("best_step"), "images": len(card.data_split.get("validation", []))}}
    card.training = dict(card.training) | {"selection": runs, "note": args.note}
    out = save_checkpoint(model, PRETRAINED_DIR / f"{args.task}.safetensors", card)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
