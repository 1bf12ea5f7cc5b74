"""Objects as QuPath-ready GeoJSON: a FeatureCollection of polygon Features in level-0 pixels.

QuPath's import (File > Import objects from file, or `importObjectsFromFile`) reads each Feature's
`geometry` with coordinates in full-resolution pixels, origin at the top-left corner of the image,
and these `properties`: `objectType` ("detection" for many small objects; "annotation" for
regions), `classification` {"name", "color": [r, g, b]} and `measurements` {name: number}. QuPath
gives every object a UUID `id`; we write one derived from the label id so the file is
reproducible and objects can be matched with the label image and the table.

Outlines: the object's mask is traced with marching squares at 0.5 (skimage.measure.find_contours)
and shifted by half a pixel, so vertices lie on pixel edges as in QuPath's own ROIs (pixel (r, c)
covers x in [c, c+1], y in [r, r+1]). Holes are filled; an object in several pieces is a
MultiPolygon. Only collinear vertices are dropped, so rings stay simple (valid).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from scipy import ndimage as ndi

NAMESPACE = uuid.UUID("6d1c5a4e-2b0e-4c5e-9d7a-0d5ca0a5e11d")   # napari-dca object ids
CLASS_COLOURS = {"Nucleus": (200, 60, 60), "Gland": (60, 160, 60)}


def object_uuid(slide_name: str, label: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{slide_name}:{int(label)}"))


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Closed ring (first == last) without vertices lying on the line through their neighbours."""
    pts = ring[:-1]
    if len(pts) < 4:
        return ring
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - prev[:, 1]) - \
        (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - prev[:, 0])
    kept = pts[np.abs(cross) > 1e-9]
    if len(kept) < 3:
        return ring
    return np.vstack([kept, kept[:1]])


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def mask_polygons(mask: np.ndarray, y0: int = 0, x0: int = 0) -> list[np.ndarray]:
    """Outer rings ((n, 2) arrays of x, y, closed) of each connected piece of a bool mask whose
    pixel (0, 0) is level-0 pixel (y0, x0)."""
    from skimage.measure import find_contours
    pieces, n = ndi.label(ndi.binary_fill_holes(mask))
    rings = []
    for k, sl in enumerate(ndi.find_objects(pieces), 1):
        if sl is None:
            continue
        piece = np.pad(pieces[sl] == k, 1)
        contours = find_contours(piece.astype(np.float32), 0.5)
        if not contours:
            continue
        rc = max(contours, key=len)            # the outer boundary is the longest
        # (row, col) of the padded crop -> level-0 (x, y) on pixel edges
        xy = np.stack([rc[:, 1] - 1 + 0.5 + sl[1].start + x0,
                       rc[:, 0] - 1 + 0.5 + sl[0].start + y0], 1)
        if not np.array_equal(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        xy = _drop_collinear(xy)
        if len(xy) < 4:
            continue
        if _signed_area(xy) < 0:                # one orientation for every ring
            xy = xy[::-1]
        rings.append(xy)
    return rings


def feature(rings: list[np.ndarray], object_id: str, class_name: str,
            colour: tuple[int, int, int], measurements: Mapping[str, float],
            label: int | None = None) -> dict[str, Any]:
    coords = [[[round(float(x), 2), round(float(y), 2)] for x, y in ring] for ring in rings]
    geometry = ({"type": "Polygon", "coordinates": [coords[0]]} if len(coords) == 1 else
                {"type": "MultiPolygon", "coordinates": [[c] for c in coords]})
    props: dict[str, Any] = {
        "objectType": "detection",
        "classification": {"name": class_name, "color": [int(c) for c in colour]},
        "measurements": {k: (None if v is None or not np.isfinite(v) else float(v))
                         for k, v in measurements.items()},
    }
    if label is not None:
        props["name"] = f"{class_name} {int(label)}"
    return {"type": "Feature", "id": object_id, "geometry": geometry, "properties": props}


class GeoJSONWriter:
    """Writes Features one at a time (memory does not grow with the number of objects) into a
    temporary file renamed to `path` by close()."""

    def __init__(self, path: str | Path):
        from ..safe_write import check_output_path, partial_name
        self.path = check_output_path(path)
        self.tmp = partial_name(self.path)
        self.file = open(self.tmp, "w", encoding="utf-8")
        self.file.write('{"type": "FeatureCollection", "features": [\n')
        self.count = 0

    def add(self, feat: Mapping[str, Any]) -> None:
        if self.count:
            self.file.write(",\n")
        self.file.write(json.dumps(feat, separators=(",", ":")))
        self.count += 1

    def close(self) -> Path:
        self.file.write("\n]}\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def labels_to_geojson(labels: np.ndarray, path: str | Path, class_name: str = "Nucleus",
                      colour: tuple[int, int, int] | None = None, offset: tuple[int, int] = (0, 0),
                      image_name: str = "image") -> Path:
    """A whole (in-memory) label image as GeoJSON: one Feature per id (napari's export)."""
    labels = np.asarray(labels)
    colour = colour or CLASS_COLOURS.get(class_name, (255, 200, 0))
    writer = GeoJSONWriter(path)
    try:
        for lab, sl in enumerate(ndi.find_objects(labels), 1):
            if sl is None:
                continue
            mask = labels[sl] == lab
            rings = mask_polygons(mask, sl[0].start + offset[0], sl[1].start + offset[1])
            if rings:
                writer.add(feature(rings, object_uuid(image_name, lab), class_name, colour,
                                   {"Area px": float(mask.sum())}, lab))
    except BaseException:
        writer.abort()
        raise
    return writer.close()
