"""One slide as many tasks: each tissue core's part (model + instance step) is computed on its own,
in any order and in any process, stored, and stitched afterwards; the labels are those of the
single-process run. On a two-worker LocalCluster, a worker that dies in a chunk task is replaced
and its chunk redone to the same result."""
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src_models.chunked_instances import ChunkGrid
from src_models.inference import ModelRunner
from src_models.slide.pipeline import (core_part, finish_slide, output_paths, plan_slide,
                                       segment_slide)
from src_models.slide.reader import open_slide
from src_models.slide.zarr_labels import open_labels
from src_models.testing.make_slide import make_slide

import test_slide_pipeline as pipe  # the stand-in model and its card

CHUNK, MARGIN = 256, 24


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_slide(tmp_path_factory.mktemp("tasks") / "tasks.svs", (768, 1024), seed=21,
                      islands=3)[0]


def labels_of(slide, out):
    return np.asarray(open_labels(output_paths(slide, out)["labels"]))


def test_grid_finds_a_core_by_its_index():
    grid = ChunkGrid(700, 1000, 256, 24)
    assert [grid.core(c.index) for c in grid.cores()] == grid.cores()
    with pytest.raises(IndexError):
        grid.core(len(grid.cores()))


@pytest.mark.parametrize("mode", ["nuclei", "glands"])   # ownership rule, face joining
def test_parts_computed_in_any_order_stitch_to_the_single_process_labels(slide, tmp_path, mode):
    reference = segment_slide(slide, pipe.DarkIsForeground(), pipe.CARD, tmp_path / "single",
                              mode=mode, chunk=CHUNK, margin=MARGIN, batch_size=8,
                              geojson=False, table=False)
    model = pipe.DarkIsForeground()
    plan = plan_slide(slide, pipe.CARD, tmp_path / "tasks", mode=mode, chunk=CHUNK, margin=MARGIN)
    assert len(plan.pending) == len(plan.boxes) > 4
    runner = ModelRunner(model, torch.device("cpu"), max_batch=8)
    order = list(plan.pending)
    random.Random(0).shuffle(order)
    with open_slide(slide) as s:
        for index in order:     # as tasks would: each on its own, from its own small plan
            one = plan.for_core(index)
            one.parts.save(index, core_part(one, s, plan.grid.core(index), model, pipe.CARD,
                                            runner, 8))
        # the seam step only reads stored parts
        result = finish_slide(plan, s, lambda core: plan.parts.load(core.index), "torch",
                              geojson=False, table=False)
    assert result.n_objects == reference.n_objects > 10
    assert np.array_equal(labels_of(slide, tmp_path / "tasks"), labels_of(slide, tmp_path / "single"))
    assert not output_paths(slide, tmp_path / "tasks")["run"].exists()


class KillsItsWorkerOnce(pipe.DarkIsForeground):
    """The stand-in model, except that while the marker file does not exist, a forward pass
    writes it and kills its whole worker process (no exception, no cleanup: what an
    out-of-memory kill or a lost node looks like). So the first chunk task to run dies."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x):
        if not os.path.exists(self.marker):
            try:   # created exclusively: of two workers starting together, one dies
                fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return super().forward(x)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os._exit(137)
        return super().forward(x)


@pytest.mark.slow
def test_chunk_tasks_on_two_workers_survive_a_lost_worker_and_equal_the_single_process_run(
        slide, tmp_path):
    pytest.importorskip("distributed")
    import cloudpickle

    from src_models.slide.cluster import plan_slide_task, run_slides
    cloudpickle.register_pickle_by_value(sys.modules[pipe.__name__])
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    reference = pipe.run(slide, tmp_path / "single", geojson=False, table=False)
    marker = tmp_path / "killed-once"
    options = {"chunk": CHUNK, "margin": MARGIN, "batch_size": 8, "device": "cpu", "threads": 1,
               "runtime": "torch", "geojson": False, "table": False}
    [outcome] = run_slides([slide], tmp_path / "cluster", (KillsItsWorkerOnce(str(marker)),
                                                           pipe.CARD),
                           options, workers=2, retries=0, chunk_tasks_above=0)
    dead = int(marker.read_text())
    assert dead != os.getpid()                                   # a worker really died
    assert outcome.status == "done", outcome.summary
    # the plan gives the model no work, so the death was in a chunk task; the scheduler ran it
    # again on a live worker (the dead one completed none), and every tissue core was a task
    plan = plan_slide(slide, pipe.CARD, tmp_path / "replan", chunk=CHUNK, margin=MARGIN)
    assert outcome.chunk_tasks == len(plan.boxes) > 4, outcome.summary
    assert dead not in outcome.chunk_pids and outcome.chunk_workers >= 1
    labels = labels_of(slide, tmp_path / "cluster")
    assert labels.max() == reference.n_objects
    assert np.array_equal(labels, np.asarray(open_labels(reference.labels)))
    assert not output_paths(slide, tmp_path / "cluster")["run"].exists()
    # idempotent: the slide's outputs exist, so its first task does no work
    again = plan_slide_task(str(slide), str(tmp_path / "cluster"), (pipe.DarkIsForeground(),
                                                                     pipe.CARD), options)
    assert again.status == "skipped"
