"""A slide end to end: tissue-only chunks, OME-Zarr label pyramid, QuPath GeoJSON that matches the
labels, the object table, and a killed run that resumes to the same labels."""
import json

import numpy as np
import pytest
import torch

from src_models.slide.object_table import COLUMNS, read_table
from src_models.slide.pipeline import output_paths, segment_slide
from src_models.slide.zarr_labels import open_labels
from src_models.testing.make_slide import make_slide

torch.set_num_threads(1)


class DarkIsForeground(torch.nn.Module):
    """A stand-in model (no training, no convolutions): dark, haematoxylin-rich pixels are
    foreground. Deterministic and fast, so the test exercises the slide machinery only."""
    config = {"in_channels": 3}

    def forward(self, x):
        return -6.0 * (x.mean(1, keepdim=True) + 0.3)


CARD = {"task": "nuclei", "tile_size": 128, "architecture": "dark-is-foreground",
        "instance_params": {"min_size": 12, "min_distance": 3}}


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    path, layout = make_slide(tmp_path_factory.mktemp("pipe") / "small.svs", (1024, 1536),
                              seed=3, islands=4)
    return path, layout


def run(slide, out, **kw):
    return segment_slide(slide, DarkIsForeground(), CARD, out, chunk=256, margin=24,
                         batch_size=8, **kw)


@pytest.fixture(scope="module")
def finished(small_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return run(small_slide[0], out), out


def test_slide_run_writes_labels_geojson_and_table(finished, small_slide):
    result, out = finished
    paths = output_paths(small_slide[0], out)
    assert result.n_objects > 50
    assert 0 < result.chunks_segmented < result.chunks          # glass chunks were skipped
    assert 0.15 < result.tissue_fraction < 0.45
    assert "objects, tissue" in result.summary() and "mm²" in result.summary()
    assert not paths["run"].exists()                            # work folder removed when done
    labels = np.asarray(open_labels(paths["labels"]))
    assert labels.shape == (1024, 1536) and labels.dtype == np.uint32
    ids = np.unique(labels)
    assert ids[0] == 0 and ids[-1] == result.n_objects and len(ids) == result.n_objects + 1

    import zarr
    group = zarr.open_group(str(paths["labels"]), mode="r")
    assert group.attrs["labels"] == ["nuclei"]
    meta = group["labels/nuclei"].attrs["multiscales"][0]
    assert meta["version"] == "0.4" and [a["name"] for a in meta["axes"]] == ["y", "x"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in meta["datasets"]]
    assert scales[0] == pytest.approx([0.5, 0.5]) and scales[1] == pytest.approx([1.0, 1.0])
    level1 = np.asarray(open_labels(paths["labels"], level=1))
    assert np.array_equal(level1, labels[::2, ::2])

    rows = read_table(paths["table"])
    assert len(rows) == result.n_objects and tuple(rows[0]) == COLUMNS
    row = rows[0]
    area = float(row["area_px"])
    assert float(row["area_um2"]) == pytest.approx(area * 0.25, rel=1e-4)
    assert (labels == int(row["id"])).sum() == area
    assert 0 <= float(row["eccentricity"]) < 1 and float(row["mean_haematoxylin"]) != 0


def test_geojson_is_qupath_ready_and_matches_the_labels(finished, small_slide):
    from skimage.draw import polygon as fill_polygon
    result, out = finished
    paths = output_paths(small_slide[0], out)
    data = json.loads(paths["geojson"].read_text())
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert len(features) == result.n_objects
    labels = np.asarray(open_labels(paths["labels"]))
    ids = set()
    for feat in features[:: max(1, len(features) // 40)]:
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus"
        assert len(props["classification"]["color"]) == 3
        assert props["measurements"]["Area µm^2"] > 0
        assert feat["geometry"]["type"] in ("Polygon", "MultiPolygon")
        rings = ([feat["geometry"]["coordinates"][0]] if feat["geometry"]["type"] == "Polygon"
                 else [p[0] for p in feat["geometry"]["coordinates"]])
        label = int(props["name"].split()[-1])
        ids.add(feat["id"])
        drawn = np.zeros(labels.shape, bool)
        for ring in rings:
            ring = np.asarray(ring)
            assert len(ring) >= 4 and np.array_equal(ring[0], ring[-1])
            assert is_simple(ring)
            # vertices are on pixel edges: pixel (r, c) is inside when its centre (c+.5, r+.5) is
            rr, cc = fill_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, labels.shape)
            drawn[rr, cc] = True
        truth = labels == label
        iou = (drawn & truth).sum() / (drawn | truth).sum()
        assert iou == 1.0, (label, iou)          # traced along pixel edges: exact
    assert len(ids) == len(features[:: max(1, len(features) // 40)])


def is_simple(ring):
    """No two non-adjacent edges of the closed ring cross."""
    pts = np.asarray(ring, float)
    edges = list(zip(pts[:-1], pts[1:]))
    n = len(edges)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    for i in range(n):
        for j in range(i + 2, n):
            if i == 0 and j == n - 1:
                continue
            p1, p2 = edges[i]
            q1, q2 = edges[j]
            d1, d2 = cross(q1, q2, p1), cross(q1, q2, p2)
            d3, d4 = cross(p1, p2, q1), cross(p1, p2, q2)
            if d1 * d2 < 0 and d3 * d4 < 0:
                return False
    return True


def test_killed_run_resumes_to_the_same_labels(finished, small_slide, tmp_path):
    result, out = finished
    reference = np.asarray(open_labels(output_paths(small_slide[0], out)["labels"]))
    calls = {"n": 0}

    def die_after_five():
        calls["n"] += 1
        return calls["n"] > 5
    with pytest.raises(InterruptedError):
        run(small_slide[0], tmp_path, cancel=die_after_five)
    paths = output_paths(small_slide[0], tmp_path)
    assert paths["run"].exists() and not paths["labels"].exists()
    resumed = run(small_slide[0], tmp_path)
    assert resumed.n_objects == result.n_objects
    assert np.array_equal(np.asarray(open_labels(paths["labels"])), reference)


def test_tissue_detection_off_segments_every_chunk(small_slide, tmp_path):
    result = run(small_slide[0], tmp_path, tissue=False, geojson=False, table=False)
    assert result.chunks_segmented == result.chunks and result.tissue_fraction == 1.0
    assert result.geojson is None and result.table is None


def test_napari_opens_the_label_pyramid_aligned_with_its_slide(finished, small_slide):
    from napari_dca._reader import get_slide_reader, read_label_pyramid
    result, out = finished
    path = output_paths(small_slide[0], out)["labels"]
    assert get_slide_reader(str(path)) is read_label_pyramid
    [(levels, kwargs, kind)] = read_label_pyramid(str(path))
    assert kind == "labels" and kwargs["multiscale"] and kwargs["scale"] == (0.5, 0.5)
    assert levels[0].shape == (1024, 1536) and int(levels[0].max()) == result.n_objects


def test_progress_reports_time_left_and_resumed_chunks(small_slide, tmp_path):
    seen = []
    calls = {"n": 0}

    def stop_after_ten():
        calls["n"] += 1
        return calls["n"] > 10
    with pytest.raises(InterruptedError):
        run(small_slide[0], tmp_path, cancel=stop_after_ten, geojson=False, table=False)
    result = run(small_slide[0], tmp_path, geojson=False, table=True,
                 progress=lambda *a: seen.append(a))
    segment = [s for s in seen if s[0] == "segment"]
    # the resumed run counts on from the ten cores the first one completed
    assert [s[1] for s in segment] == list(range(11, result.chunks + 1))
    assert all(s[2] == result.chunks for s in segment)
    left = [s[3] for s in segment if s[3] is not None]
    assert left and left[-1] == 0 and all(v >= 0 for v in left)
    assert {"write", "measure"} <= {s[0] for s in seen}
    assert 0 < result.chunks_resumed < result.chunks_segmented
    line = result.summary()
    assert f"({result.chunks_resumed} from an earlier run)" in line and "tissue" in line
    assert line.count("\n") == 0 and f"{result.n_objects} objects" in line


def test_a_region_run_segments_only_the_cores_meeting_it(finished, small_slide, tmp_path):
    result, out = finished
    region = (256, 512, 512, 1024)          # two cores of 256 px
    part = run(small_slide[0], tmp_path, region=region, geojson=False, table=False)
    assert part.chunks == result.chunks and 0 < part.chunks_segmented <= 2
    assert part.region == region and "in region" in part.summary()
    assert 0 < part.region_tissue_megapixels <= 2 * 256 * 256 / 1e6
    labels = np.asarray(open_labels(output_paths(small_slide[0], tmp_path)["labels"]))
    outside = np.ones(labels.shape, bool)
    outside[256 - 24:512 + 24, 512 - 24:1024 + 24] = False   # owned objects reach a margin out
    assert labels.max() == part.n_objects > 0 and not labels[outside].any()
