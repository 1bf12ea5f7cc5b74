"""Post-processing settings of the marker watershed (issue 13): each one changes the labels the way
it says, and its default leaves them as before."""
import numpy as np
import pytest

from src_models.instances import (InstanceMaker, InstanceParams, merge_small, split_necks)

CARD = {"task": "glands", "head": "three_class", "instance_params": {"min_size": 5}}


def three_class(interior: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """Sharp (3, H, W) probabilities: boundary where `boundary`, interior where `interior`."""
    prob = np.zeros((3,) + interior.shape, np.float32)
    prob[2][boundary] = 1.0
    prob[1][interior & ~boundary] = 1.0
    prob[0] = 1.0 - prob[1] - prob[2]
    return prob


def discs_with_a_bridge(bridge_width: int = 9):
    """Two discs of radius 12 whose interiors are joined by a thin interior bridge (the model saw
    no boundary between them), inside a rim of boundary."""
    yy, xx = np.mgrid[:40, :70]
    discs = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 144) | ((yy - 20) ** 2 + (xx - 48) ** 2 <= 144)
    bridge = (abs(yy - 20) <= bridge_width // 2) & (xx >= 20) & (xx <= 48)
    obj = discs | bridge
    from scipy import ndimage as ndi
    inner = ndi.binary_erosion(obj, iterations=2)
    return three_class(inner, obj & ~inner)


def test_discs_joined_by_a_thin_bridge_split_with_opening_or_neck_split_and_not_by_default():
    prob = discs_with_a_bridge()
    maker = InstanceMaker(prob, CARD)
    assert maker.labels().max() == 1                      # default: as before, one object
    for setting in ({"marker_opening": 3}, {"marker_split_h": 3.0}):
        out = maker.labels(**setting)
        assert out.max() == 2, setting
        assert out[20, 20] != out[20, 48] and out[20, 20] > 0 and out[20, 48] > 0
        assert (out > 0).sum() == (maker.labels() > 0).sum()   # same mask, only divided


def test_split_necks_keeps_round_regions_whole_and_every_region_a_marker():
    yy, xx = np.mgrid[:30, :30]
    markers = ((yy - 15) ** 2 + (xx - 15) ** 2 <= 64).astype(np.int32)
    markers[0, 0] = 2                                      # a one-pixel region keeps its marker
    out = split_necks(markers, 2.0)
    assert out.max() == 2 and out[15, 15] > 0 and out[0, 0] > 0


def test_boundary_weight_cuts_markers_where_the_boundary_is_likely():
    prob = discs_with_a_bridge()
    # Make the bridge between the discs (columns 33-35) uncertain: interior 0.55, boundary 0.45.
    bridge = np.zeros(prob.shape[1:], bool)
    bridge[:, 33:36] = prob[1, :, 33:36] > 0.5
    prob[:, bridge] = np.array([0.0, 0.55, 0.45], np.float32)[:, None]
    maker = InstanceMaker(prob, CARD | {"instance_params": {"min_size": 5, "marker_threshold": 0.5}})
    assert maker.labels().max() == 1
    assert maker.labels(boundary_weight=1.0, marker_threshold=0.5).max() == 2


def test_smoothing_joins_a_marker_broken_by_one_noisy_pixel_line():
    prob = discs_with_a_bridge(bridge_width=0)
    yy, xx = np.mgrid[:40, :70]
    one = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 100)
    prob = three_class(one, np.zeros_like(one))
    prob[:, 20, 10:30] = np.array([0.0, 0.45, 0.55], np.float32)[:, None]   # a one-pixel crack
    maker = InstanceMaker(prob, CARD)
    assert maker.labels().max() == 2
    assert maker.labels(marker_smoothing=1.5).max() == 1


def test_grow_widens_objects_into_the_background_but_not_into_each_other():
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 3:13] = 1
    labels[5:15, 14:24] = 2
    from scipy import ndimage as ndi
    inner = ndi.binary_erosion(labels > 0, iterations=1)
    prob = three_class(inner & (labels > 0), (labels > 0) & ~inner)
    prob[:, 5:15, 13] = np.array([1.0, 0.0, 0.0], np.float32)[:, None]        # a gap between them
    maker = InstanceMaker(prob, CARD)
    before, after = maker.labels(), maker.labels(grow=2)
    assert before.max() == after.max() == 2
    assert (after[before > 0] == before[before > 0]).all()
    assert (after > 0).sum() > (before > 0).sum()
    assert after[2, 8] == 0 and after[3, 8] == after[5, 8]                   # 2 px, not more


def test_small_objects_merge_into_the_neighbour_with_the_longest_border():
    labels = np.zeros((10, 20), np.int32)
    labels[:, :8] = 1
    labels[:, 12:] = 2
    labels[2:5, 8:12] = 3          # small, touches 1 and 2 equally on rows, 1 more by one column
    labels[2:6, 8:9] = 3
    labels[8, 9] = 4               # small, touches nothing
    out = merge_small(labels, min_size=20)
    assert out[3, 10] in (1, 2) and out[8, 9] == 4
    assert (out[labels == 3] == out[3, 10]).all()
    # Through the maker: merged objects are kept (with their neighbour), isolated ones dropped.
    interior = labels > 0
    prob = three_class(interior, np.zeros_like(interior))
    card = CARD | {"instance_params": {"min_size": 20}}
    maker = InstanceMaker(prob, card)
    assert maker.labels(small_objects="merge").max() == maker.labels().max()


def test_unseeded_regions_and_unsure_objects_can_be_dropped():
    prob = np.zeros((3, 20, 40), np.float32)
    prob[0] = 1.0
    prob[:, 2:18, 2:18] = np.array([0.0, 1.0, 0.0], np.float32)[:, None, None]     # sure object
    prob[:, 2:18, 22:38] = np.array([0.3, 0.0, 0.7], np.float32)[:, None, None]    # boundary only
    maker = InstanceMaker(prob, CARD)
    assert maker.labels().max() == 2
    assert maker.labels(unseeded="drop").max() == 1
    prob[:, 2:18, 22:38] = np.array([0.35, 0.65, 0.0], np.float32)[:, None, None]  # unsure object
    maker = InstanceMaker(prob, CARD)
    assert maker.labels().max() == 2
    assert maker.labels(min_mean_prob=0.8).max() == 1


def test_min_mean_prob_over_foreground_keeps_a_gland_with_a_faint_lumen_and_drops_a_faint_object():
    # A large sure gland with a big low-probability lumen (filled in by fill_holes) beside a small
    # object that is faint everywhere: averaged over the whole object the lumen drops the gland;
    # averaged over its foreground pixels only, the gland stays and the faint object still goes.
    prob = np.zeros((3, 60, 100), np.float32)
    prob[0] = 1.0
    sure, lumen, faint = (slice(5, 55), slice(5, 55)), (slice(12, 48), slice(12, 48)), (slice(20, 40), slice(70, 90))
    prob[(slice(None),) + sure] = np.array([0.0, 1.0, 0.0], np.float32)[:, None, None]
    prob[(slice(None),) + lumen] = np.array([0.9, 0.1, 0.0], np.float32)[:, None, None]   # fg 0.1
    prob[(slice(None),) + faint] = np.array([0.3, 0.7, 0.0], np.float32)[:, None, None]   # fg 0.7
    maker = InstanceMaker(prob, CARD)
    assert maker.labels().max() == 2                                         # filter off: both
    assert maker.labels(min_mean_prob=0.8).max() == 0                        # over the object: none
    kept = maker.labels(min_mean_prob=0.8, min_mean_prob_over="foreground")
    assert kept.max() == 1 and kept[30, 30] > 0 and kept[30, 80] == 0        # the gland, lumen filled
    with pytest.raises(ValueError, match="min_mean_prob_over"):
        InstanceParams.from_card({"instance_params": {"min_mean_prob_over": "interior"}})


def test_new_settings_default_to_the_previous_behaviour_and_reject_unknown_choices():
    p = InstanceParams.from_card({"task": "glands", "head": "three_class",
                                  "instance_params": {"threshold": 0.6}})
    assert (p.marker_smoothing, p.boundary_weight, p.marker_opening, p.marker_split_h,
            p.unseeded, p.small_objects, p.min_mean_prob, p.grow) == (0, 0, 0, 0, "keep", "drop", 0, 0)
    assert p.min_mean_prob_over == "object"
    with pytest.raises(ValueError, match="unseeded"):
        InstanceParams.from_card({"instance_params": {"unseeded": "merge"}})
    with pytest.raises(ValueError, match="small_objects"):
        InstanceParams.from_card({"instance_params": {"small_objects": "keep"}})


def test_chunked_slide_path_labels_like_the_whole_image_with_the_new_settings():
    from src_models.chunked_instances import chunked_labels
    yy, xx = np.mgrid[:160, :200]
    obj = np.zeros((160, 200), bool)
    for cy, cx in ((40, 64), (64, 130), (120, 40), (128, 128)):   # some straddle the 64-px chunks
        obj |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 15 ** 2
    from scipy import ndimage as ndi
    inner = ndi.binary_erosion(obj, iterations=2)
    prob = three_class(inner, obj & ~inner)
    card = {"task": "glands", "head": "three_class",
            "instance_params": {"min_size": 20, "grow": 2, "min_mean_prob": 0.8, "marker_opening": 1}}
    whole = InstanceMaker(prob, card).labels()
    chunked = chunked_labels(prob, lambda w: InstanceMaker(w, card)._derive(InstanceMaker(w, card).params),
                             "join", chunk=64, margin=16)
    assert whole.max() == chunked.max() == 4
    assert np.array_equal(whole > 0, chunked > 0)
    pairs = np.unique(np.stack([whole[whole > 0], chunked[chunked > 0]], 1), axis=0)
    assert len(pairs) == 4                                  # the same four objects


def test_tune_instances_reads_extra_fields_with_their_types():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "tune_instances.py"
    spec = importlib.util.spec_from_file_location("tune_instances_script", path)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    got = tune.parse_extras(["grow=0,2", "unseeded=keep,drop", "boundary_weight=0,1",
                             "fill_holes=true,false"], InstanceParams)
    assert got == {"grow": [0, 2], "unseeded": ["keep", "drop"], "boundary_weight": [0.0, 1.0],
                   "fill_holes": [True, False]}
    assert isinstance(got["grow"][1], int) and isinstance(got["boundary_weight"][1], float)
    with pytest.raises(SystemExit):
        tune.parse_extras(["no_such_field=1"], InstanceParams)


def test_grow_labels_is_skimages_expand_labels_where_no_pixel_is_tied():
    from skimage.segmentation import expand_labels
    from src_models.instances import grow_labels
    rng = np.random.default_rng(0)
    labels = np.zeros((60, 80), np.int32)
    for i, (y, x) in enumerate(rng.integers(5, 55, size=(6, 2)) * [1, 1.3]):
        labels[int(y) - 3:int(y) + 3, int(x) - 2:int(x) + 4] = i + 1
    for radius in (1, 2, 3, 5):
        ours, theirs = grow_labels(labels, radius), expand_labels(labels, radius)
        # pixels equally near two objects may go either way; everything else is the same
        from scipy import ndimage as ndi
        d = [ndi.distance_transform_edt(labels != k) for k in range(1, int(labels.max()) + 1)]
        d = np.sort(np.stack(d), axis=0)
        untied = d[0] < d[1]
        assert np.array_equal(ours[untied], theirs[untied]), radius
    assert grow_labels(labels, 0) is labels
