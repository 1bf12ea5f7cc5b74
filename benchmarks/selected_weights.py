"""The weights to score on a bundled model's validation split.

A bundled model shipped as the final all-image run of a validation-selected recipe
(`scripts/train_recipe.py --all-images`, then `scripts/ship_bundled.py --final-of`) has learned from
its validation images, so a benchmark on them must use the selected run's weights instead. Those
are kept here, in benchmarks/weights/NAME_selected.safetensors (with their card, which still holds
the validation split); `training.selected_run.weights_sha256` in the bundled card names them.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"


def for_validation(name: str) -> str:
    """`name` itself, unless it is a bundled model whose card names a selected run: then the path of
    that run's weights (checked against the card's sha256)."""
    from src_models.checkpoints import bundled_checkpoints, load_checkpoint
    if name not in bundled_checkpoints():
        return name
    run = (load_checkpoint(name)[1].training or {}).get("selected_run")
    if not run:
        return name
    path = WEIGHTS / f"{name}_selected.safetensors"
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != run["weights_sha256"]:
        sys.exit(f"the bundled {name} weights were trained on every image; its selected run's weights "
                 f"({path}, sha256 {run['weights_sha256'][:12]}) are needed to score the validation split")
    print(f"{name}: scoring its selected run's weights ({path.name}); the bundled weights have seen "
          f"the validation images", file=sys.stderr)
    return str(path)


def scored_model(name: str):
    """(model, card, data root): `for_validation`'s weights and the task's data set under
    NAPARI_DCA_SHARED."""
    from src_models.checkpoints import load_checkpoint, resolve_checkpoint
    from time_1000 import DATASET_FOR_TASK, shared_dir
    model, card = load_checkpoint(resolve_checkpoint(for_validation(name)))
    return model, card, shared_dir() / "data" / DATASET_FOR_TASK[card.task] / "train"


def validation_files(card, root: Path) -> list[tuple]:
    """The images of the card's validation split as `evaluate.match_files` pairs (name, image
    path, mask path)."""
    from src_models.evaluate import match_files, split_of
    return match_files(root / "images", root / "masks", split_of(card, root / "images", "val"))


def validation_set(name: str):
    """(model, card, data root, validation files) of a checkpoint as the validation benchmarks use
    it: `scored_model` and its card's `validation_files`."""
    model, card, root = scored_model(name)
    return model, card, root, validation_files(card, root)
