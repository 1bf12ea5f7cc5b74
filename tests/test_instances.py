"""Probabilities -> instances: splitting touching nuclei, glands, semantic maps, cached re-derivation."""
import numpy as np
import pytest

from src_models.instances import (InstanceMaker, InstanceParams, probabilities_to_labels,
                                  remove_small, split_touching)


def discs(shape, specs, value=0.9):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    prob = np.full(shape, 0.05, np.float32)
    for cy, cx, r in specs:
        prob[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value
    return prob


TOUCHING = [(40, 30, 12), (40, 52, 12), (20, 100, 8), (60, 100, 9), (60, 117, 9)]


def test_touching_nuclei_are_split():
    prob = discs((90, 140), TOUCHING)
    labels = probabilities_to_labels(prob, {"task": "nuclei"})
    assert labels.dtype == np.int32 and labels.max() == 5
    for cy, cx, _ in TOUCHING:   # each disc centre in its own object
        assert labels[cy, cx] > 0
    assert len({labels[cy, cx] for cy, cx, _ in TOUCHING}) == 5


def test_glands_keep_touching_objects_together_and_fill_holes():
    prob = discs((90, 140), TOUCHING)
    prob[38:43, 28:33] = 0.0     # a lumen-like hole
    labels = probabilities_to_labels(prob, {"task": "glands", "instance_params": {"min_size": 10}})
    assert labels.max() == 3     # the two touching pairs merge
    assert labels[40, 30] > 0    # hole filled


def test_min_size_drops_small_objects_and_renumbers():
    prob = discs((60, 60), [(15, 15, 8), (45, 45, 2)])
    m = InstanceMaker(prob, mode="nuclei")
    assert m.labels(min_size=5).max() == 2
    assert m.labels(min_size=40).max() == 1
    labels = remove_small(np.array([[0, 3, 3], [5, 5, 5]]), 3)
    assert labels.tolist() == [[0, 0, 0], [1, 1, 1]]


def test_threshold_change_reuses_cached_probabilities():
    import torch
    from src_models.inference import predict

    class Counting(torch.nn.Module):
        config = {"in_channels": 3}
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return (x[:, :1] * 4.0)  # bright pixels -> foreground

    img = np.zeros((60, 80, 3), np.uint8)
    img[discs((60, 80), [(30, 20, 10), (30, 60, 10)]) > 0.5] = 200
    img[30, 60] = 255
    prob = predict(Counting(), img, tile_size=32, fuse=False)
    calls = Counting.calls
    maker = InstanceMaker(prob, mode="nuclei")
    t_mid, t_high = float(prob[30, 20]) - 0.01, float(prob[30, 60]) - 1e-4
    assert maker.labels(threshold=t_mid).max() == 2
    assert maker.labels(threshold=t_high).max() == 0         # one pixel left, under min_size
    assert maker.labels(threshold=t_high, min_size=1).max() == 1
    assert maker.labels(threshold=t_mid).max() == 2
    assert maker.binary(t_mid).sum() > maker.binary(t_high).sum()
    assert Counting.calls == calls                            # the model never ran again


def test_card_defaults_and_overrides():
    card = {"task": "glands", "instance_params": {"threshold": 0.3, "min_size": 7}}
    p = InstanceParams.from_card(card)
    assert (p.mode, p.threshold, p.min_size, p.splits) == ("glands", 0.3, 7, False)
    p = InstanceParams.from_card(card, threshold=0.6, min_size=None)
    assert (p.threshold, p.min_size) == (0.6, 7)
    assert InstanceParams.from_card(None).mode == "nuclei"
    with pytest.raises(TypeError, match="unknown instance settings"):
        InstanceParams.from_card(None, colour="red")
    with pytest.raises(ValueError, match="mode"):
        InstanceParams.from_card(None, mode="cells")


def test_multiclass_foreground_and_semantic_argmax():
    fg = discs((40, 40), [(20, 20, 8)])
    prob = np.stack([1 - fg, fg * 0.5, fg * 0.5 + 0.0])
    prob[2, 20, 20] += 0.1
    assert InstanceMaker(prob, mode="nuclei").labels().max() == 1
    sem = InstanceMaker(prob, mode="semantic").labels()
    assert set(np.unique(sem)) <= {0, 1, 2} and sem[0, 0] == 0
    binary_sem = InstanceMaker(fg, mode="semantic").labels()
    assert set(np.unique(binary_sem)) == {0, 1}


def test_stack_labels_are_unique_across_planes():
    prob = np.stack([discs((40, 40), [(20, 20, 8)]), discs((40, 40), [(10, 10, 5), (30, 30, 5)])])
    labels = InstanceMaker(prob, stack=True, mode="nuclei", min_size=5).labels()
    assert labels.shape == (2, 40, 40)
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_empty_and_bad_inputs():
    assert split_touching(np.zeros((10, 10), bool)).max() == 0
    assert InstanceMaker(np.zeros((10, 10), np.float32)).labels().max() == 0
    with pytest.raises(ValueError, match="shape"):
        InstanceMaker(np.zeros((2, 2, 2, 2)))


def _blobs_with_markers(seed: int, size: int = 96):
    """A mask of touching random discs, a continuous score (no two pixels equal) and markers:
    1-3 seed pixels per blob, some blobs without any."""
    from scipy import ndimage as ndi
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    score = rng.random((size, size)) * 1e-3
    for _ in range(12):
        cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(4, 12)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mask |= disc
        score += np.where(disc, 1.0 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / (r + 1), 0.0)
    markers = np.zeros((size, size), np.int32)
    points = np.argwhere(mask)
    for i, (y, x) in enumerate(points[rng.choice(len(points), 20, replace=False)], start=1):
        markers[y, x] = i
    return mask, score, markers, ndi.label(mask)[0]


@pytest.mark.parametrize("seed", range(6))
def test_flood_gives_skimages_watershed_labels(seed):
    from skimage.segmentation import watershed
    from src_models.instances import flood
    mask, score, markers, comps = _blobs_with_markers(seed)
    expected = watershed(-score, markers, mask=mask)
    np.testing.assert_array_equal(flood(-score, markers, mask, comps), expected)
    np.testing.assert_array_equal(flood(-score, markers, mask), expected)


def test_flood_labels_an_object_the_same_whatever_else_is_in_the_image():
    from src_models.instances import flood
    mask, score, markers, comps = _blobs_with_markers(1)
    alone = flood(-score, markers, mask, comps)
    # a second copy of the picture beside the first one, with a flat score (all ties)
    wide = lambda a, b: np.concatenate([a, b], axis=1)  # noqa: E731
    both = flood(wide(-score, np.zeros_like(score)), wide(markers, markers + 100 * (markers > 0)),
                 wide(mask, mask))
    np.testing.assert_array_equal(both[:, :mask.shape[1]], alone)


def test_flood_fills_a_component_with_one_marker_and_leaves_unmarked_ones_empty():
    from src_models.instances import flood
    mask = np.zeros((20, 20), bool)
    mask[2:8, 2:8] = True
    mask[12:18, 12:18] = True
    markers = np.zeros((20, 20), np.int32)
    markers[4, 4] = 7
    out = flood(np.zeros((20, 20)), markers, mask)
    assert out.dtype == np.int32
    assert (out[2:8, 2:8] == 7).all() and (out[12:18, 12:18] == 0).all() and out[~mask].max() == 0


@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_matches_scipy(seed):
    from scipy import ndimage as ndi
    from src_models.instances import fill_holes
    rng = np.random.default_rng(seed)
    mask = ndi.binary_opening(rng.random((80, 90)) < 0.55)   # blobs with holes, some at the border
    np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
    assert fill_holes(np.ones((5, 5), bool)).all() and not fill_holes(np.zeros((5, 5), bool)).any()
