"""DCA attention as image-space overlays.

For an image (or a region of a big one, e.g. `tile_around(point, ...)`), the model runs under
`capture_attention` on tiles laid edge to edge; per DCA stage the token-grid maps are stitched into
one small array whose cells are `scale` image pixels wide, placed at `translate` - exactly what a
napari Image layer needs (`viewer.add_image(m, scale=r.scale, translate=r.translate)`).

Per stage i (C_i channels; C = sum of all stages' channels):
- query_map: the spatial cross-attention (SCA) row of the token under `query`, mean over heads:
  where that location looks. Attention never crosses tiles, so it is zero outside the query's
  tile and sums to one over it.
- received: SCA attention each location receives, mean over heads and queries (sums to one per
  tile; N * value = 1 means "as much as average").
- cca: channel cross-attention (CCA) matrices, (heads, C_i/heads, C/heads), mean over tiles;
  rows sum to one.
- channel_weights: (C,) attention each concatenated channel receives from stage i's channels.
- channel_summary: stage i's refined tokens averaged over channels weighted by the CCA attention
  its own channels receive - a spatial picture of what the channel attention emphasises.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .dca import capture_attention
from .inference import (DEFAULT_TILE_SIZE, Cancelled, ImageLayout, _cancel_requested, _prepare_tile,
                        _read_tile, _Window, card_value, image_layout, intensity_range,
                        select_device)
from .preprocess import DEFAULT_NORMALIZATION


@dataclass
class StageAttention:
    stage: int
    channels: int
    received: np.ndarray                  # (gh, gw) float32
    channel_summary: np.ndarray           # (gh, gw) float32
    cca: np.ndarray                       # (heads, C_i/heads, C/heads) float32
    channel_weights: np.ndarray           # (C,) float32
    query_map: np.ndarray | None = None   # (gh, gw) float32, None without a query
    # The same per SCA head (the maps above are their means): (heads, gh, gw).
    received_heads: np.ndarray | None = None
    query_map_heads: np.ndarray | None = None

    def sca_map(self, kind: str, head: int | None = None) -> np.ndarray | None:
        """"query" or "received" map: the mean over heads (head None or -1) or one SCA head."""
        mean, per_head = {"query": (self.query_map, self.query_map_heads),
                          "received": (self.received, self.received_heads)}[kind]
        if head is None or head < 0 or per_head is None:
            return mean
        return per_head[min(int(head), per_head.shape[0] - 1)]


@dataclass
class AttentionMaps:
    """Stitched attention of one region; arrays are cells of `scale` pixels from `translate`."""
    stages: list[StageAttention]
    scale: tuple[float, float]
    translate: tuple[float, float]
    region: tuple[int, int, int, int]     # (y0, y1, x0, x1) in image pixels
    image_shape: tuple[int, int]
    tile_size: int
    grid: tuple[int, int]                 # token grid of one tile
    tiles: int
    query: tuple[int, int] | None = None
    query_tile: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1) of the query's tile
    block: int = -1
    extra: dict = field(default_factory=dict)

    def to_image(self, array: np.ndarray) -> np.ndarray:
        """A cell map upsampled (nearest) to the region's pixel size."""
        y0, y1, x0, x1 = self.region
        ry = np.minimum((np.arange(y1 - y0) / self.scale[0]).astype(int), array.shape[0] - 1)
        rx = np.minimum((np.arange(x1 - x0) / self.scale[1]).astype(int), array.shape[1] - 1)
        return array[np.ix_(ry, rx)]


def tile_around(point: Sequence[float], image_shape: Sequence[int], tile: int
                ) -> tuple[int, int, int, int]:
    """The (y0, y1, x0, x1) tile-sized window centred on `point`, shifted to lie inside the image."""
    h, w = int(image_shape[0]), int(image_shape[1])
    y, x = int(round(point[0])), int(round(point[1]))
    y0 = min(max(0, y - tile // 2), max(0, h - tile))
    x0 = min(max(0, x - tile // 2), max(0, w - tile))
    return y0, min(h, y0 + tile), x0, min(w, x0 + tile)


def attention_maps(model: nn.Module, image: Any, card: Any = None, *,
                   query: Sequence[float] | None = None, region: Sequence[int] | None = None,
                   tile_size: int | None = None, block: int = -1, plane: int | None = None,
                   device: str | torch.device | None = "cpu", batch_size: int = 2,
                   normalization=None, progress=None, cancel=None) -> AttentionMaps:
    """DCA attention of `model` on `image` (2D, or one `plane` of a stack), per stage.

    query: (y, x) image coordinates of the location whose SCA map is wanted (optional).
    region: (y0, y1, x0, x1) to analyse (default: the whole image; for big images pass
        `tile_around(query, image.shape, tile)`). The region is covered by tiles laid edge to edge
        (reflect-padded at its end), so maps of a big region are stitched from several tiles.
    block: which DCA block's maps (-1: the last). device: as in inference.select_device; float32.
    progress(tiles_done, total) / cancel: as in inference.predict (raises Cancelled).
    """
    layout = image_layout(image.shape)
    if layout.is_stack:
        if plane is None:
            raise ValueError(f"image of shape {tuple(image.shape)} is a stack; pass plane=<index>")
        image = image[plane]
        layout = image_layout(image.shape)
    tile = int(tile_size or card_value(card, "tile_size", DEFAULT_TILE_SIZE))
    norm = normalization or card_value(card, "normalization", None) or DEFAULT_NORMALIZATION
    config = getattr(model, "config", None) or card_value(card, "model_kwargs", {}) or {}
    in_channels = int(config.get("in_channels", 3))
    scale = intensity_range(image)

    h, w = layout.height, layout.width
    y0, y1, x0, x1 = (0, h, 0, w) if region is None else (int(v) for v in region)
    y0, x0, y1, x1 = max(0, y0), max(0, x0), min(h, y1), min(w, x1)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"region {region} does not overlap the image ({h} x {w})")
    if query is not None:
        qy, qx = int(round(query[0])), int(round(query[1]))
        if not (y0 <= qy < y1 and x0 <= qx < x1):
            raise ValueError(f"query point {(qy, qx)} lies outside the region {(y0, y1, x0, x1)}")
    window = _Window(image, layout, y0, y1, x0, x1)
    wl = ImageLayout(None, y1 - y0, x1 - x0, layout.channels)
    nty, ntx = math.ceil((y1 - y0) / tile), math.ceil((x1 - x0) / tile)
    tiles = [(ty, tx) for ty in range(nty) for tx in range(ntx)]

    # Only the query's tile keeps its N x N spatial maps (per head); other tiles keep summaries.
    q_tile_key = None if query is None else ((qy - y0) // tile, (qx - x0) // tile)
    dev = select_device(device)
    model = model.eval().to(dev)
    per_tile: dict[tuple[int, int], Any] = {}
    with torch.inference_mode(), capture_attention(model) as records:
        for start in range(0, len(tiles), batch_size):
            if _cancel_requested(cancel):
                raise Cancelled(f"cancelled after {start} of {len(tiles)} tiles")
            chunk = tiles[start:start + batch_size]
            batch = np.stack([_prepare_tile(_read_tile(window, wl, 0, ty * tile, tx * tile, tile),
                                            in_channels, norm, scale) for ty, tx in chunk])
            records.clear()
            model(torch.from_numpy(batch).to(dev))
            if not records:
                raise ValueError("the model ran but no DCA attention was recorded")
            rec = records[0]
            for b, key in enumerate(chunk):
                per_tile[key] = _tile_maps(rec, b, block, keep_rows=key == q_tile_key)
            if progress is not None:
                progress(start + len(chunk), len(tiles))

    first = next(iter(per_tile.values()))
    gh, gw = first["grid"]
    cell = (tile / gh, tile / gw)
    ch, cw = math.ceil((y1 - y0) / cell[0]), math.ceil((x1 - x0) / cell[1])

    query_tile = None
    q_token = None
    if query is not None:
        ry, rx = qy - y0, qx - x0
        q_token = int((ry % tile) // cell[0]) * gw + int((rx % tile) // cell[1])
        ty, tx = q_tile_key
        query_tile = (y0 + ty * tile, min(y1, y0 + (ty + 1) * tile),
                      x0 + tx * tile, min(x1, x0 + (tx + 1) * tile))

    stages = []
    for s, info in enumerate(first["stages"]):
        heads = info["received"].shape[0]
        received = np.zeros((heads, nty * gh, ntx * gw), np.float32)
        summary = np.zeros((nty * gh, ntx * gw), np.float32)
        qmap = np.zeros_like(received) if query is not None else None
        for (ty, tx), maps in per_tile.items():
            st = maps["stages"][s]
            sl = (slice(ty * gh, (ty + 1) * gh), slice(tx * gw, (tx + 1) * gw))
            received[(slice(None), *sl)] = st["received"].reshape(heads, gh, gw)
            summary[sl] = st["summary"].reshape(gh, gw)
            if qmap is not None and (ty, tx) == q_tile_key:
                qmap[(slice(None), *sl)] = st["sca_rows"][:, q_token].reshape(heads, gh, gw)
        received, qmap = received[:, :ch, :cw], None if qmap is None else qmap[:, :ch, :cw]
        cca = np.mean([m["stages"][s]["cca"] for m in per_tile.values()], axis=0)
        weights = np.mean([m["stages"][s]["weights"] for m in per_tile.values()], axis=0)
        stages.append(StageAttention(
            stage=s, channels=info["channels"], received=received.mean(0),
            channel_summary=summary[:ch, :cw], cca=cca.astype(np.float32),
            channel_weights=weights.astype(np.float32),
            query_map=None if qmap is None else qmap.mean(0),
            received_heads=received, query_map_heads=qmap))
    return AttentionMaps(
        stages=stages, scale=cell, translate=(y0 + (cell[0] - 1) / 2, x0 + (cell[1] - 1) / 2),
        region=(y0, y1, x0, x1), image_shape=(h, w), tile_size=tile, grid=(gh, gw),
        tiles=len(tiles), query=None if query is None else (qy, qx), query_tile=query_tile,
        block=block)


def _tile_maps(rec, b: int, block: int, keep_rows: bool = False) -> dict:
    """Per-stage numpy summaries of one tile (batch index b) of one DCAAttention record; with
    keep_rows, also the full per-head SCA maps (heads, N, N) for reading a query's row."""
    features = list(rec.features)
    total = sum(features)
    offsets = np.cumsum([0] + features)
    stages = []
    for s, c_i in enumerate(features):
        info: dict[str, Any] = {"channels": c_i}
        if rec.sca:
            sca = rec.sca[block][s][b].float()                              # (heads, N, N), rows sum to 1
            info["received"] = sca.mean(1).cpu().numpy()                    # (heads, N)
            if keep_rows:
                info["sca_rows"] = sca.cpu().numpy()
        else:  # spatial attention switched off in this model
            n = rec.grid[0] * rec.grid[1]
            info["received"] = np.full((1, n), 1.0 / n, np.float32)
            if keep_rows:
                info["sca_rows"] = np.full((1, n, n), 1.0 / n, np.float32)
        if rec.cca:
            cca = rec.cca[block][s][b].float().cpu().numpy()                # (h, C_i/h, C/h)
            # Column j of head k is concatenated channel k * (C/h) + j.
            weights = cca.mean(axis=1).reshape(-1)                          # (C,)
        else:
            heads = 1
            cca = np.full((heads, c_i, total), 1.0 / total, np.float32)
            weights = np.full(total, 1.0 / total, np.float32)
        info["cca"] = cca
        info["weights"] = weights
        own = weights[offsets[s]:offsets[s + 1]]
        own = own / max(float(own.sum()), 1e-12)
        tokens = rec.tokens[s][b].float().cpu().numpy()                     # (N, C_i)
        info["summary"] = tokens @ own
        stages.append(info)
    return {"grid": tuple(rec.grid), "stages": stages}
