"""Make a trained checkpoint the bundled model of its task, its card recording the runs compared.

    python scripts/ship_bundled.py TASK WINNER.safetensors WINNER_EVAL.json LOSER_EVAL.json [...]
        [--note TEXT] [--name NAME] [--speed TIME_1000.json]
    python scripts/ship_bundled.py TASK FINAL.safetensors --final-of SELECTED.safetensors [--note TEXT]

The card gets the winner's validation scores (means over the validation images, from
`napari-dca evaluate --split val` JSON), a `training.selection` record naming every run compared
with its scores, and the note (e.g. that the weights are the validation-selected ones).
--name ships it under another bundled name (`glands_accurate`: the accurate variant beside the
fast default); --speed records the measured 1000x1000 time (`benchmarks/time_1000.py --json`) as
`metrics.speed_1000`, which the Model widget shows.

--final-of ships the final all-image weights of a recipe chosen on the validation split
(`train_recipe.py --all-images`): FINAL has no validation split, so its card takes the selected
run's scores, post-processing, overlap and 1000x1000 time (same architecture, same graph), and
records that run as `training.selected_run` (weights sha256, step, data split, runs compared).
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
    ap.add_argument("evaluations", nargs="*", help="evaluation.json of the winner first, then the others")
    ap.add_argument("--final-of", metavar="SELECTED.safetensors",
                    help="CHECKPOINT is the all-image run of this validation-selected checkpoint")
    ap.add_argument("--note", default="")
    ap.add_argument("--name", help="bundled name (default: TASK); e.g. glands_accurate")
    ap.add_argument("--speed", help="JSON from benchmarks/time_1000.py --json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from src_models.checkpoints import PRETRAINED_DIR, load_checkpoint, save_checkpoint

    name = args.name or args.task
    if not name.startswith(args.task):
        sys.exit(f"--name {name} must start with the task ({args.task}), so that the list groups it")
    model, card = load_checkpoint(args.checkpoint)
    if args.final_of:
        final_card(card, args.final_of, args.note)
    elif args.evaluations:
        selection_card(card, args.evaluations, args.speed, args.note)
    else:
        sys.exit("give the winner's evaluation.json (and the others'), or --final-of")
    out = save_checkpoint(model, PRETRAINED_DIR / f"{name}.safetensors", card)
    print(f"wrote {out}")


def selection_card(card, evaluations: list[str], speed: str | None, note: str) -> None:
    """The winner's validation scores, every compared run (`training.selection`), the note."""
    runs = []
    for path in evaluations:
        report = json.loads(Path(path).read_text())
        runs.append({"evaluation": str(path), "overall": report["overall"],
                     "checkpoint": report.get("meta", {}).get("checkpoint")})
    card.metrics = {"validation": {k: v for k, v in runs[0]["overall"].items() if v is not None}
                    | {"step": card.training.get("best_step"), "images": len(card.data_split.get("validation", []))}}
    if speed:
        card.metrics["speed_1000"] = json.loads(Path(speed).read_text())
    card.training = dict(card.training) | {"selection": runs, "note": note}


def final_card(card, selected_path: str, note: str) -> None:
    """Fill the card of all-image weights from the validation-selected run they repeat."""
    import hashlib

    from src_models.checkpoints import load_checkpoint, resolve_checkpoint
    if (card.data_split or {}).get("validation"):
        sys.exit("--final-of: the checkpoint has a validation split; it is not an all-image run")
    _, selected = load_checkpoint(selected_path)
    if selected.task != card.task or selected.model_kwargs != card.model_kwargs:
        sys.exit(f"--final-of: {selected_path} is another model ({selected.task}, {selected.model_kwargs})")
    every = len(card.data_split.get("train", []))
    trained, held = (len(selected.data_split.get(k, [])) for k in ("train", "validation"))
    card.metrics = dict(selected.metrics)
    card.instance_params = dict(selected.instance_params or {})
    card.overlap = selected.overlap
    card.trained_on = (f"{card.data_split.get('dataset', card.task)} (all {every} images: the selected "
                       f"run's {trained} training + {held} validation images); validation scores: the "
                       f"selected run's")
    digest = hashlib.sha256(resolve_checkpoint(selected_path).read_bytes()).hexdigest()
    keep = ("selection", "instance_tuning", "note", "best_step", "init", "steps", "lr")
    card.training = dict(card.training) | {"note": note, "selected_run": {
        "checkpoint": str(selected_path), "weights_sha256": digest, "created": selected.created,
        "data_split": selected.data_split} | {k: selected.training[k] for k in keep if k in selected.training}}


if __name__ == "__main__":
    main()
