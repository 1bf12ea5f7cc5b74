"""Where the tissue is: a boolean mask computed on a low-resolution level of the slide.

Method (the field's usual one, as in CLAM and HistoQC): HSV saturation thresholded by Otsu. Why
saturation: stained tissue is coloured, while glass, its shadows, dust and the out-of-focus
background are grey at any brightness, so saturation separates the two on slides scanned darker or
lighter, where a grey-level threshold drifts with the scanner's white balance. A grey-level test
adds that tissue is darker than glass (drops saturated but bright JPEG fringes). Then cleanup at
a physical scale: a median filter against JPEG speckle, closing, small objects removed (dust,
debris), small holes filled (lumina, fat, tears inside tissue stay tissue). Pen marks are saturated
too, but marker inks are blue, green or black, hues that H&E (pink eosin, purple haematoxylin) does
not have: pixels with a green-cyan-blue hue or very dark ones are rejected before thresholding, and
their neighbourhood is excluded after, so a marker line on the glass is not "tissue".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

# Hue band (degrees) of marker inks: green 90-150, cyan 180, blue 200-240. H&E's haematoxylin sits
# at 250-300 (purple), eosin at 300-360 / 0-20 (pink): both outside.
PEN_HUE = (60.0, 245.0)
PEN_MIN_SATURATION = 0.25
DARK_VALUE = 0.2          # black marker / folds of dense ink: value (max of RGB) below this
MAX_MASK_PIXELS = 8_000_000
TARGET_UM = 8.0           # µm per mask pixel when the slide allows it (a 1.25x overview)


@dataclass
class TissueMask:
    """mask: (h, w) bool at a level whose pixels are `downsample` (y, x) level-0 pixels."""
    mask: np.ndarray
    downsample: tuple[float, float]
    method: str = "hsv-saturation-otsu"
    threshold: float = 0.0

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_um2(self, mpp: tuple[float, float] | None) -> float | None:
        """Tissue area in µm² (None without a pixel size)."""
        if mpp is None:
            return None
        return float(self.mask.sum()) * self.downsample[0] * self.downsample[1] * mpp[0] * mpp[1]

    def area_pixels(self, box: tuple[int, int, int, int] | None = None) -> float:
        """Tissue area in level-0 pixels (within the level-0 box (y0, y1, x0, x1) if given, to
        the mask's resolution)."""
        mask = self.mask
        if box is not None:
            dy, dx = self.downsample
            y0, y1, x0, x1 = box
            mask = mask[max(0, int(round(y0 / dy))):max(0, int(round(y1 / dy))),
                        max(0, int(round(x0 / dx))):max(0, int(round(x1 / dx)))]
            if self.method == "off":   # one mask pixel for the whole slide: the box's own area
                return float((y1 - y0) * (x1 - x0))
        return float(mask.sum()) * self.downsample[0] * self.downsample[1]

    def touches(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        """Whether the level-0 box [y0, y1) x [x0, x1) contains any tissue."""
        dy, dx = self.downsample
        my0, mx0 = max(0, int(y0 / dy)), max(0, int(x0 / dx))
        my1 = min(self.mask.shape[0], int(math.ceil(y1 / dy)))
        mx1 = min(self.mask.shape[1], int(math.ceil(x1 / dx)))
        return bool(my1 > my0 and mx1 > mx0 and self.mask[my0:my1, mx0:mx1].any())

    def box_within(self, y0: int, y1: int, x0: int, x1: int, pad: int = 0
                   ) -> tuple[int, int, int, int] | None:
        """The level-0 bounding box (y0, y1, x0, x1) of the tissue inside a box, grown by `pad`
        and clipped to the box; None when the box holds no tissue."""
        dy, dx = self.downsample
        my0, mx0 = max(0, int(y0 / dy)), max(0, int(x0 / dx))
        my1 = min(self.mask.shape[0], int(math.ceil(y1 / dy)))
        mx1 = min(self.mask.shape[1], int(math.ceil(x1 / dx)))
        if my1 <= my0 or mx1 <= mx0:
            return None
        rows = np.flatnonzero(self.mask[my0:my1, mx0:mx1].any(1))
        cols = np.flatnonzero(self.mask[my0:my1, mx0:mx1].any(0))
        if not len(rows):
            return None
        top, bottom = (my0 + rows[0]) * dy, (my0 + rows[-1] + 1) * dy
        left, right = (mx0 + cols[0]) * dx, (mx0 + cols[-1] + 1) * dx
        return (max(y0, int(top) - pad), min(y1, int(math.ceil(bottom)) + pad),
                max(x0, int(left) - pad), min(x1, int(math.ceil(right)) + pad))

    @classmethod
    def everywhere(cls, shape: tuple[int, int]) -> "TissueMask":
        """'Tissue detection off': the whole slide counts as tissue."""
        return cls(np.ones((1, 1), bool), (float(shape[0]), float(shape[1])), "off", 0.0)


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, saturation and value in [0, 1] of an (h, w, 3) uint8 image."""
    x = rgb[..., :3].astype(np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / safe) % 6.0,
                   np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) * 60.0
    return np.where(delta > 0, hue, 0.0), sat, mx


def pen_marks(rgb: np.ndarray) -> np.ndarray:
    """(h, w) bool: marker ink (blue/green/cyan hue, or nearly black)."""
    hue, sat, val = hsv(rgb)
    coloured = (hue >= PEN_HUE[0]) & (hue <= PEN_HUE[1]) & (sat >= PEN_MIN_SATURATION)
    return coloured | (val < DARK_VALUE)


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def detect_tissue(rgb: np.ndarray, pixel_um: float | None = None, min_object_um2: float = 5e4,
                  min_hole_um2: float = 2e4, min_saturation: float = 0.05,
                  max_grey: float = 0.92) -> tuple[np.ndarray, float]:
    """(mask, saturation threshold) for an (h, w, 3) uint8 thumbnail.

    pixel_um: µm per thumbnail pixel (sizes below are in µm²; without it 8 µm/px, a typical
    thumbnail of a 20x scan, is assumed). min_saturation: the Otsu threshold never goes below this
    (a slide that is nearly all glass has no tissue mode to find)."""
    from skimage.morphology import disk, remove_small_holes, remove_small_objects
    rgb = np.asarray(rgb)[..., :3]
    pixel_um = pixel_um or 8.0
    _, sat, _ = hsv(rgb)
    grey = rgb.astype(np.float32).mean(-1) / 255.0
    pen = pen_marks(rgb)
    sat = ndi.median_filter(sat, size=3)
    candidates = sat[~pen]
    threshold = max(min_saturation, otsu(candidates) if candidates.size else 1.0)
    mask = (sat >= threshold) & (grey <= max_grey) & ~pen
    # the pen's own anti-aliased rim (JPEG blurs the ink into the glass) goes with the pen
    pen_zone = ndi.binary_dilation(pen, iterations=max(1, int(round(20.0 / pixel_um))))
    mask &= ~(pen_zone & ~ndi.binary_dilation(mask & ~pen_zone, iterations=1))
    mask = ndi.binary_closing(mask, structure=disk(max(1, int(round(16.0 / pixel_um)))))
    # sizes in thumbnail pixels; never more than 1 % of the image (a small test slide or a
    # biopsy can be all "small" tissue)
    cap = 0.01 * mask.size
    area = pixel_um * pixel_um
    mask = remove_small_objects(mask, max_size=max(1, int(min(cap, min_object_um2 / area))))
    mask = remove_small_holes(mask, max_size=max(1, int(min(cap, min_hole_um2 / area))))
    return mask, threshold


def block_mean(rgb: np.ndarray, factor: int) -> np.ndarray:
    """(h // f, w // f, 3) means of f x f blocks (edge rows/columns that do not fill a block are
    dropped)."""
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    blocks = rgb[:h, :w, :3].reshape(h // factor, factor, w // factor, factor, 3)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def slide_tissue(slide, max_pixels: int = MAX_MASK_PIXELS, **settings) -> TissueMask:
    """Tissue mask of a Slide (src_models.slide.reader) from its largest level of at most
    `max_pixels` pixels (read whole: it is small by construction)."""
    level = slide.level_for(max_pixels)
    rgb = slide.read(level, 0, slide.levels[level].shape[0], 0, slide.levels[level].shape[1])
    h0, w0 = slide.shape
    # work at about TARGET_UM per pixel (the cleanup sizes are physical; finer costs time only)
    if slide.mpp is not None:
        factor = int(TARGET_UM / (slide.mpp[0] * h0 / rgb.shape[0]))
    else:
        factor = int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 1e6))
    if factor > 1:
        rgb = block_mean(rgb, factor)
    down = (h0 / rgb.shape[0], w0 / rgb.shape[1])
    pixel_um = None if slide.mpp is None else 0.5 * (slide.mpp[0] * down[0] + slide.mpp[1] * down[1])
    mask, threshold = detect_tissue(rgb, pixel_um, **settings)
    return TissueMask(mask, down, threshold=threshold)
