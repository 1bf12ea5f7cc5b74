"""Many slides on dask.distributed: a two-worker LocalCluster run gives the same labels as the
single-process run; a bad slide is reported without stopping the others; reruns skip done slides."""
import sys

import numpy as np
import pytest

pytest.importorskip("distributed")

import cloudpickle  # noqa: E402  (comes with distributed)

from src_models.slide.cluster import plan_slide_task, run_slides  # noqa: E402
from src_models.slide.pipeline import output_paths, segment_slide  # noqa: E402
from src_models.slide.zarr_labels import open_labels  # noqa: E402
from src_models.testing.make_slide import make_slide  # noqa: E402

import test_slide_pipeline as pipe  # noqa: E402  (the stand-in model and its card)

OPTIONS = {"chunk": 256, "margin": 24, "batch_size": 8, "device": "cpu", "threads": 1}


@pytest.mark.slow
def test_two_worker_cluster_equals_single_process(tmp_path):
    # the stand-in model's class lives in a test module the workers cannot import: send it by value
    cloudpickle.register_pickle_by_value(sys.modules[pipe.__name__])
    slides = [make_slide(tmp_path / f"s{i}.svs", (512, 768), seed=10 + i, islands=2)[0]
              for i in range(2)]
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a tiff")
    model = (pipe.DarkIsForeground(), pipe.CARD)
    single = tmp_path / "single"
    for slide in slides:
        segment_slide(slide, model[0], model[1], single, chunk=256, margin=24, batch_size=8)
    seen = []
    outcomes = run_slides(slides + [broken], tmp_path / "cluster", model, OPTIONS, workers=2,
                          retries=0, report=seen.append)
    assert [o.status for o in outcomes] == ["done", "done", "failed"]
    assert "broken.svs: failed" in outcomes[2].summary and len(seen) == 3
    for slide in slides:
        a = np.asarray(open_labels(output_paths(slide, single)["labels"]))
        b = np.asarray(open_labels(output_paths(slide, tmp_path / "cluster")["labels"]))
        assert a.max() > 0 and np.array_equal(a, b)
    # idempotent: a slide whose outputs exist is not redone (checked in this process)
    again = plan_slide_task(str(slides[0]), str(tmp_path / "cluster"), model, OPTIONS)
    assert again.status == "skipped"
