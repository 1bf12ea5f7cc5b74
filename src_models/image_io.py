"""Reading images (TIFF, PNG, JPEG) and writing label / probability TIFFs.

TIFFs are opened lazily through tifffile's zarr store when they are large (or when asked), so
`inference.predict` reads them one tile at a time; PNG and JPEG are decoded whole (imageio).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
LAZY_BYTES = 256 * 1024 ** 2  # TIFFs at least this large on disk are opened lazily by default


def list_images(inputs: Iterable[str | Path], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Files as given plus the image files directly inside given folders (sorted, not recursive).
    Raises FileNotFoundError for a path that does not exist."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir()
                                if p.is_file() and p.suffix.lower() in suffixes
                                and not p.name.startswith(".")))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found


def read_image(path: str | Path, lazy: bool | None = None) -> Any:
    """An image as an array: numpy, or for TIFFs read lazily a zarr array (full-resolution level of
    a pyramid) that reads only the tiles/strips indexed. lazy=None: lazy for TIFFs >= 256 MB.

    Layout is the file's: (H, W), (H, W, C), or (Z, H, W[, C]) for multi-page TIFFs."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        import tifffile
        if lazy is None:
            lazy = path.stat().st_size >= LAZY_BYTES
        if lazy:
            return open_tiff_lazy(path)
        return tifffile.imread(path)
    if suffix in IMAGE_SUFFIXES:
        import imageio.v3 as iio
        return np.asarray(iio.imread(path))
    raise ValueError(f"{path.name}: unsupported image type {suffix!r}; "
                     f"expected one of {', '.join(IMAGE_SUFFIXES)}")


def open_tiff_lazy(path: str | Path) -> Any:
    """A zarr array over a TIFF's first series (level 0 if it is a pyramid); nothing is decoded
    until indexed."""
    import tifffile
    import zarr
    store = tifffile.imread(path, aszarr=True)
    node = zarr.open(store, mode="r")
    if hasattr(node, "shape"):
        return node
    return node["0"]  # multiscale group: the full-resolution level


def smallest_label_dtype(max_label: int) -> np.dtype:
    if max_label < 2 ** 8:
        return np.dtype(np.uint8)
    if max_label < 2 ** 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def write_labels(path: str | Path, labels: np.ndarray) -> Path:
    """Label image as a zlib-compressed TIFF in the smallest unsigned dtype that holds its ids."""
    import tifffile
    path = Path(path)
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    dtype = smallest_label_dtype(int(labels.max()) if labels.size else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, labels.astype(dtype, copy=False), compression="zlib",
                     photometric="minisblack", metadata={"axes": "YX" if labels.ndim == 2 else "ZYX"})
    return path


def write_probabilities(path: str | Path, prob: np.ndarray) -> Path:
    """Probabilities (H, W), (K, H, W) or a stack as a float32 zlib-compressed TIFF."""
    import tifffile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.asarray(prob, dtype=np.float32), compression="zlib",
                     photometric="minisblack")
    return path
