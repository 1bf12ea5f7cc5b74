"""Train a recipe (scripts/train_recipe.py's JSON) whose model sees its images zoomed: validation
runs through bench_zoom.zoom_predict at ZOOM, so the step is selected as the zoomed model would be
used. The zoom of the training crops is the recipe's `scale_jitter` (a crop of size*s source pixels
resized to size: s = 1/ZOOM is ZOOM times magnified).

    python benchmarks/train_zoomed.py RECIPE.json 1.5

An experiment (session 10, issue 13): the engine has no zoom setting, so a zoomed checkpoint is
only scored by bench_zoom.py.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    import src_models.train as train_module
    from bench_zoom import zoom_predict
    from src_models.checkpoints import card_path
    recipe = json.loads(Path(sys.argv[1]).read_text())
    if card_path(recipe["out"]).resolve() == Path(sys.argv[1]).resolve():
        sys.exit("the recipe is where the checkpoint's card will be written; name one differently")
    train_module.predict = functools.partial(zoom_predict, zoom=float(sys.argv[2]))
    summary = train_module.train(train_module.TrainConfig(**recipe))
    summary.pop("loss_history", None)
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
