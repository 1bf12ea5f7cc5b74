"""Cuts the replay crops that ship with the package (src_models/replay_crops/): a few fixed crops of
each bundled model's own training images, so a fine-tuning round can replay and check the model's
training data on a machine that does not have the data sets (run from the repository root):

    python scripts/make_replay_crops.py /work/shared/data

Each crop is named <task>__<image name>.png (+ _mask.png, instance ids renumbered 1..n); a round
uses only the crops whose image its card lists in data_split["train"].
"""
from __future__ import annotations

import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src_models.checkpoints import load_checkpoint  # noqa: E402

OUT = ROOT / "src_models" / "replay_crops"
SIZE = 320
COUNT = 4
DATASETS = {"glands": "GlaS", "nuclei": "MoNuSeg"}


def main(data_root: str) -> None:
    for old in OUT.glob("*.png"):
        old.unlink()
    for task, dataset in DATASETS.items():
        _, card = load_checkpoint(task)
        names = sorted(card.data_split["train"])
        rng = np.random.default_rng(0)
        for name in sorted(rng.choice(names, COUNT, replace=False).tolist()):
            root = Path(data_root) / dataset / "train"
            image = iio.imread(root / "images" / f"{name}.png")[..., :3]
            mask = iio.imread(root / "masks" / f"{name}.png")
            h, w = mask.shape
            y0, x0 = int(rng.integers(0, h - SIZE + 1)), int(rng.integers(0, w - SIZE + 1))
            image, mask = image[y0:y0 + SIZE, x0:x0 + SIZE], mask[y0:y0 + SIZE, x0:x0 + SIZE]
            ids = np.unique(mask)
            ids = ids[ids != 0]
            lut = np.zeros(int(mask.max()) + 1, np.uint16)
            lut[ids] = np.arange(1, ids.size + 1)
            iio.imwrite(OUT / f"{task}__{name}.png", np.ascontiguousarray(image))
            iio.imwrite(OUT / f"{task}__{name}_mask.png", lut[mask])
            print(task, name, (y0, x0), ids.size, "objects")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data")
