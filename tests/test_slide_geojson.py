"""Outlines traced along pixel edges: filling each polygon gives back exactly its object (holes
filled), rings are simple, diagonal pieces are separate polygons."""
import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as fill_polygon

from src_models.slide.geojson import window_polygons


def filled(rings, shape, y0=0, x0=0):
    out = np.zeros(shape, bool)
    for ring in rings:
        rr, cc = fill_polygon(ring[:, 1] - 0.5 - y0, ring[:, 0] - 0.5 - x0, shape)
        out[rr, cc] = True
    return out


def test_outlines_give_back_each_object_exactly():
    rng = np.random.default_rng(0)
    labels, n = ndi.label(ndi.gaussian_filter(rng.random((160, 160)), 2.0) > 0.5)
    outlines = window_polygons(labels, range(1, n + 1), y0=1000, x0=2000)
    assert len(outlines) == n
    for lab, rings in outlines.items():
        assert np.array_equal(filled(rings, labels.shape, 1000, 2000),
                              ndi.binary_fill_holes(labels == lab))
        for ring in rings:
            assert np.array_equal(ring[0], ring[-1])
            assert len({tuple(p) for p in ring[:-1]}) == len(ring) - 1   # no vertex twice


def test_diagonal_pieces_are_separate_rings_and_holes_are_filled():
    labels = np.zeros((10, 10), np.int32)
    labels[1:4, 1:4] = 5
    labels[2, 2] = 0                 # a hole
    labels[4, 4] = 5                 # touches the square at one corner only
    rings = window_polygons(labels, [5])[5]
    assert len(rings) == 2
    assert sorted(len(r) for r in rings) == [5, 5]            # two squares, corners only
    assert filled(rings, labels.shape).sum() == 9 + 1
