"""--runtime in the slide pipeline: the exported ONNX graph gives the torch labels, and dask workers
starting together on an empty cache export the graph once (one worker writes, the others wait on
the lock and reuse the file; no partial file is left)."""
import sys

import numpy as np
import pytest

from src_models.slide.pipeline import output_paths, segment_slide
from src_models.slide.runtime import slide_runner
from src_models.slide.zarr_labels import open_labels
from src_models.testing.make_slide import make_slide

import test_slide_pipeline as pipe

pytest.importorskip("onnxruntime")
from src_models import runtime_onnx  # noqa: E402
from src_models.runtime_onnx import export_lock  # noqa: E402

if not runtime_onnx.exporter_available():
    pytest.skip("the ONNX exporter (onnx, onnxscript) is not installed", allow_module_level=True)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty export cache (the variable is inherited by CLI subprocesses and dask workers)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(runtime_onnx.CACHE_ENV, str(folder))
    runtime_onnx._checked_sessions.clear()   # graphs this process already opened elsewhere
    return folder / "onnx"


def test_onnx_runtime_segments_a_slide_like_torch(tmp_path, fresh_cache):
    slide, _ = make_slide(tmp_path / "rt.svs", (512, 768), seed=7, islands=2)
    by_torch = pipe.run(slide, tmp_path / "torch", runtime="torch", geojson=False, table=False)
    by_graph = pipe.run(slide, tmp_path / "onnx", runtime="onnx", geojson=False, table=False)
    assert by_torch.runtime == "torch" and by_graph.runtime == "onnx (exported graph)"
    assert "onnx (exported graph)" in by_graph.summary()
    a = np.asarray(open_labels(output_paths(slide, tmp_path / "torch")["labels"]))
    b = np.asarray(open_labels(output_paths(slide, tmp_path / "onnx")["labels"]))
    assert a.max() > 10 and np.array_equal(a, b)
    assert len(list(fresh_cache.glob("*.onnx"))) == 1
    # a second run in this process opens the cached graph instead of exporting again
    _, how = slide_runner(pipe.DarkIsForeground(), pipe.CARD, runtime="onnx")
    assert how == "cached"


def test_export_lock_is_exclusive_between_processes(tmp_path):
    import subprocess
    import time
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from src_models.runtime_onnx import export_lock\n"
        f"with export_lock(Path({str(tmp_path)!r})):\n"
        f"    Path({str(tmp_path / 'held')!r}).touch(); time.sleep(1.5)\n"
        f"    Path({str(tmp_path / 'leaving')!r}).touch()\n")])
    try:
        while not (tmp_path / "held").exists():
            assert holder.poll() is None, "the lock holder died"
            time.sleep(0.05)
        start = time.perf_counter()
        with export_lock(tmp_path):
            waited = time.perf_counter() - start
            assert (tmp_path / "leaving").exists()   # acquired only once the holder was done
        assert waited > 0.3
    finally:
        holder.wait(timeout=30)


@pytest.mark.slow
def test_cluster_workers_share_one_exported_graph(tmp_path, fresh_cache):
    pytest.importorskip("distributed")
    import cloudpickle

    from src_models.slide.cluster import run_slides
    cloudpickle.register_pickle_by_value(sys.modules[pipe.__name__])
    slides = [make_slide(tmp_path / f"w{i}.svs", (512, 512), seed=30 + i, islands=1)[0]
              for i in range(2)]
    options = {"chunk": 256, "margin": 24, "batch_size": 8, "device": "cpu", "threads": 1,
               "runtime": "onnx", "geojson": False, "table": False}
    outcomes = run_slides(slides, tmp_path / "out", (pipe.DarkIsForeground(), pipe.CARD), options,
                          workers=2, retries=0)
    assert [o.status for o in outcomes] == ["done", "done"], [o.summary for o in outcomes]
    hows = sorted("exported" if "exported graph" in o.summary else
                  "cached" if "cached graph" in o.summary else o.summary for o in outcomes)
    assert hows == ["cached", "exported"]           # one export, whichever worker came first
    files = sorted(p.name for p in fresh_cache.iterdir())
    assert len([f for f in files if f.endswith(".onnx")]) == 1
    assert not [f for f in files if f.endswith(".partial")]
    for slide in slides:
        reference = pipe.run(slide, tmp_path / "single", runtime="torch", geojson=False,
                             table=False)
        labels = np.asarray(open_labels(output_paths(slide, tmp_path / "out")["labels"]))
        assert labels.max() == reference.n_objects
        assert np.array_equal(labels, np.asarray(open_labels(reference.labels)))


def test_segment_cli_passes_runtime_to_the_slide_pipeline(tmp_path, fresh_cache, monkeypatch,
                                                          capsys):
    from napari_dca import _cli_segment, cli
    monkeypatch.setattr(_cli_segment, "load_model",
                        lambda checkpoint, device: (pipe.DarkIsForeground(), pipe.CARD))
    slide, _ = make_slide(tmp_path / "cli.svs", (512, 512), seed=8, islands=1)
    code = cli.main(["segment", str(slide), "-o", str(tmp_path / "out"), "--runtime", "onnx",
                     "--chunk", "256", "--quiet", "--no-geojson", "--no-table"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "cli.svs:" in captured.out and "onnx (exported graph)" in captured.out
