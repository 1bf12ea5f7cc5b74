"""Label images as OME-Zarr (NGFF 0.4 labels, with a pyramid so viewers open them at any zoom).

Layout (zarr format 2, what NGFF 0.4 readers such as ome-zarr-py / napari-ome-zarr expect):

    <name>.ome.zarr/                  .zattrs {"labels": ["<label name>"]}
        labels/<label name>/          .zattrs {"multiscales": [...], "image-label": {...}}
            0/  1/  2/ ...            uint32, level k is level 0 sampled every 2**k pixels

Level 0 is in the slide's level-0 pixel grid; each level's coordinateTransformations scale is its
pixel size in µm (or in level-0 pixels when the slide has no pixel size). Lower levels take every
2**k-th pixel (nearest neighbour: labels must not be averaged). Blocks are written as they come
(one chunk of the segmentation at a time) into a temporary folder renamed into place on close,
so a reader never sees a half-written pyramid.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

NGFF_VERSION = "0.4"
SMALLEST_SIDE = 1024     # stop adding levels once the level fits in this


def pyramid_levels(shape: tuple[int, int], smallest: int = SMALLEST_SIDE) -> int:
    n, (h, w) = 1, shape
    while max(h, w) > smallest and min(h, w) >= 2:
        h, w = -(-h // 2), -(-w // 2)
        n += 1
    return n


class LabelPyramidWriter:
    """Streams blocks of a (H, W) label image into an OME-Zarr label pyramid.

    write(y0, x0, block): block origins must be multiples of 2**(levels-1) (chunk-aligned blocks
    of the segmentation are) so every level takes exactly the block's own pixels."""

    def __init__(self, path: str | Path, shape: tuple[int, int], name: str = "labels",
                 mpp: tuple[float, float] | None = None, chunk: int = 1024,
                 levels: int | None = None, dtype=np.uint32,
                 colors: dict[int, tuple[int, int, int]] | None = None):
        import zarr
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")   # dot: folder listings skip it
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.shape = (int(shape[0]), int(shape[1]))
        self.name = name
        self.levels = levels or pyramid_levels(self.shape)
        self.dtype = np.dtype(dtype)
        root = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
        root.attrs["labels"] = [name]
        group = root.create_group("labels").create_group(name)
        self.arrays = []
        h, w = self.shape
        for k in range(self.levels):
            self.arrays.append(group.create_array(str(k), shape=(h, w), chunks=(chunk, chunk),
                                                  dtype=self.dtype, fill_value=0))
            h, w = -(-h // 2), -(-w // 2)
        unit = "micrometer" if mpp is not None else None
        base = mpp or (1.0, 1.0)
        axes = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in "yx"]
        datasets = [{"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [base[0] * 2 ** k, base[1] * 2 ** k]}]}
            for k in range(self.levels)]
        group.attrs["multiscales"] = [{"version": NGFF_VERSION, "name": name, "axes": axes,
                                       "datasets": datasets, "type": "nearest",
                                       "metadata": {"method": "every 2**k-th pixel"}}]
        label_meta = {"version": NGFF_VERSION}
        if colors:
            label_meta["colors"] = [{"label-value": int(v), "rgba": [*map(int, c), 255]}
                                    for v, c in colors.items()]
        group.attrs["image-label"] = label_meta

    def write(self, y0: int, x0: int, block: np.ndarray) -> None:
        block = np.asarray(block)
        for k, array in enumerate(self.arrays):
            step = 2 ** k
            if y0 % step or x0 % step:
                raise ValueError(f"block origin ({y0}, {x0}) is not a multiple of {step}")
            sub = block[::step, ::step]
            ys, xs = y0 // step, x0 // step
            array[ys:ys + sub.shape[0], xs:xs + sub.shape[1]] = sub.astype(self.dtype, copy=False)

    def write_all(self, blocks: Iterable[tuple[int, int, np.ndarray]]) -> Path:
        for y0, x0, block in blocks:
            self.write(y0, x0, block)
        return self.close()

    def close(self) -> Path:
        """Renames the finished pyramid into place (replacing an older one at that path)."""
        if self.path.exists():
            old = self.path.with_name(self.path.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old)
        else:
            os.replace(self.tmp, self.path)
        return self.path


def open_labels(path: str | Path, name: str | None = None, level: int = 0):
    """A level of a label pyramid written by LabelPyramidWriter, as a zarr array."""
    import zarr
    root = zarr.open_group(str(path), mode="r")
    name = name or root.attrs["labels"][0]
    return root["labels"][name][str(level)]
