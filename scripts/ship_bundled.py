"""Make a trained checkpoint the bundled model of its task, its card recording the runs compared.

    python scripts/ship_bundled.py TASK WINNER.safetensors WINNER_EVAL.json LOSER_EVAL.json [...]
        [--note TEXT] [--name NAME] [--speed TIME_1000.json]

The card gets the winner's validation scores (means over the validation images, from
`napari-dca evaluate --split val` JSON), a `training.selection` record naming every run compared
with its scores, and the note (e.g. that the weights are the validation-selected ones).
--name ships it under another bundled name (`glands_accurate`: the accurate variant beside the
fast default); --speed records the measured 1000x1000 time (`benchmarks/time_1000.py --json`) as
`metrics.speed_1000`, which the Model widget shows.
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
    ap.add_argument("--name", help="bundled name (default: TASK); e.g. glands_accurate")
    ap.add_argument("--speed", help="JSON from benchmarks/time_1000.py --json")
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
    if args.speed:
        card.metrics["speed_1000"] = json.loads(Path(args.speed).read_text())
    card.training = dict(card.training) | {"selection": runs, "note": args.note}
    name = args.name or args.task
    if not name.startswith(args.task):
        sys.exit(f"--name {name} must start with the task ({args.task}), so that the list groups it")
    out = save_checkpoint(model, PRETRAINED_DIR / f"{name}.safetensors", card)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
