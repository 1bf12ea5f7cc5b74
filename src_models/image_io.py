"""Reading images (TIFF, PNG, JPEG) and writing label / probability TIFFs.

TIFFs are opened lazily through tifffile's zarr store when their DECODED size is large (a 1 MB
zlib TIFF can hold 1 GB of pixels), so `inference.predict` reads them one tile or strip at a time;
PNG and JPEG are decoded whole (imageio; Pillow refuses decompression bombs). A planar TIFF
(PlanarConfiguration=separate, samples as (S, H, W)) is given channels-last like every other colour
image. Writers go through `safe_write.write_atomic`: a kill never leaves a half-written TIFF.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .safe_write import write_atomic

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
LAZY_BYTES = 256 * 1024 ** 2  # TIFFs whose pixels take at least this much memory are opened lazily
# Names `napari-dca segment` gives its outputs (see segment_outputs.py): a folder listing skips
# them so a rerun with -o inside the input folder does not segment its own results.
OUTPUT_SUFFIXES = (".labels.tif", ".prob.tif")


def is_output_name(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(OUTPUT_SUFFIXES)


def list_images(inputs: Iterable[str | Path], suffixes: Sequence[str] = IMAGE_SUFFIXES,
                include_outputs: bool = False) -> list[Path]:
    """Files as given plus the image files directly inside given folders (sorted, not recursive;
    dot-files and segment's own outputs `*.labels.tif` / `*.prob.tif` skipped).
    Raises FileNotFoundError for a path that does not exist."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir()
                                if p.is_file() and p.name.lower().endswith(tuple(suffixes))
                                and not p.name.startswith(".")
                                and (include_outputs or not is_output_name(p))))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found


def _check_not_empty(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path.name}: empty file (0 bytes); was it copied completely?")


def read_image(path: str | Path, lazy: bool | None = None) -> Any:
    """An image as an array: numpy, or for TIFFs read lazily an array-like (zarr) that reads only
    the tiles/strips indexed. lazy=None: lazy when the decoded pixels take >= LAZY_BYTES.

    Layout: (H, W), (H, W, C), or (Z, H, W[, C]) for multi-page TIFFs. ValueError with the file's
    name for an empty, truncated or unreadable file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{path.name}: unsupported image type {suffix!r}; "
                         f"expected one of {', '.join(IMAGE_SUFFIXES)}")
    _check_not_empty(path)
    try:
        if suffix in TIFF_SUFFIXES:
            return _read_tiff(path, lazy)
        import imageio.v3 as iio
        return np.asarray(iio.imread(path))
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - decoders raise many types; the user needs one line
        raise ValueError(f"{path.name}: cannot read this image ({type(err).__name__}: {err}); "
                         f"is it truncated or another format?") from err


def tiff_info(path: str | Path) -> dict[str, Any]:
    """Shape, dtype, axes, decoded bytes and the intensity tags of a TIFF's first series, read
    from its header only."""
    import tifffile
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        page = series.pages[0] if series.pages else tif.pages[0]
        shape, dtype = tuple(series.shape), np.dtype(series.dtype)
        tags = page.tags
        info = {"shape": shape, "dtype": dtype, "axes": series.axes,
                "nbytes": int(np.prod(shape, dtype=np.float64) * dtype.itemsize),
                "bits": int(np.max(page.bitspersample)) if page.bitspersample else None,
                "max_sample": None,
                # planar colour: samples stored as separate (S, H, W) planes
                "planar_rgb": (int(page.planarconfig) == int(tifffile.PLANARCONFIG.SEPARATE)
                               and int(page.photometric) == int(tifffile.PHOTOMETRIC.RGB))}
        for name in ("SMaxSampleValue", "MaxSampleValue"):
            tag = tags.get(name)
            if tag is not None:
                value = np.max(np.asarray(tag.value, dtype=np.float64))
                if np.isfinite(value):
                    info["max_sample"] = float(value)
                    break
    return info


def tiff_value_range(path: str | Path) -> tuple[float, float] | None:
    """(0, max) from a TIFF's tags when they say its integer pixels use less than their dtype's
    range (MaxSampleValue / SMaxSampleValue, or BitsPerSample below the dtype's bits, e.g. 12-bit
    data stored in 16 bits). None when the tags say nothing more than the dtype does."""
    info = tiff_info(path)
    dtype = info["dtype"]
    if not np.issubdtype(dtype, np.unsignedinteger) or dtype.itemsize == 1:
        return None
    full = float(np.iinfo(dtype).max)
    if info["max_sample"] is not None and 0 < info["max_sample"] < full:
        return 0.0, info["max_sample"]
    if info["bits"] and info["bits"] < dtype.itemsize * 8:
        return 0.0, float(2 ** info["bits"] - 1)
    return None


def _read_tiff(path: Path, lazy: bool | None) -> Any:
    import tifffile
    info = tiff_info(path)
    if lazy is None:
        lazy = info["nbytes"] >= LAZY_BYTES
    planar = info["planar_rgb"] and info["axes"].endswith("SYX") and info["shape"][-3] in (3, 4)
    if lazy:
        image = open_tiff_lazy(path)
        return ChannelsLast(image) if planar else image
    image = tifffile.imread(path)
    if planar and image.ndim >= 3 and image.shape[-3] in (3, 4):
        image = np.ascontiguousarray(np.moveaxis(image, -3, -1))
    return image


class ChannelsLast:
    """A lazy (..., S, H, W) array seen as (..., H, W, S): planar RGB TIFFs indexed like
    interleaved ones, still reading only the indexed window."""

    def __init__(self, source: Any):
        self.source = source
        shape = tuple(source.shape)
        self.shape = shape[:-3] + shape[-2:] + (shape[-3],)
        self.dtype = np.dtype(source.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis or k is None for k in key):
            raise IndexError("ChannelsLast supports plain integer/slice indexing only")
        key = key + (slice(None),) * (self.ndim - len(key))
        lead, ky, kx, ks = key[:-3], key[-3], key[-2], key[-1]
        block = np.asarray(self.source[lead + (ks, ky, kx)])
        if isinstance(ks, (int, np.integer)):
            return block
        s_axis = sum(not isinstance(k, (int, np.integer)) for k in lead)
        return np.moveaxis(block, s_axis, -1)

    def __array__(self, dtype=None, copy=None):
        block = self[(slice(None),) * self.ndim]
        return block if dtype is None else block.astype(dtype)


def open_tiff_lazy(path: str | Path) -> Any:
    """A zarr array over a TIFF's first series (level 0 if it is a pyramid); nothing is decoded
    until indexed, and then only the tiles/strips the index touches."""
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


def write_labels(path: str | Path, labels: np.ndarray, overwrite: bool = True) -> Path:
    """Label image as a zlib-compressed TIFF in the smallest unsigned dtype that holds its ids,
    written atomically (see safe_write)."""
    import tifffile
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    dtype = smallest_label_dtype(int(labels.max()) if labels.size else 0)
    data = labels.astype(dtype, copy=False)
    axes = "YX" if labels.ndim == 2 else "ZYX"
    return write_atomic(path, lambda tmp: tifffile.imwrite(
        tmp, data, compression="zlib", photometric="minisblack", metadata={"axes": axes}),
        overwrite=overwrite)


def write_probabilities(path: str | Path, prob: np.ndarray, overwrite: bool = True) -> Path:
    """Probabilities (H, W), (K, H, W) or a stack as a float32 zlib-compressed TIFF, atomically."""
    import tifffile
    data = np.asarray(prob, dtype=np.float32)
    return write_atomic(path, lambda tmp: tifffile.imwrite(
        tmp, data, compression="zlib", photometric="minisblack"), overwrite=overwrite)
