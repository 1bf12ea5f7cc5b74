"""Metrics against cases worked out by hand. Most cases are one-row images (1, W) so that object
extents read as x ranges and distances are differences of x."""
import math

import numpy as np
import pytest

from src_models import metrics as M


def row(width: int, *objects: tuple[int, int, int]) -> np.ndarray:
    """(1, width) label image; each object (label, x0, x1) fills x0..x1 inclusive."""
    out = np.zeros((1, width), np.int32)
    for lab, x0, x1 in objects:
        out[0, x0:x1 + 1] = lab
    return out


# ----------------------------------------------------------------------------- pixel scores
def test_pixel_dice_iou_hand_case():
    # gt: rows 0-1, cols 0-1 (4 px); pred: rows 0-1, cols 1-2 (4 px); overlap: col 1 (2 px).
    # Dice = 2*2/(4+4) = 0.5; IoU = 2/(4+4-2) = 1/3.
    gt = np.zeros((4, 4), int)
    gt[:2, :2] = 1
    pred = np.zeros((4, 4), int)
    pred[:2, 1:3] = 5
    assert M.dice(gt, pred) == pytest.approx(0.5)
    assert M.iou(gt, pred) == pytest.approx(1 / 3)
    assert M.pixel_scores(gt, pred) == pytest.approx({"dice": 0.5, "iou": 1 / 3})


def test_pixel_scores_empty_cases():
    z = np.zeros((5, 5), int)
    o = np.ones((5, 5), int)
    assert M.dice(z, z) == 1.0 and M.iou(z, z) == 1.0  # both empty: nothing to find, nothing found
    assert M.dice(o, z) == 0.0 and M.iou(o, z) == 0.0  # empty prediction
    assert M.dice(z, o) == 0.0 and M.iou(z, o) == 0.0  # empty ground truth


def test_resize_nearest_picks_pixel_centres():
    # 2x2 -> 4x4: source index floor((i+0.5)*2/4) = 0,0,1,1: each pixel becomes a 2x2 block.
    m = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(M.resize_nearest(m, 4),
                                  [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    assert M.resize_nearest(np.zeros((500, 700)), 224).shape == (224, 224)


def test_paper_protocol_hides_small_errors_native_sees_them():
    # 448x448: gt = pixel (1,1); pred = pixels (1,1) and (0,0). Native Dice = 2*1/(1+2) = 2/3.
    # Resize to 224 samples source rows/cols floor((i+0.5)*2) = 1, 3, 5, ...: (0,0) is never sampled,
    # both masks become the single pixel (0,0): paper Dice = 1, IoU = 1.
    gt = np.zeros((448, 448), int)
    gt[1, 1] = 1
    pred = gt.copy()
    pred[0, 0] = 1
    assert M.pixel_scores(gt, pred)["dice"] == pytest.approx(2 / 3)
    assert M.pixel_scores(gt, pred, protocol="paper") == {"dice": 1.0, "iou": 1.0}
    with pytest.raises(ValueError):
        M.pixel_scores(gt, pred, protocol="bogus")


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        M.dice(np.zeros((3, 3)), np.zeros((3, 4)))


# ----------------------------------------------------------------------------- contingency
def test_contingency_ignores_label_values():
    # gt ids 7 and 300 behave like 1 and 2; counts: bg/bg 1, A/P 2, B/bg 1, bg/P 1 ... by hand below.
    gt = row(6, (7, 0, 1), (300, 3, 4))         # 7 at x0-1, 300 at x3-4
    pred = row(6, (9, 1, 2))                    # pred 9 at x1-2
    # x:   0      1      2      3      4      5
    # gt:  A      A      bg     B      B      bg
    # pr:  bg     P      P      bg     bg     bg
    # (bg,bg) = x5 -> 1; (bg,P) = x2 -> 1; (A,bg) = x0 -> 1; (A,P) = x1 -> 1; (B,bg) = x3,x4 -> 2
    np.testing.assert_array_equal(M.contingency(gt, pred), [[1, 1], [1, 1], [2, 0]])


# ----------------------------------------------------------------------------- GlaS
# gt:   A = x0..9 (10 px), B = x15..24 (10 px)
# pred: P1 = x4..11 (8 px, 6 in A), P2 = x20..24 (5 px, all in B), P3 = x27..28 (2 px, background)
GLAS_GT = row(30, (1, 0, 9), (2, 15, 24))
GLAS_PRED = row(30, (1, 4, 11), (2, 20, 24), (3, 27, 28))


def test_object_f1_hand_case():
    # P1 covers 6/10 of A > 50% -> TP; P2 covers 5/10 of B, not > 50% -> FP; P3 touches no gt -> FP.
    # B unmatched -> FN. TP=1 FP=2 FN=1: F1 = 2*1/(2*1+2+1) = 0.4, precision 1/3, recall 1/2.
    s = M.object_f1(GLAS_GT, GLAS_PRED)
    assert (s.tp, s.fp, s.fn) == (1, 2, 1)
    assert s.f1 == pytest.approx(0.4)
    assert s.precision == pytest.approx(1 / 3) and s.recall == pytest.approx(0.5)


def test_object_dice_hand_case():
    # gt side (weights 10/20 each): D(A,P1) = 2*6/(10+8) = 2/3, D(B,P2) = 2*5/(10+5) = 2/3 -> 2/3.
    # pred side (weights 8/15, 5/15, 2/15): D = 2/3, 2/3, 0 (P3 overlaps nothing) -> 13/15*2/3 = 26/45.
    # object Dice = (2/3 + 26/45)/2 = (30/45 + 26/45)/2 = 28/45.
    assert M.object_dice(GLAS_GT, GLAS_PRED) == pytest.approx(28 / 45)


def test_object_hausdorff_hand_case():
    # H(A,P1): farthest A pixel from P1 is x0 (4 away); farthest P1 pixel from A is x11 (2) -> 4.
    # H(B,P2): x15 is 5 from P2; P2 inside B -> 5.
    # P3 overlaps nothing -> partner = gt at smallest Hausdorff: H(P3,A) >= 27 (x0 to x27);
    #   H(P3,B) = max(x15->x27 = 12, x28->x24 = 4) = 12 -> B, 12.
    # gt side: 0.5*4 + 0.5*5 = 4.5; pred side: (8*4 + 5*5 + 2*12)/15 = 81/15 = 5.4.
    # object Hausdorff = (4.5 + 5.4)/2 = 4.95.
    assert M.object_hausdorff(GLAS_GT, GLAS_PRED) == pytest.approx(4.95)


def test_hausdorff_uses_euclidean_distance_in_2d():
    # single pixels (0,0) and (3,4): distance sqrt(9+16) = 5.
    a = np.zeros((6, 6), bool)
    b = np.zeros((6, 6), bool)
    a[0, 0] = b[3, 4] = True
    assert M.hausdorff(a, b) == pytest.approx(5.0)


def test_hausdorff_counts_interior_pixels_not_only_boundaries():
    # a = 5x5 filled square; b = its outer ring only. The centre (2,2) is 2 px from the ring, although
    # every boundary pixel of a lies on b: Hausdorff = 2 (a boundary-only version would say 0).
    a = np.ones((5, 5), bool)
    b = a.copy()
    b[1:4, 1:4] = False
    assert M.hausdorff(a, b) == pytest.approx(2.0)


def test_glas_perfect_prediction():
    assert M.object_f1(GLAS_GT, GLAS_GT * 3).f1 == 1.0
    assert M.object_dice(GLAS_GT, GLAS_GT) == 1.0
    assert M.object_hausdorff(GLAS_GT, GLAS_GT) == 0.0


def test_glas_empty_cases():
    z = np.zeros_like(GLAS_GT)
    # empty prediction: F1 0 (TP 0, FN 2), object Dice 0, Hausdorff inf
    s = M.object_f1(GLAS_GT, z)
    assert (s.tp, s.fp, s.fn, s.f1) == (0, 0, 2, 0.0)
    assert M.object_dice(GLAS_GT, z) == 0.0
    assert M.object_hausdorff(GLAS_GT, z) == math.inf
    # empty ground truth: every prediction is a false positive
    s = M.object_f1(z, GLAS_PRED)
    assert (s.tp, s.fp, s.fn, s.f1) == (0, 3, 0, 0.0)
    assert M.object_dice(z, GLAS_PRED) == 0.0
    assert M.object_hausdorff(z, GLAS_PRED) == math.inf
    # both empty
    assert M.object_f1(z, z).f1 == 1.0
    assert M.object_dice(z, z) == 1.0
    assert M.object_hausdorff(z, z) == 0.0


# ----------------------------------------------------------------------------- nuclei
def test_aji_hand_case():
    # gt: G1 = x0..9 (10), G2 = x12..15 (4), G3 = x20..21 (2)
    # pred: S1 = x0..4 (5), S2 = x5..13 (9; 5 px in G1, 2 px in G2), S3 = x25..27 (3, background)
    # G1: IoU(S1) = 5/10 = .5 > IoU(S2) = 5/(10+9-5) = 5/14 -> S1: C += 5, U += 10
    # G2: only S2: IoU = 2/(4+9-2) = 2/11 -> C += 2, U += 11
    # G3: touched by nothing -> U += 2
    # S3 never used -> U += 3.   AJI = 7 / 26.
    gt = row(30, (1, 0, 9), (2, 12, 15), (3, 20, 21))
    pred = row(30, (1, 0, 4), (2, 5, 13), (3, 25, 27))
    assert M.aji(gt, pred) == pytest.approx(7 / 26)


def test_aji_and_pq_penalise_merged_nuclei():
    # gt: G1 = x0..3, G2 = x5..8 (4 px each); pred: one S = x0..8 (9 px) over both.
    # AJI: both pick S: C = 4 + 4 = 8, U = 9 + 9 = 18 -> 4/9.
    # PQ: IoU = 4/9 < .5 for both: TP 0, FP 1, FN 2 -> PQ 0.
    gt = row(10, (1, 0, 3), (2, 5, 8))
    pred = row(10, (1, 0, 8))
    assert M.aji(gt, pred) == pytest.approx(4 / 9)
    pq = M.panoptic_quality(gt, pred)
    assert (pq.tp, pq.fp, pq.fn, pq.pq) == (0, 1, 2, 0.0)


def test_panoptic_quality_hand_case():
    # gt: G1 = x0..9 (10), G2 = x12..15 (4), G3 = x20..21 (2)
    # pred: P1 = x0..7 (IoU with G1 8/10 = .8 -> match), P2 = x12..13 (IoU with G2 2/4 = .5, not > .5),
    #       P3 = x20..22 (IoU with G3 2/3 -> match), P4 = x26..27 (nothing)
    # TP 2, FP 2 (P2, P4), FN 1 (G2): DQ = 2/(2 + 1 + .5) = 4/7; SQ = (.8 + 2/3)/2 = 11/15;
    # PQ = 4/7 * 11/15 = 44/105.
    gt = row(30, (1, 0, 9), (2, 12, 15), (3, 20, 21))
    pred = row(30, (1, 0, 7), (2, 12, 13), (3, 20, 22), (4, 26, 27))
    pq = M.panoptic_quality(gt, pred)
    assert (pq.tp, pq.fp, pq.fn) == (2, 2, 1)
    assert pq.dq == pytest.approx(4 / 7)
    assert pq.sq == pytest.approx(11 / 15)
    assert pq.pq == pytest.approx(44 / 105)


def test_nuclei_empty_cases():
    gt = row(10, (1, 0, 3), (2, 5, 8))
    z = np.zeros_like(gt)
    assert M.aji(gt, z) == 0.0 and M.aji(z, gt) == 0.0 and M.aji(z, z) == 1.0
    pq = M.panoptic_quality(gt, z)
    assert (pq.tp, pq.fp, pq.fn, pq.pq) == (0, 0, 2, 0.0)
    pq = M.panoptic_quality(z, gt)
    assert (pq.tp, pq.fp, pq.fn, pq.pq) == (0, 2, 0, 0.0)
    pq = M.panoptic_quality(z, z)
    assert (pq.dq, pq.sq, pq.pq) == (1.0, 1.0, 1.0)


def test_perfect_nuclei_prediction_with_other_ids():
    gt = row(20, (1, 0, 3), (2, 5, 8), (3, 10, 15))
    pred = np.where(gt > 0, gt + 40, 0)
    assert M.aji(gt, pred) == 1.0
    assert M.panoptic_quality(gt, pred).pq == 1.0


def test_score_all_keys_on_a_large_many_object_image():
    # Speed is for benchmarks, not tests: this only checks that a MoNuSeg-sized image with thousands
    # of objects is scored (the overlap table, not a loop over object pairs, makes that possible).
    from skimage.measure import label
    rng = np.random.default_rng(0)
    gt = label(rng.random((1000, 1000)) > 0.6)       # thousands of blobs, like a MoNuSeg tile
    pred = label(np.roll(gt > 0, 1, axis=1))
    s = M.score_all(gt, pred, task="nuclei")
    assert set(s) == set(M.NUCLEI_METRICS)
    assert 0 <= s["aji"] <= 1 and 0 <= s["pq"] <= 1
    g = M.score_all(GLAS_GT, GLAS_PRED, task="glands")
    assert set(g) == set(M.GLAND_METRICS)
    assert g["object_f1"] == pytest.approx(0.4)


def _brute_object_hausdorff(gt, pred):
    # the challenge's definition spelled out with loops over objects, full images, no pruning
    gl, pl = [l for l in np.unique(gt) if l], [l for l in np.unique(pred) if l]

    def side(a_img, a_labels, b_img, b_labels):
        total = sum((a_img == a).sum() for a in a_labels)
        acc = 0.0
        for a in a_labels:
            am = a_img == a
            inter = [(np.count_nonzero(am & (b_img == b)), b) for b in b_labels]
            best = max(inter)
            if best[0] > 0:
                h = M.hausdorff(am, b_img == best[1])
            else:
                h = min(M.hausdorff(am, b_img == b) for b in b_labels)
            acc += am.sum() / total * h
        return acc

    return 0.5 * (side(gt, gl, pred, pl) + side(pred, pl, gt, gl))


def test_object_hausdorff_matches_brute_force_on_random_blobs():
    from scipy import ndimage
    from skimage.measure import label
    rng = np.random.default_rng(1)
    for _ in range(3):
        gt = label(ndimage.gaussian_filter(rng.random((48, 64)), 3) > 0.52)
        pred = label(ndimage.gaussian_filter(rng.random((48, 64)), 3) > 0.52)
        assert M.object_hausdorff(gt, pred) == pytest.approx(_brute_object_hausdorff(gt, pred))


def test_sparse_overlaps_agree_with_dense_contingency():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 6, (20, 20)) * 11
    pred = rng.integers(0, 4, (20, 20))
    ov = M.overlaps(gt, pred)
    dense = M.contingency(gt, pred)
    np.testing.assert_array_equal(dense[1:, 1:][ov.gi, ov.pj], ov.inter)
    assert np.count_nonzero(dense[1:, 1:]) == ov.gi.size
    np.testing.assert_array_equal(dense[1:].sum(1), ov.area_gt)
    np.testing.assert_array_equal(dense[:, 1:].sum(0), ov.area_pred)



def _relabel_by_sorting(labels):
    """relabel_sequential as np.unique does it: the reference the lookup-table path must equal."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int64)
    return (inverse, ids.size - 1) if ids.size and ids[0] == 0 else (inverse + 1, ids.size)


@pytest.mark.parametrize("case", ["sparse ids", "no background", "huge ids", "negative ids",
                                  "uint16", "all background", "one pixel"])
def test_relabel_sequential_equals_sorting_on_every_id_layout(case):
    rng = np.random.default_rng(5)
    labels = {"sparse ids": rng.integers(0, 9, (30, 40)) * 37,
              "no background": rng.integers(3, 12, (30, 40)),
              "huge ids": rng.integers(0, 4, (30, 40)) * 10**12,     # sorting path: no table
              "negative ids": rng.integers(-3, 5, (30, 40)),
              "uint16": (rng.integers(0, 5, (30, 40)) * 1000).astype(np.uint16),
              "all background": np.zeros((4, 5), np.int32),
              "one pixel": np.array([[7]])}[case]
    out, n = M.relabel_sequential(labels)
    ref, n_ref = _relabel_by_sorting(labels)
    assert out.dtype == np.int64 and n == n_ref
    np.testing.assert_array_equal(out, ref)


def test_overlaps_pairs_in_order_with_many_fragments_on_the_sorting_path():
    # more gt x pred pairs than pixels: the pairs are counted by sorting, the result must not change
    rng = np.random.default_rng(3)
    gt = np.arange(1, 401).reshape(20, 20)
    pred = rng.permutation(400).reshape(20, 20) + 1
    ov = M.overlaps(gt, pred)
    dense = M.contingency(gt, pred)
    np.testing.assert_array_equal(dense[1:, 1:][ov.gi, ov.pj], ov.inter)
    assert np.count_nonzero(dense[1:, 1:]) == ov.gi.size
    assert np.all(np.diff(ov.gi * ov.n_pred + ov.pj) > 0)   # listed by (gt, pred): ties stable
    assert M.aji(gt, gt * 3) == 1.0 and M.overlaps(gt, np.zeros_like(gt)).gi.size == 0

# ----------------------------------------------------------------------------- evaluation tables
def test_score_pairs_table_and_json(tmp_path):
    import json
    from src_models.evaluate import score_pairs
    z = np.zeros_like(GLAS_GT)
    report = score_pairs([("a", GLAS_GT, GLAS_PRED), ("b", GLAS_GT, z)], task="glands")
    assert [r["name"] for r in report.rows] == ["a", "b"]
    assert report.rows[0]["objects_gt"] == 2 and report.rows[0]["objects_pred"] == 3
    # mean F1 = (0.4 + 0)/2; Hausdorff: image b has no prediction -> inf, finite-only mean 4.95
    assert report.overall["object_f1"] == pytest.approx(0.2)
    assert report.overall["object_hausdorff"] == math.inf
    assert report.overall_finite["object_hausdorff"] == pytest.approx(4.95)
    md, js = report.write(tmp_path / "out")
    text = md.read_text()
    assert "| a | 2 | 3 |" in text and "**mean**" in text and "0.4000" in text and "inf" in text
    data = json.loads(js.read_text())  # strict JSON: inf became null
    assert data["overall"]["object_hausdorff"] is None
    assert data["overall_finite_only"]["object_hausdorff"] == pytest.approx(4.95)
    assert data["per_image"][0]["object_f1"] == pytest.approx(0.4)


def _write_folder(root, n=2, size=48):
    import imageio.v3 as iio
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[5:15, 5:15] = 1
        mask[25:40, 20:30] = 2
        img = np.where(mask[..., None] > 0, 80, 220).astype(np.uint8) + rng.integers(0, 10, (size, size, 3), dtype=np.uint8)
        iio.imwrite(root / "images" / f"img{i}.png", img)
        iio.imwrite(root / "masks" / f"img{i}.png", mask)


def test_cli_evaluate_scores_existing_predictions(tmp_path):
    import json
    from napari_dca.cli import main
    _write_folder(tmp_path / "data")
    # predictions = the masks themselves -> perfect scores
    rc = main(["evaluate", "--predictions", str(tmp_path / "data" / "masks"),
               "--masks", str(tmp_path / "data" / "masks"), "--task", "all", "-o", str(tmp_path / "r.md")])
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["images"] == 2
    assert data["overall"]["dice"] == 1.0 and data["overall"]["aji"] == 1.0
    assert data["overall"]["object_f1"] == 1.0 and data["overall"]["object_hausdorff"] == 0.0


def _tiny_checkpoint_on_folder(tmp_path, data_split):
    """Three image/mask pairs under tmp_path/data and an untrained tiny checkpoint with data_split."""
    import torch
    from src_models import build_model
    from src_models.checkpoints import card_for, save_checkpoint
    torch.set_num_threads(1)
    _write_folder(tmp_path / "data", n=3)
    model = build_model("unet", width=0.125)
    return save_checkpoint(model, tmp_path / "tiny.safetensors",
                           card_for(model, task="nuclei", tile_size=32, data_split=data_split))


def test_cli_evaluate_runs_a_checkpoint_on_a_split(tmp_path, capsys):
    import json
    from napari_dca.cli import main
    ckpt = _tiny_checkpoint_on_folder(tmp_path, {"validation": ["img1"], "train": ["img0", "img2"]})
    out = tmp_path / "eval"
    rc = main(["evaluate", "-c", str(ckpt), "--images", str(tmp_path / "data" / "images"),
               "--masks", str(tmp_path / "data" / "masks"), "--split", "val", "-o", str(out),
               "--device", "cpu"])
    assert rc == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert [r["name"] for r in data["per_image"]] == ["img1"]  # the card's validation split
    assert set(data["metrics"]) == set(M.NUCLEI_METRICS)
    assert (out / "evaluation.md").read_text().startswith("| image |")
    # names missing from the folders are an error, not a smaller test set
    names = tmp_path / "names.txt"
    names.write_text("img0\nnope\n")
    rc = main(["evaluate", "-c", str(ckpt), "--images", str(tmp_path / "data" / "images"),
               "--masks", str(tmp_path / "data" / "masks"), "--names", str(names), "-o", str(out)])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_cli_evaluate_refuses_the_validation_split_of_all_image_weights(tmp_path, capsys):
    # Final weights (train_recipe.py --all-images) learned from every image: the folder's seeded
    # validation split would silently score images they were trained on.
    from napari_dca.cli import main
    ckpt = _tiny_checkpoint_on_folder(tmp_path, {"validation": [], "train": ["img0", "img1", "img2"]})
    args = ["evaluate", "-c", str(ckpt), "--images", str(tmp_path / "data" / "images"),
            "--masks", str(tmp_path / "data" / "masks"), "-o", str(tmp_path / "eval"), "--device", "cpu"]
    assert main(args + ["--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "trained on every image" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "eval" / "evaluation.json").exists()
    assert main(args + ["--split", "all"]) == 0   # every image, knowingly
