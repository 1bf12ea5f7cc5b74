"""The chunked instance step: objects straddling chunk borders come out once and whole, for both
stitching rules; ids are unique; an interrupted run resumes to the same labels."""
import numpy as np
import pytest

from src_models.chunked_instances import (ChunkGrid, ChunkLog, chunked_labels, label_cores,
                                          rule_for)
from src_models.instances import InstanceParams, probabilities_to_labels

CHUNK, MARGIN = 64, 16


def discs(shape, specs, value=0.9):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    prob = np.full(shape, 0.05, np.float32)
    for cy, cx, r in specs:
        prob[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value
    return prob


def nuclei_fn(prob):
    return probabilities_to_labels(prob, {"task": "nuclei", "instance_params": {"min_size": 4}})


def glands_fn(prob):
    return probabilities_to_labels(prob, {"task": "glands", "instance_params": {"min_size": 4}})


def same_partition(a, b):
    """Every object of a is exactly one object of b and vice versa."""
    assert (a > 0).sum() == (b > 0).sum() and np.array_equal(a > 0, b > 0)
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], 1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def matched_one_to_one(a, b, min_iou=0.8):
    """Same foreground; each object of a overlaps one object of b with IoU >= min_iou, and the
    matching is one-to-one (a watershed split line may move a pixel between windows)."""
    assert np.array_equal(a > 0, b > 0)
    assert a.max() == b.max()
    matched = set()
    for lab in range(1, int(a.max()) + 1):
        ids, counts = np.unique(b[a == lab], return_counts=True)
        best = ids[np.argmax(counts)]
        iou = counts.max() / np.count_nonzero((a == lab) | (b == best))
        assert iou >= min_iou, (lab, iou)
        matched.add(int(best))
    assert len(matched) == a.max()


# nuclei centred on chunk borders (x = 64, y = 64, 128), on a corner, and a touching pair whose
# contact line is the border itself
STRADDLING = [(30, 64, 7), (64, 30, 7), (64, 64, 7), (128, 100, 6), (100, 128, 6),
              (150, 57, 7), (150, 71, 7), (20, 20, 5), (170, 170, 6)]


def test_rules_follow_the_post_processing():
    assert rule_for(InstanceParams(mode="nuclei")) == "own"
    assert rule_for(InstanceParams(mode="glands")) == "join"
    assert rule_for(InstanceParams(mode="semantic")) == "tile"


def test_nuclei_straddling_chunk_borders_are_one_object_each():
    prob = discs((192, 192), STRADDLING)
    labels = chunked_labels(prob, nuclei_fn, "own", chunk=CHUNK, margin=MARGIN)
    matched_one_to_one(labels, nuclei_fn(prob))
    assert labels.max() == len(STRADDLING) == len(np.unique(labels)) - 1
    for cy, cx, r in STRADDLING:
        lab = labels[cy, cx]
        assert lab > 0
        # the whole disc, on both sides of the border, carries that one id
        assert labels[cy - r + 1, cx] == lab == labels[cy + r - 1, cx]
        assert labels[cy, cx - r + 1] == lab == labels[cy, cx + r - 1]
    assert labels[150, 57] != labels[150, 71]   # touching pair across x=64 still split


def test_a_gland_longer_than_any_overlap_is_joined_into_one_object():
    h, w = 192, 256
    yy, xx = np.mgrid[:h, :w]
    prob = np.full((h, w), 0.05, np.float32)
    snake = np.abs(yy - (96 + 50 * np.sin(xx / 30.0))) < 6       # crosses every column of chunks
    u_shape = ((np.abs(xx - 30) < 4) | (np.abs(xx - 110) < 4)) & (yy > 150) & (yy < 188) \
        | (np.abs(yy - 184) < 4) & (xx > 26) & (xx < 114)      # its arms meet only below
    prob[snake | u_shape] = 0.9
    prob[10:20, 60:70] = 0.9                                     # a gland on a chunk corner
    labels = chunked_labels(prob, glands_fn, "join", chunk=CHUNK, margin=4)
    whole = glands_fn(prob)
    same_partition(labels, whole)
    assert labels.max() == whole.max() == 3
    assert set(np.unique(labels)) == {0, 1, 2, 3}                # renumbered 1..n
    assert len(np.unique(labels[snake])) == 1


def test_skipped_chunks_stay_empty_and_cost_no_model_call():
    prob = discs((128, 128), [(30, 30, 6), (100, 100, 6)])
    calls = []

    def source(y0, y1, x0, x1):
        calls.append((y0, x0))
        return prob[y0:y1, x0:x1]
    work = np.zeros(prob.shape, np.int32)
    grid = ChunkGrid(128, 128, CHUNK, MARGIN)
    result = label_cores(source, nuclei_fn, work, grid, "own",
                         include=lambda core: core.x0 == 0 and core.y0 == 0)
    assert result.skipped == 3 and len(calls) == 1
    assert work[30, 30] == 1 and work[100, 100] == 0 and result.n_objects == 1
    assert result.boxes[:, 0].tolist() == [1]


def _uninterrupted_run(rule, fn):
    """The straddling discs labelled in one uninterrupted run: what an interrupted run must equal."""
    prob = discs((192, 192), STRADDLING)
    grid = ChunkGrid(192, 192, CHUNK, MARGIN)
    source = lambda y0, y1, x0, x1: prob[y0:y1, x0:x1]   # noqa: E731
    reference = np.zeros(prob.shape, np.int32)
    return prob, grid, source, reference, label_cores(source, fn, reference, grid, rule)


@pytest.mark.parametrize("rule,fn", [("own", nuclei_fn), ("join", glands_fn)])
def test_interrupted_run_resumes_to_the_same_labels(tmp_path, rule, fn):
    prob, grid, source, reference, ref = _uninterrupted_run(rule, fn)

    work = np.zeros(prob.shape, np.int32)
    calls = {"n": 0}

    def stop_after_four():
        calls["n"] += 1
        return calls["n"] > 4
    with pytest.raises(InterruptedError):
        label_cores(source, fn, work, grid, rule, log=ChunkLog(tmp_path / "log"),
                    cancel=stop_after_four)
    # a core half-written when the run died: redo it over whatever it left
    resumed = label_cores(source, fn, work, grid, rule, log=ChunkLog(tmp_path / "log"))
    assert np.array_equal(work, reference)
    assert resumed.n_objects == ref.n_objects
    assert np.array_equal(resumed.boxes, ref.boxes)


def test_instance_maker_sends_large_images_through_the_chunked_step(monkeypatch):
    import src_models.chunked_instances as ci
    from src_models.instances import InstanceMaker
    prob = discs((300, 2200), [(150, 2048, 9), (150, 1000, 9), (40, 40, 6)])
    calls = []
    real = ci.chunked_labels
    monkeypatch.setattr(ci, "chunked_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(ci, "CHUNKED_ABOVE_PIXELS", 300 * 2000)
    labels = InstanceMaker(prob, {"task": "nuclei"}).labels()
    assert calls and labels.max() == 3
    assert labels[150, 2040] == labels[150, 2056] > 0      # one nucleus across x = 2048
    stack = InstanceMaker(np.stack([prob, prob]), {"task": "glands"}, stack=True).labels()
    assert stack[0].max() == 3 and stack[1].max() == 6     # ids unique across planes


class _DiesBeforeRecording(ChunkLog):
    """A log whose process 'dies' (raises) after the `after`-th core was written into the work
    array but before that core's record reached the disk: the retried core must rewrite the same
    result over what it left."""

    def __init__(self, folder, after):
        super().__init__(folder)
        self.after = after

    def add(self, record):
        if len(self.records) + 1 == self.after:
            raise SystemExit("worker lost")
        super().add(record)


@pytest.mark.parametrize("rule,fn", [("own", nuclei_fn), ("join", glands_fn)])
@pytest.mark.parametrize("after", [2, 5])
def test_a_core_retried_after_its_write_rewrites_the_same_result(tmp_path, rule, fn, after):
    prob, grid, source, reference, ref = _uninterrupted_run(rule, fn)
    work = np.zeros(prob.shape, np.int32)
    with pytest.raises(SystemExit):
        label_cores(source, fn, work, grid, rule, log=_DiesBeforeRecording(tmp_path / "log", after))
    assert len(ChunkLog(tmp_path / "log").records) == after - 1 and work.any()
    resumed = label_cores(source, fn, work, grid, rule, log=ChunkLog(tmp_path / "log"))
    assert np.array_equal(work, reference)
    assert resumed.n_objects == ref.n_objects and np.array_equal(resumed.boxes, ref.boxes)


def test_segment_cli_labels_a_large_plain_image_through_the_chunked_step(tmp_path, monkeypatch,
                                                                         capsys):
    # "built once, used everywhere": a plain (not pyramidal) image above the size bound goes
    # through the same chunked step as slides; its labels equal the whole-image step's
    import imageio.v3 as iio
    import tifffile

    import src_models.chunked_instances as ci
    import test_slide_pipeline as pipe
    from napari_dca import _cli_segment, cli
    monkeypatch.setattr(_cli_segment, "load_model",
                        lambda checkpoint, device: (pipe.DarkIsForeground(), pipe.CARD))
    image = np.full((300, 420, 3), 230, np.uint8)
    image[discs((300, 420), [(150, 128, 9), (40, 300, 7), (128, 260, 8)], 1.0) > 0.5] = 40
    iio.imwrite(tmp_path / "plain.png", image)
    calls = []
    real = ci.chunked_labels
    monkeypatch.setattr(ci, "chunked_labels",
                        lambda *a, **k: calls.append(1) or real(*a, chunk=128, margin=24))
    runs = {}
    for bound in (100 * 100, 10 ** 9):      # chunked, then whole-image
        monkeypatch.setattr(ci, "CHUNKED_ABOVE_PIXELS", bound)
        out = tmp_path / f"out{bound}"
        assert cli.main(["segment", str(tmp_path / "plain.png"), "-o", str(out), "--quiet"]) == 0
        runs[bound] = tifffile.imread(out / "plain.png.labels.tif")
    capsys.readouterr()
    assert len(calls) == 1
    chunked, whole = runs[100 * 100], runs[10 ** 9]
    assert whole.max() == 3 and chunked[150, 128] > 0          # one across the x = 128 border
    same_partition(chunked, whole)
