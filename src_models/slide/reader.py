"""Whole-slide images as lazy pyramids: `open_slide(path)` -> Slide.

TIFF-based slides (Aperio SVS, Hamamatsu NDPI, Leica SCN, Ventana BIF, Philips TIFF, OME-TIFF, any
tiled pyramidal TIFF) are read through tifffile's zarr view of the pyramid (`series.aszarr()`):
every level is a zarr array that decodes only the tiles it is indexed with (JPEG, JPEG 2000, LZW...
through imagecodecs). Other formats (MIRAX .mrxs, Hamamatsu .vms, DICOM folders...) go through
openslide-python when it is installed (`pip install napari-dca[openslide]`), behind the same
interface: a level is anything with shape / dtype / __getitem__ returning (h, w, 3) uint8.

The physical pixel size (µm per level-0 pixel) comes from the file's own metadata: OME
PhysicalSizeX/Y, the Aperio description's MPP, Philips DICOM_PIXEL_SPACING, Ventana ScanRes, or the
TIFF resolution tags (NDPI, SCN, generic) when their unit is a length.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

TIFF_SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".tif", ".tiff")
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide", ".dcm")
SLIDE_SUFFIXES = TIFF_SLIDE_SUFFIXES + OPENSLIDE_SUFFIXES
# A single-level tiled TIFF at least this large a side is still read as a (one-level) slide.
LARGE_SIDE = 16384

_UNIT_TO_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "mm": 1e3,
               "cm": 1e4, "m": 1e6}


@dataclass
class Slide:
    """A pyramid of (h, w, 3) uint8 levels, level 0 the full resolution.

    levels: lazy arrays (zarr, or openslide-backed), largest first. mpp: (y, x) µm per level-0
    pixel, None when the file does not say. format: "aperio", "ome", "ndpi", "scn", "bif",
    "philips", "tiff" (generic pyramid) or "openslide"."""
    path: Path
    format: str
    levels: list[Any]
    mpp: tuple[float, float] | None
    _close: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    @property
    def downsamples(self) -> list[float]:
        h0, w0 = self.shape
        return [0.5 * (h0 / lv.shape[0] + w0 / lv.shape[1]) for lv in self.levels]

    def level_for(self, max_pixels: int) -> int:
        """The largest level with at most `max_pixels` pixels (the smallest level if none)."""
        for i, lv in enumerate(self.levels):
            if lv.shape[0] * lv.shape[1] <= max_pixels:
                return i
        return len(self.levels) - 1

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(y1-y0, x1-x0, 3) uint8 of one level, clipped to the level."""
        lv = self.levels[level]
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(lv.shape[0], y1), min(lv.shape[1], x1)
        return np.asarray(lv[y0:y1, x0:x1])

    def as_dask(self) -> list[Any]:
        """The levels as dask arrays (what napari's multiscale layers want)."""
        import dask.array as da
        out = []
        for lv in self.levels:
            chunks = getattr(lv, "chunks", None)
            if not chunks or len(chunks) != lv.ndim:
                chunks = (1024, 1024, lv.shape[2]) if lv.ndim == 3 else (1024, 1024)
            out.append(da.from_array(lv, chunks=chunks, asarray=True, fancy=False))
        return out

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Squeezed:
    """A zarr level with leading axes of length 1 (an SVS 'Z' of one focal plane) dropped."""

    def __init__(self, array: Any, drop: int):
        self.array, self.drop = array, drop
        self.shape = tuple(array.shape[drop:])
        self.dtype = array.dtype
        self.ndim = len(self.shape)
        chunks = getattr(array, "chunks", None)
        self.chunks = tuple(chunks[drop:]) if chunks else None

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        return self.array[(0,) * self.drop + key]


def is_slide(path: str | Path) -> bool:
    """True for files this module should open: slide formats, and TIFFs that are pyramids (or one
    huge tiled level). Plain TIFFs return False and keep opening as ordinary images."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in OPENSLIDE_SUFFIXES:
        return True
    if suffix not in TIFF_SLIDE_SUFFIXES or not path.is_file():
        return False
    if suffix in (".svs", ".ndpi", ".scn", ".bif"):
        return True
    try:
        import tifffile
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if len(series.levels) > 1:
                return True
            page = tif.pages.first
            return bool(page.is_tiled) and max(page.shape[:2]) >= LARGE_SIDE
    except Exception:  # not a TIFF tifffile understands: not ours
        return False


def open_slide(path: str | Path) -> Slide:
    """Opens a slide lazily (see the module docstring). Raises ValueError naming the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such slide: {path}")
    if path.suffix.lower() in TIFF_SLIDE_SUFFIXES:
        return _open_tiff(path)
    return open_with_openslide(path)


def _open_tiff(path: Path) -> Slide:
    import tifffile
    import zarr
    tif = tifffile.TiffFile(path)
    try:
        series = tif.series[0]
        store = series.aszarr()
        node = zarr.open(store, mode="r")
        if hasattr(node, "shape"):
            arrays = [node]
        else:
            arrays = [node[str(i)] for i in range(len(series.levels))]
        axes = series.axes
        drop = 0
        while drop < len(axes) and axes[drop] not in "YX" and arrays[0].shape[drop] == 1:
            drop += 1
        if axes[drop:] not in ("YXS", "YX"):
            raise ValueError(f"{path.name}: unsupported slide axes {axes!r} (expected YXS RGB)")
        levels = [_Squeezed(a, drop) if drop else a for a in arrays]
        if levels[0].ndim == 3 and levels[0].shape[2] not in (3, 4):
            raise ValueError(f"{path.name}: {levels[0].shape[2]} samples per pixel; expected RGB")
        fmt = _tiff_format(tif)
        mpp = tiff_mpp(tif, fmt)
    except Exception:
        tif.close()
        raise
    return Slide(path, fmt, levels, mpp, tif.close)


def _tiff_format(tif: Any) -> str:
    for name in ("ome", "svs", "ndpi", "scn", "bif", "philips"):
        if getattr(tif, f"is_{name}", False):
            return "aperio" if name == "svs" else name
    return "tiff"


def tiff_mpp(tif: Any, fmt: str | None = None) -> tuple[float, float] | None:
    """(y, x) µm per level-0 pixel from a TIFF's metadata, None when it does not say."""
    fmt = fmt or _tiff_format(tif)
    page = tif.pages.first
    finders = {"ome": lambda: _ome_mpp(tif.ome_metadata),
               "aperio": lambda: _aperio_mpp(page.description),
               "philips": lambda: _philips_mpp(tif.philips_metadata),
               "bif": lambda: _ventana_mpp(tif)}
    try:
        found = finders[fmt]() if fmt in finders else None
    except Exception:  # malformed vendor metadata: fall back to the resolution tags
        found = None
    return found or _resolution_mpp(page)


def _valid(y: float | None, x: float | None) -> tuple[float, float] | None:
    if y is None or x is None or not (math.isfinite(y) and math.isfinite(x)) or y <= 0 or x <= 0:
        return None
    return float(y), float(x)


def _ome_mpp(xml: str | None) -> tuple[float, float] | None:
    if not xml:
        return None
    import xml.etree.ElementTree as ET
    root = ET.fromstring(xml)
    for el in root.iter():
        if el.tag.endswith("}Pixels") or el.tag == "Pixels":
            def size(axis):
                value = el.get(f"PhysicalSize{axis}")
                if value is None:
                    return None
                unit = el.get(f"PhysicalSize{axis}Unit", "µm")
                return float(value) * _UNIT_TO_UM.get(unit, 1.0)
            return _valid(size("Y"), size("X"))
    return None


def _aperio_mpp(description: str) -> tuple[float, float] | None:
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description or "")
    if not match:
        return None
    mpp = float(match.group(1))
    return _valid(mpp, mpp)


def _philips_mpp(xml: str | None) -> tuple[float, float] | None:
    # <Attribute Name="DICOM_PIXEL_SPACING" ...>"0.000227" "0.000227"</Attribute>, in mm (the
    # first one listed is level 0's)
    match = re.search(r'DICOM_PIXEL_SPACING"[^>]*>\s*"?([0-9.eE+-]+)"?\s+"?([0-9.eE+-]+)',
                      xml or "")
    if not match:
        return None
    return _valid(float(match.group(1)) * 1e3, float(match.group(2)) * 1e3)


def _ventana_mpp(tif: Any) -> tuple[float, float] | None:
    for page in list(tif.pages)[:4]:
        for tag in (page.tags.get(700), page.tags.get(270)):  # XMP, ImageDescription
            if tag is None:
                continue
            text = tag.value.decode("utf-8", "replace") if isinstance(tag.value, bytes) \
                else str(tag.value)
            match = re.search(r'ScanRes\s*=\s*"?([0-9.eE+-]+)', text)
            if match:
                mpp = float(match.group(1))
                return _valid(mpp, mpp)
    return None


def _resolution_mpp(page: Any) -> tuple[float, float] | None:
    """From XResolution / YResolution (pixels per unit) when the unit is inch or centimetre."""
    try:
        unit = int(page.tags["ResolutionUnit"].value)
        xres = page.tags["XResolution"].value
        yres = page.tags["YResolution"].value
    except (KeyError, TypeError, ValueError):
        return None
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    if um_per_unit is None:
        return None

    def per_pixel(res):
        value = res[0] / res[1] if isinstance(res, tuple) else float(res)
        return um_per_unit / value if value > 0 else None
    return _valid(per_pixel(yres), per_pixel(xres))


# ----------------------------------------------------------------------------------------------
# openslide, for what is not TIFF
# ----------------------------------------------------------------------------------------------

class OpenSlideLevel:
    """One openslide level as a lazy (h, w, 3) uint8 array: indexing reads that region only
    (transparent pixels, outside the scanned area, come out white)."""

    def __init__(self, handle: Any, level: int):
        self.handle, self.level = handle, level
        w, h = handle.level_dimensions[level]
        self.shape = (int(h), int(w), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.downsample = float(handle.level_downsamples[level])
        self.chunks = (1024, 1024, 3)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = key
        if not (isinstance(ys, slice) and isinstance(xs, slice)) or ys.step not in (None, 1) \
                or xs.step not in (None, 1):
            raise IndexError("openslide levels take plain y and x slices")
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)[..., cs]
        region = self.handle.read_region((int(x0 * self.downsample), int(y0 * self.downsample)),
                                         self.level, (x1 - x0, y1 - y0))
        rgba = np.asarray(region, dtype=np.uint8)
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)   # premultiplied -> on white
        return np.round(rgb).astype(np.uint8)[..., cs]


def open_with_openslide(path: str | Path) -> Slide:
    try:
        import openslide
    except ImportError as err:
        raise ValueError(f"{Path(path).name}: this slide format needs openslide; install it with "
                         f"`pip install openslide-python openslide-bin`") from err
    handle = openslide.OpenSlide(str(path))
    props = handle.properties
    try:
        mpp = _valid(float(props.get("openslide.mpp-y", "nan")),
                     float(props.get("openslide.mpp-x", "nan")))
    except ValueError:
        mpp = None
    levels = [OpenSlideLevel(handle, i) for i in range(handle.level_count)]
    return Slide(Path(path), "openslide", levels, mpp, handle.close)
