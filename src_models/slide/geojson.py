"""Objects as QuPath-ready GeoJSON: a FeatureCollection of polygon Features in level-0 pixels.

QuPath's import (File > Import objects from file, or `importObjectsFromFile`) reads each Feature's
`geometry` with coordinates in full-resolution pixels, origin at the top-left corner of the image,
and these `properties`: `objectType` ("detection" for many small objects; "annotation" for
regions), `classification` {"name", "color": [r, g, b]} and `measurements` {name: number}. QuPath
gives every object a UUID `id`; we write one derived from the label id so the file is
reproducible and objects can be matched with the label image and the table.

Outlines (`window_polygons`): every object of a window is traced along its pixel edges at once, so
vertices lie on pixel corners as in QuPath's own ROIs (pixel (r, c) covers x in [c, c+1], y in
[r, r+1]) and filling a polygon gives back exactly the object's pixels. Holes are filled; an object
in several 4-connected pieces is a MultiPolygon; only corners are kept and a ring that would touch
itself is split there, so rings are simple (valid). `mask_polygons` (marching squares, smoother,
slower) traces one mask.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

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
        from ..safe_write import PartialFile
        self.partial = PartialFile(path)
        self.path, self.file = self.partial.path, self.partial.file
        self.file.write('{"type": "FeatureCollection", "features": [\n')
        self.count = 0

    def add(self, feat: Mapping[str, Any]) -> None:
        if self.count:
            self.file.write(",\n")
        self.file.write(json.dumps(feat, separators=(",", ":")))
        self.count += 1

    def close(self) -> Path:
        self.file.write("\n]}\n")
        return self.partial.commit()

    def abort(self) -> None:
        self.partial.abort()


def labels_to_geojson(labels: np.ndarray, path: str | Path, class_name: str = "Nucleus",
                      colour: tuple[int, int, int] | None = None, offset: tuple[int, int] = (0, 0),
                      image_name: str = "image",
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """A whole (in-memory) label image as GeoJSON: one Feature per id (napari's export).

    progress(done, total): objects written so far (0 while the outlines are traced), called
    often while tracing and between Features, and once more before the file is renamed into
    place. An exception raised by it (the GUI's Cancel) stops the write: the temporary file is
    removed and an earlier file at `path` stays as it was."""
    labels = np.asarray(labels)
    colour = colour or CLASS_COLOURS.get(class_name, (255, 200, 0))
    writer = GeoJSONWriter(path)
    try:
        ids = np.unique(labels)
        ids = ids[ids > 0]
        total = len(ids)
        tick = (lambda: progress(0, total)) if progress is not None else None
        outlines = window_polygons(labels, ids, offset[0], offset[1], check=tick)
        areas = np.bincount(labels.ravel().astype(np.int64)) if len(ids) else []
        for done, lab in enumerate(ids.tolist()):
            if progress is not None and done % 64 == 0:
                progress(done, total)
            if outlines.get(lab):
                writer.add(feature(outlines[lab], object_uuid(image_name, lab), class_name, colour,
                                   {"Area px": float(areas[lab])}, lab))
        if progress is not None:
            progress(total, total)  # the last chance to stop before the rename
    except BaseException:
        writer.abort()
        raise
    return writer.close()


# Direction of a boundary edge: 0 +x, 1 +y, 2 -x, 3 -y (image axes, y down). Edges are directed
# with the object on their right, so outer rings and holes turn opposite ways.
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.int64)


def window_polygons(labels: np.ndarray, ids, y0: int = 0, x0: int = 0,
                    check: Callable[[], None] | None = None) -> dict[int, list[np.ndarray]]:
    """Outer rings of every object `ids` in a label window (pixel (0, 0) = level-0 (y0, x0)),
    traced along pixel edges for all objects at once: {id: [ring (n, 2) of x, y, closed]}.

    The rings follow the pixel boundary exactly (filling a ring's pixel centres gives back the
    object, holes filled), corners only (no collinear vertices), so they are simple polygons; an
    object in several 4-connected pieces has one ring per piece. Much faster than tracing each
    object with marching squares: a slide has 10^5 - 10^6 nuclei. `check()` is called every few
    hundred rings; an exception it raises stops the tracing (a cancelled export)."""
    labels = np.asarray(labels)
    ids = np.asarray(sorted(int(i) for i in ids), np.int64)
    if not len(ids):
        return {}
    h, w = labels.shape
    pos = np.clip(np.searchsorted(ids, labels), 0, len(ids) - 1)
    k = np.where(ids[pos] == labels, pos + 1, 0)
    p = np.pad(k, 1)
    starts, dirs, labs = [], [], []
    # horizontal edges at y = r between p[r] (above) and p[r + 1] (below), x from c to c + 1
    above, below = p[:-1, 1:-1], p[1:, 1:-1]
    r, c = np.nonzero((above != below) & (below > 0))           # top of `below`: +x
    starts.append(np.stack([c, r], 1)); dirs.append(np.zeros(len(r), np.int64)); labs.append(below[r, c])
    r, c = np.nonzero((above != below) & (above > 0))           # bottom of `above`: -x
    starts.append(np.stack([c + 1, r], 1)); dirs.append(np.full(len(r), 2)); labs.append(above[r, c])
    # vertical edges at x = c between p[:, c] (left) and p[:, c + 1] (right), y from r to r + 1
    left, right = p[1:-1, :-1], p[1:-1, 1:]
    r, c = np.nonzero((left != right) & (right > 0))            # left side of `right`: -y
    starts.append(np.stack([c, r + 1], 1)); dirs.append(np.full(len(r), 3)); labs.append(right[r, c])
    r, c = np.nonzero((left != right) & (left > 0))             # right side of `left`: +y
    starts.append(np.stack([c, r], 1)); dirs.append(np.ones(len(r), np.int64)); labs.append(left[r, c])
    start = np.concatenate(starts).astype(np.int64)
    direction = np.concatenate(dirs).astype(np.int64)
    lab = np.concatenate(labs).astype(np.int64)
    end = start + _STEP[direction]

    def key(xy):
        return (lab * (h + 1) + xy[:, 1]) * (w + 1) + xy[:, 0]
    order = np.argsort(key(start), kind="stable")
    start, direction, lab, end = start[order], direction[order], lab[order], end[order]
    skeys, ekeys = key(start), key(end)
    first = np.searchsorted(skeys, ekeys, "left")
    count = np.searchsorted(skeys, ekeys, "right") - first
    nxt = first.copy()
    saddle = np.flatnonzero(count == 2)
    if len(saddle):
        # two ways on at a diagonal contact: turn right (towards the object) so the two pieces
        # get separate rings, as 4-connectivity has it
        second = first[saddle] + 1
        turn_right = (direction[saddle] + 1) % 4
        nxt[saddle] = np.where(direction[second] == turn_right, second, first[saddle])
    seen = np.zeros(len(start), bool)
    out: dict[int, list[np.ndarray]] = {}
    nxt_list, skey_list = nxt.tolist(), skeys.tolist()
    rings = 0
    for e0 in range(len(start)):
        if seen[e0]:
            continue
        rings += 1
        if check is not None and rings % 256 == 0:
            check()
        cycle = []
        e = e0
        while not seen[e]:
            seen[e] = True
            cycle.append(e)
            e = nxt_list[e]
        for loop in _split_at_repeated_vertices(cycle, skey_list):
            loop = np.asarray(loop)
            d = direction[loop]
            corner = d != np.roll(d, 1)               # keep vertices where the direction turns
            xy = start[loop][corner].astype(np.float64)
            if len(xy) < 4:
                continue
            xy = np.vstack([xy, xy[:1]])
            # a hole, or an inlet of background pinched off at a diagonal contact: filled
            if _signed_area(xy) <= 0:
                continue
            xy[:, 0] += x0
            xy[:, 1] += y0
            out.setdefault(int(ids[lab[loop[0]] - 1]), []).append(xy)
    return out


def _split_at_repeated_vertices(cycle: list[int], vertex_of: list[int]) -> list[list[int]]:
    """A closed chain of edges that passes a vertex twice (a ring touching itself at a diagonal
    contact) as loops that each pass every vertex once: simple rings."""
    loops, path, where = [], [], {}
    for e in cycle:
        v = vertex_of[e]
        if v in where:
            i = where[v]
            loop = path[i:]
            loops.append(loop)
            for f in loop:
                where.pop(vertex_of[f], None)
            path = path[:i]
        where[v] = len(path)
        path.append(e)
    if path:
        loops.append(path)
    return loops
