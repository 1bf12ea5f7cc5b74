"""A dask worker that dies in the middle of a slide: the scheduler gives the slide to a new worker,
which resumes from the chunks the dead one completed and writes the same labels as a run that was
never interrupted; the other slides of the batch are not disturbed."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

import cloudpickle  # noqa: E402  (comes with distributed)

from src_models.slide.cluster import run_slides  # noqa: E402
from src_models.slide.pipeline import output_paths  # noqa: E402
from src_models.slide.zarr_labels import open_labels  # noqa: E402
from src_models.testing.make_slide import make_slide  # noqa: E402

import test_slide_pipeline as pipe  # noqa: E402

OPTIONS = {"chunk": 256, "margin": 24, "batch_size": 8, "device": "cpu", "threads": 1,
           "runtime": "torch", "geojson": False, "table": False}


class KillsItsWorkerOnce(pipe.DarkIsForeground):
    """The stand-in model, except that on the first attempt, after `calls` forward passes (a few
    chunks into the slide), it kills the whole worker process (no exception, no cleanup: what an
    out-of-memory kill or a lost node looks like). The marker file makes it a first attempt only."""

    def __init__(self, marker: str, calls: int):
        super().__init__()
        self.marker, self.calls, self.seen = marker, calls, 0

    def forward(self, x):
        self.seen += 1
        if self.seen > self.calls and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(137)
        return super().forward(x)


@pytest.mark.slow
def test_slide_survives_the_loss_of_its_worker(tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[pipe.__name__])
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    slide, _ = make_slide(tmp_path / "dies.svs", (768, 768), seed=41, islands=1)
    other, _ = make_slide(tmp_path / "other.svs", (512, 512), seed=42, islands=1)
    reference = pipe.run(slide, tmp_path / "single", runtime="torch", geojson=False, table=False)
    marker = tmp_path / "killed-once"
    model = KillsItsWorkerOnce(str(marker), calls=6)   # 8 tiles a call: two or three chunks in
    outcomes = run_slides([slide, other], tmp_path / "cluster", (model, pipe.CARD), OPTIONS,
                          workers=1, retries=1, chunk_tasks_above=100)   # one task per slide
    assert marker.exists()                                      # the worker really died
    assert int(marker.read_text()) != os.getpid()
    assert [o.status for o in outcomes] == ["done", "done"], [o.summary for o in outcomes]
    assert "from an earlier run" in outcomes[0].summary         # resumed, not restarted
    labels = np.asarray(open_labels(output_paths(slide, tmp_path / "cluster")["labels"]))
    assert labels.max() == reference.n_objects
    assert np.array_equal(labels, np.asarray(open_labels(reference.labels)))
    assert not output_paths(slide, tmp_path / "cluster")["run"].exists()
