"""Rebuilds the two shipped H&E samples from the shared data (run from the repository root):

    python -m napari_dca.samples._make_samples /work/shared/data

Each sample is a crop of at most 512 x 512 (top-left corner given below) of one image and its instance mask.
"""
from __future__ import annotations

import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

SIZE = 512
SAMPLES = {
    # file stem in this folder: (dataset, image name, top, left)
    # Both images are in napari-dca's validation split (src_models.data.split_names): the
    # validation-selected runs never trained on them, but the bundled final all-image weights did,
    # so a bundled model's result on them looks better than on a new slide (the layer name says so).
    "glands_GlaS_train_12": ("GlaS", "train_12", 0, 31),
    "nuclei_MoNuSeg_TCGA-21-5786-01Z-00-DX1": ("MoNuSeg", "TCGA-21-5786-01Z-00-DX1", 244, 244),
}


def main(data_root: str) -> None:
    here = Path(__file__).parent
    for stem in list(here.glob("*.png")):
        stem.unlink()
    for stem, (dataset, name, top, left) in SAMPLES.items():
        root = Path(data_root) / dataset / "train"
        image = iio.imread(root / "images" / f"{name}.png")[top:top + SIZE, left:left + SIZE, :3]
        mask = iio.imread(root / "masks" / f"{name}.png")[top:top + SIZE, left:left + SIZE]
        # Renumber the cropped instances 1..n so the shipped mask is compact.
        ids = np.unique(mask)
        ids = ids[ids != 0]
        lut = np.zeros(int(mask.max()) + 1, np.uint16)
        lut[ids] = np.arange(1, ids.size + 1)
        iio.imwrite(here / f"{stem}.png", np.ascontiguousarray(image))
        iio.imwrite(here / f"{stem}_mask.png", lut[mask].astype(np.uint16))
        print(stem, image.shape, ids.size, "objects")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data")
