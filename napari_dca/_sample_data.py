"""Two small real H&E samples (GlaS glands, MoNuSeg nuclei) with their ground-truth instances.

Their licences differ from napari-dca's: see napari_dca/samples/LICENSE.md; each layer's metadata
carries the licence and citation so they travel with the data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES_DIR = Path(__file__).parent / "samples"

GLANDS = {
    "file": "glands_GlaS_train_12",
    "name": "H&E glands (GlaS train_12, in the bundled model's training data)",
    "task": "glands",
    "licence": "GlaS: research use only, no commercial use",
    "citation": ("Sirinukunwattana et al., IEEE TMI 34(11) 2015; "
                 "Sirinukunwattana et al., Medical Image Analysis 35, 2017"),
}
NUCLEI = {
    "file": "nuclei_MoNuSeg_TCGA-21-5786-01Z-00-DX1",
    "name": "H&E nuclei (MoNuSeg TCGA-21-5786, in the bundled model's training data)",
    "task": "nuclei",
    "licence": "MoNuSeg: CC BY-NC-SA 4.0",
    "citation": "Kumar et al., IEEE TMI 36(7) 2017; Kumar et al., IEEE TMI 39(5) 2020",
}


def _read_png(path: Path) -> np.ndarray:
    import imageio.v3 as iio
    return np.asarray(iio.imread(path))


def load_sample(sample: dict, with_mask: bool = True) -> list[tuple]:
    """-> napari LayerData tuples: the RGB image, then (optionally) its ground-truth instances."""
    meta = {"napari_dca_sample": sample["task"], "licence": sample["licence"],
            "citation": sample["citation"],
            "licence_file": str(SAMPLES_DIR / "LICENSE.md")}
    image = _read_png(SAMPLES_DIR / f"{sample['file']}.png")
    layers = [(image, {"name": sample["name"], "rgb": True, "metadata": dict(meta)}, "image")]
    if with_mask:
        mask = _read_png(SAMPLES_DIR / f"{sample['file']}_mask.png").astype(np.int32)
        layers.append((mask, {"name": f"{sample['name']} ground truth", "visible": False,
                              "opacity": 0.5, "metadata": dict(meta)}, "labels"))
    return layers


def glands_sample() -> list[tuple]:
    """H&E colon glands, 433 x 512 crop of GlaS train_12 (research use only)."""
    return load_sample(GLANDS)


def nuclei_sample() -> list[tuple]:
    """H&E nuclei, 512 x 512 crop of MoNuSeg TCGA-21-5786-01Z-00-DX1 (CC BY-NC-SA 4.0)."""
    return load_sample(NUCLEI)
