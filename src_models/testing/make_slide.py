"""Synthetic whole-slide images: H&E tissue islands on white glass, written as a tiled, JPEG-compressed
pyramidal TIFF in Aperio SVS layout or as an OME-TIFF with sub-resolution IFDs.

The texture inside an island is a mosaic of real H&E training images (GlaS / MoNuSeg) so a model
sees plausible tissue; the islands are wobbly discs on a jittered grid sized to a requested tissue
fraction; an optional pen stroke on the glass exercises pen-mark rejection. Every level is rendered
strip by strip from the same geometry (never from the full-resolution image), so a 40000 x 40000
slide is written in bounded memory.

    python -m src_models.testing.make_slide out.svs --size 4000 4000 --tissue 0.3
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

GLASS_RGB = (241, 239, 243)
PEN_RGB = (40, 80, 170)        # a blue marker, the commonest pen colour on slides
DEFAULT_MPP = 0.5              # µm per pixel at level 0 (a 20x scan)
CELL = 512                     # level-0 size of one texture cell (one source image)


@dataclass(frozen=True)
class Island:
    cy: float
    cx: float
    radius: float
    phase1: float
    phase2: float

    def bbox(self) -> tuple[float, float, float, float]:
        r = self.radius * 1.25   # the outline wobbles by at most 23 %
        return self.cy - r, self.cy + r, self.cx - r, self.cx + r


@dataclass
class SlideLayout:
    """Geometry of a synthetic slide in level-0 pixels."""
    height: int
    width: int
    islands: list[Island]
    pen: tuple[float, float, float, float] | None = None   # y0, x0, y1, x1 of a stroke on glass
    pen_width: float = 12.0
    cells: list[np.ndarray] = field(default_factory=list)   # CELL x CELL x 3 uint8 textures
    seed: int = 0


def shared_data_dir() -> Path | None:
    """$NAPARI_DCA_SHARED/data, else the first `shared/data` beside the repository or above it."""
    import os
    if os.environ.get("NAPARI_DCA_SHARED"):
        return Path(os.environ["NAPARI_DCA_SHARED"]) / "data"
    for parent in Path(__file__).resolve().parents[2:]:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


def source_images(roots: Sequence[str | Path] | None = None, limit: int = 24) -> list[np.ndarray]:
    """H&E training images (RGB uint8) from the shared data folders, centre-cropped/resized to
    CELL x CELL; a smooth pink-purple fallback when none are found (keeps the generator usable)."""
    import imageio.v3 as iio
    if roots is None:
        roots = sorted((shared_data_dir() or Path("/nonexistent")).glob("*/train/images"))
    files: list[Path] = []
    for root in roots:
        files.extend(sorted(Path(root).glob("*.png"))[: max(1, limit // max(1, len(roots)))])
    cells = []
    for f in files[:limit]:
        img = np.asarray(iio.imread(f))[..., :3]
        side = min(img.shape[:2])
        y0, x0 = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        crop = img[y0:y0 + side, x0:x0 + side]
        cells.append(_resize(crop, CELL, CELL))
    if not cells:
        yy, xx = np.mgrid[:CELL, :CELL]
        base = np.stack([200 + 30 * np.sin(xx / 9.0), 120 + 40 * np.sin(yy / 7.0),
                         190 + 20 * np.cos((xx + yy) / 11.0)], -1)
        cells = [base.clip(0, 255).astype(np.uint8)]
    return cells


def make_layout(height: int, width: int, tissue: float = 0.3, seed: int = 0, pen: bool = True,
                cells: list[np.ndarray] | None = None, islands: int | None = None) -> SlideLayout:
    """Islands on a jittered grid whose total area is about `tissue` of the slide."""
    rng = np.random.default_rng(seed)
    n = islands or max(4, int(round(height * width / 3000.0 ** 2)))
    rows = max(1, int(round(math.sqrt(n * height / width))))
    cols = max(1, math.ceil(n / rows))
    ch, cw = height / rows, width / cols
    # pi r^2 = tissue * cell area, the wobble averages out
    radius = math.sqrt(tissue * ch * cw / math.pi)
    radius = min(radius, 0.39 * min(ch, cw))
    out = []
    for i in range(rows):
        for j in range(cols):
            r = radius * rng.uniform(0.95, 1.05)
            slack_y, slack_x = max(0.0, ch / 2 - 1.25 * r), max(0.0, cw / 2 - 1.25 * r)
            cy = (i + 0.5) * ch + rng.uniform(-slack_y, slack_y)
            cx = (j + 0.5) * cw + rng.uniform(-slack_x, slack_x)
            out.append(Island(cy, cx, r, rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)))
    stroke = None
    if pen:
        # along the top margin of the glass, between the first row of islands and the edge
        y = max(8.0, 0.5 * (ch / 2 - 1.25 * radius))
        stroke = (y, 0.2 * width, y + 0.02 * height, 0.6 * width)
    return SlideLayout(height, width, out, stroke, max(4.0, 0.01 * min(height, width)),
                       cells if cells is not None else source_images(), seed)


def _island_mask(layout: SlideLayout, y0: int, x0: int, h: int, w: int, d: int,
                 boxes: list | None = None) -> np.ndarray:
    """(h, w) bool: pixels of the level with downsample d (origin y0, x0 in that level) in tissue.
    boxes: if given, receives the (y0, y1, x0, x1) window box of every island drawn."""
    mask = np.zeros((h, w), bool)
    Y0, Y1, X0, X1 = y0 * d, (y0 + h) * d, x0 * d, (x0 + w) * d
    for isl in layout.islands:
        by0, by1, bx0, bx1 = isl.bbox()
        if by1 < Y0 or by0 > Y1 or bx1 < X0 or bx0 > X1:
            continue
        ry0, ry1 = max(0, int((by0 - Y0) / d)), min(h, int(math.ceil((by1 - Y0) / d)) + 1)
        rx0, rx1 = max(0, int((bx0 - X0) / d)), min(w, int(math.ceil((bx1 - X0) / d)) + 1)
        if ry1 <= ry0 or rx1 <= rx0:
            continue
        yy = (np.arange(ry0, ry1) + y0 + 0.5)[:, None] * d - isl.cy
        xx = (np.arange(rx0, rx1) + x0 + 0.5)[None, :] * d - isl.cx
        theta = np.arctan2(yy, xx)
        edge = isl.radius * (1 + 0.15 * np.sin(3 * theta + isl.phase1)
                             + 0.08 * np.sin(5 * theta + isl.phase2))
        mask[ry0:ry1, rx0:rx1] |= yy ** 2 + xx ** 2 <= edge ** 2
        if boxes is not None:
            boxes.append((ry0, ry1, rx0, rx1))
    return mask


def _pen_mask(layout: SlideLayout, y0: int, x0: int, h: int, w: int, d: int) -> np.ndarray | None:
    if layout.pen is None:
        return None
    py0, px0, py1, px1 = layout.pen
    # only the window rows / columns the stroke's box reaches are computed (it is thin)
    r = layout.pen_width / 2 + d
    ry0 = max(0, int((min(py0, py1) - r) / d) - y0)
    ry1 = min(h, int(math.ceil((max(py0, py1) + r) / d)) - y0 + 1)
    rx0 = max(0, int((min(px0, px1) - r) / d) - x0)
    rx1 = min(w, int(math.ceil((max(px0, px1) + r) / d)) - x0 + 1)
    mask = np.zeros((h, w), bool)
    if ry1 <= ry0 or rx1 <= rx0:
        return mask
    yy = (np.arange(ry0, ry1) + y0 + 0.5)[:, None] * d
    xx = (np.arange(rx0, rx1) + x0 + 0.5)[None, :] * d
    # distance to the segment (py0, px0)-(py1, px1)
    vy, vx = py1 - py0, px1 - px0
    t = np.clip(((yy - py0) * vy + (xx - px0) * vx) / (vy * vy + vx * vx), 0, 1)
    dist2 = (yy - py0 - t * vy) ** 2 + (xx - px0 - t * vx) ** 2
    mask[ry0:ry1, rx0:rx1] = dist2 <= (layout.pen_width / 2) ** 2
    return mask


def _texture(layout: SlideLayout, y0: int, x0: int, h: int, w: int, d: int,
             cache: dict) -> np.ndarray:
    """(h, w, 3) mosaic of the source cells as seen at downsample d."""
    side = max(1, CELL // d)
    if d not in cache:   # (n, side, side, 3): every cell as seen at this downsample
        cache[d] = np.stack([c if side == CELL else _resize(c, side, side) for c in layout.cells])
    stack = cache[d]
    yy = np.arange(y0, y0 + h)
    xx = np.arange(x0, x0 + w)
    iy, ix = yy // side, xx // side
    # which source image each cell shows: a fixed hash of its grid position
    which = (iy[:, None] * 7919 + ix[None, :] * 104729 + layout.seed) % len(stack)
    return stack[which, (yy % side)[:, None], (xx % side)[None, :]]


def render(layout: SlideLayout, y0: int, x0: int, h: int, w: int, d: int = 1,
           cache: dict | None = None) -> np.ndarray:
    """(h, w, 3) uint8 of the level with downsample d, window origin (y0, x0) in that level."""
    cache = {} if cache is None else cache
    out = np.empty((h, w, 3), np.uint8)
    out[:] = GLASS_RGB
    boxes: list = []
    tissue = _island_mask(layout, y0, x0, h, w, d, boxes)
    # the texture only inside each island's box (most of a slide is glass); it depends on the
    # absolute position alone, so overlapping boxes agree
    for by0, by1, bx0, bx1 in boxes:
        inside = tissue[by0:by1, bx0:bx1]
        if inside.any():
            tex = _texture(layout, y0 + by0, x0 + bx0, by1 - by0, bx1 - bx0, d, cache)
            out[by0:by1, bx0:bx1][inside] = tex[inside]
    pen = _pen_mask(layout, y0, x0, h, w, d)
    if pen is not None and pen.any():
        out[pen] = PEN_RGB
    return out


def tissue_fraction(layout: SlideLayout, d: int = 16) -> float:
    """Tissue area over slide area, counted on a downsampled grid."""
    h, w = math.ceil(layout.height / d), math.ceil(layout.width / d)
    return float(_island_mask(layout, 0, 0, h, w, d).mean())


def level_shapes(height: int, width: int, factor: int = 4, smallest: int = 512
                 ) -> list[tuple[int, int, int]]:
    """(h, w, downsample) per level: each `factor` times smaller until one side is <= smallest."""
    shapes, d = [(height, width, 1)], 1
    while min(height // (d * factor), width // (d * factor)) >= smallest // 4 and \
            max(height // d, width // d) > smallest:
        d *= factor
        shapes.append((height // d, width // d, d))
    return shapes


def _tiles(layout: SlideLayout, h: int, w: int, d: int, tile: int) -> Iterator[np.ndarray]:
    """The level's tiles in row-major order (edge tiles padded with glass), one strip rendered
    at a time."""
    cache: dict = {}
    for ty in range(0, h, tile):
        strip = render(layout, ty, 0, min(tile, h - ty), w, d, cache)
        for tx in range(0, w, tile):
            block = strip[:, tx:tx + tile]
            if block.shape[0] < tile or block.shape[1] < tile:
                pad = np.empty((tile, tile, 3), np.uint8)
                pad[:] = GLASS_RGB
                pad[:block.shape[0], :block.shape[1]] = block
                block = pad
            yield block


def aperio_description(width: int, height: int, tile: int, mpp: float, quality: int) -> str:
    return (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
            f"({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = {20 if mpp >= 0.4 else 40}"
            f"|MPP = {mpp:.4f}|Filename = synthetic|Title = napari-dca test slide")


def write_slide(path: str | Path, layout: SlideLayout, kind: str = "aperio", mpp: float = DEFAULT_MPP,
                tile: int = 256, quality: int = 85, factor: int = 4) -> Path:
    """Writes `layout` as kind "aperio" (SVS layout: baseline, thumbnail, reduced levels) or "ome"
    (OME-TIFF, levels as SubIFDs, PhysicalSizeX/Y in µm). Written to a temporary name, renamed."""
    import tifffile
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    levels = level_shapes(layout.height, layout.width, factor)
    common = dict(dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="jpeg",
                  compressionargs={"level": quality})
    with tifffile.TiffWriter(tmp, bigtiff=layout.height * layout.width > 2 ** 28,
                             ome=(kind == "ome")) as tw:
        h, w, d = levels[0]
        if kind == "aperio":
            tw.write(_tiles(layout, h, w, d, tile), shape=(h, w, 3),
                     description=aperio_description(w, h, tile, mpp, quality), **common,
                     metadata=None)
            th = max(1, int(h * 768 / max(h, w)))
            tw_ = max(1, int(w * 768 / max(h, w)))
            dt = max(h / th, w / tw_)
            thumb = _thumbnail(layout, th, tw_, dt)
            tw.write(thumb, photometric="rgb", compression="jpeg", metadata=None,
                     description="Aperio Image Library v12.0.15 \r\nthumbnail")
            for h, w, d in levels[1:]:
                tw.write(_tiles(layout, h, w, d, tile), shape=(h, w, 3), metadata=None, **common)
        elif kind == "ome":
            tw.write(_tiles(layout, h, w, d, tile), shape=(h, w, 3), subifds=len(levels) - 1,
                     metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}, **common)
            for h, w, d in levels[1:]:
                tw.write(_tiles(layout, h, w, d, tile), shape=(h, w, 3), subfiletype=1,
                         metadata=None, **common)
        else:
            raise ValueError(f"kind must be 'aperio' or 'ome', got {kind!r}")
    tmp.replace(path)
    return path


def _thumbnail(layout: SlideLayout, h: int, w: int, d: float) -> np.ndarray:
    """A small overview, rendered at the nearest integer downsample and resized."""
    di = max(1, int(d))
    hh, ww = math.ceil(layout.height / di), math.ceil(layout.width / di)
    return _resize(render(layout, 0, 0, hh, ww, di), h, w)


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """RGB uint8 resized with Pillow's area-averaging filter (fast, antialiased)."""
    from PIL import Image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BOX))


def make_slide(path: str | Path, size: tuple[int, int] = (4096, 4096), kind: str | None = None,
               tissue: float = 0.3, seed: int = 0, pen: bool = True, mpp: float = DEFAULT_MPP,
               tile: int = 256, islands: int | None = None) -> tuple[Path, SlideLayout]:
    """Renders and writes a synthetic slide; kind from the suffix (.ome.tif(f) -> "ome", else
    "aperio"). Returns the path and the layout (for the truth: island geometry, tissue)."""
    path = Path(path)
    if kind is None:
        kind = "ome" if path.name.lower().endswith((".ome.tif", ".ome.tiff")) else "aperio"
    layout = make_layout(int(size[0]), int(size[1]), tissue, seed, pen, islands=islands)
    return write_slide(path, layout, kind, mpp, tile), layout


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write a synthetic pyramidal H&E slide")
    p.add_argument("out")
    p.add_argument("--size", type=int, nargs=2, default=(4096, 4096), metavar=("H", "W"))
    p.add_argument("--tissue", type=float, default=0.3)
    p.add_argument("--kind", choices=["aperio", "ome"], default=None)
    p.add_argument("--mpp", type=float, default=DEFAULT_MPP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pen", action="store_true")
    args = p.parse_args(argv)
    path, layout = make_slide(args.out, tuple(args.size), args.kind, args.tissue, args.seed,
                              not args.no_pen, args.mpp)
    print(f"{path}: {layout.height}x{layout.width}, tissue {tissue_fraction(layout):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
