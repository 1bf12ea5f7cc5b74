"""Train one model from a JSON recipe (the TrainConfig fields), as the bundled models were:

    python scripts/train_recipe.py benchmarks/results/heads/glands_three_class.json [--out PATH]
        [--all-images]

--all-images trains the same recipe on every image (train + validation split, no selection): the
final weights once the recipe was chosen on the validation split. The recipe files under
benchmarks/results/heads/ are the exact runs behind the bundled models' cards.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--out", help="checkpoint path (default: the recipe's)")
    ap.add_argument("--all-images", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from src_models.checkpoints import card_path
    from src_models.train import TrainConfig, train

    recipe = json.loads(Path(args.recipe).read_text())
    if args.out:
        recipe["out"] = args.out
    # The checkpoint's readable card is written beside it as NAME.json: a recipe saved under that
    # name would be overwritten by the card at the first validation.
    if card_path(recipe["out"]).resolve() == Path(args.recipe).resolve():
        sys.exit(f"the recipe {args.recipe} is where the card of {recipe['out']} will be written; "
                 f"name the recipe or the checkpoint differently")
    if args.all_images:
        recipe["validate"] = False
    summary = train(TrainConfig(**recipe))
    summary.pop("loss_history", None)
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
