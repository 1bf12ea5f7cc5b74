"""Give a bundled model the tile overlap measured to keep its object scores: a card-only change.

    python benchmarks/bench_overlap.py glands --size 1000 --overlaps 0.25,0.125 --out OUT.md
    python scripts/ship_overlap.py glands 0.125 OUT.json --note TEXT

OUT.json (from `bench_overlap.py`) must hold the new overlap and the model's current one, measured
on the same images with this model's weights (runtime_onnx.model_digest, checked against the
digest the benchmark recorded), or with its validation-selected run's weights
(benchmarks/weights/NAME_selected.safetensors), which is what bench_overlap scores for a final
all-image model. The card gets `overlap` and `training.overlap_choice` (previous value,
both rows' means and tile counts, the evidence file and the note); the weights and every other
field stay as they were. Written atomically (checkpoints.save_checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def selected_run_digest(name: str) -> str | None:
    """model_digest of the bundled model's validation-selected run, when its card names one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from selected_weights import for_validation
    from src_models.checkpoints import load_checkpoint
    from src_models.runtime_onnx import model_digest
    path = for_validation(name)
    return model_digest(load_checkpoint(path)[0]) if path != name else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="bundled model name (glands, nuclei)")
    ap.add_argument("overlap", type=float)
    ap.add_argument("evidence", help="JSON written by benchmarks/bench_overlap.py")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from src_models.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
    from src_models.inference import overlap_for
    from src_models.runtime_onnx import model_digest

    path = resolve_checkpoint(args.name)
    model, card = load_checkpoint(path)
    evidence = json.loads(Path(args.evidence).read_text())
    previous = overlap_for(card)
    rows = evidence.get("overlaps", {})
    missing = [o for o in (args.overlap, previous) if str(o) not in rows]
    if missing:
        sys.exit(f"{args.evidence} has no row for overlap {missing}: measure both with bench_overlap.py")
    measured_on = "these weights"
    if evidence.get("weights") != model_digest(model):
        # A final all-image model is benchmarked on its validation-selected run's weights
        # (benchmarks/selected_weights.py): the tiling's evidence then comes from that run.
        selected = selected_run_digest(args.name)
        if evidence.get("weights") != selected:
            sys.exit(f"{args.evidence} was measured with other weights than {path}'s "
                     f"(or its selected run's)")
        measured_on = "the selected run's weights (training.selected_run)"
    choice = {"previous": previous, "value": args.overlap, "size": evidence["size"],
              "images": len(evidence["images"]), "evidence": str(args.evidence), "measured_on": measured_on, "note": args.note,
              "rows": {o: {"means": rows[o]["means"], "tiles": rows[o]["tiles"]}
                       for o in (str(previous), str(args.overlap))}}
    card.overlap = args.overlap
    card.training = dict(card.training or {}) | {"overlap_choice": choice}
    print(f"wrote {save_checkpoint(model, path, card)}: overlap {previous} -> {args.overlap}")


if __name__ == "__main__":
    main()
