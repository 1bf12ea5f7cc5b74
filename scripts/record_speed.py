"""Record a measured 1000x1000 time in a checkpoint's card, as `metrics.speed_1000`, which the
Model widget shows beside the model's name:

    python benchmarks/time_1000.py nuclei --threads 2 --repeats 5 --json nuclei_time.json
    python scripts/record_speed.py nuclei nuclei_time.json

CHECKPOINT: a bundled name or a .safetensors path; it is rewritten in place (atomically), weights
unchanged, every other card field unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("speed", help="JSON from benchmarks/time_1000.py --json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from src_models.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    model, card = load_checkpoint(path)
    card.metrics = dict(card.metrics or {}) | {"speed_1000": json.loads(Path(args.speed).read_text())}
    print(f"wrote {save_checkpoint(model, path, card)}")


if __name__ == "__main__":
    main()
