"""`napari-dca segment` on a slide: the slide pipeline's outputs, one summary line, a rerun skips it;
plain images in the same call still go the ordinary way."""
import imageio.v3 as iio
import numpy as np

import test_slide_pipeline as pipe
from napari_dca import _cli_segment, cli
from src_models.testing.make_slide import make_slide


def test_segment_cli_runs_slides_through_the_slide_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_cli_segment, "load_model",
                        lambda checkpoint, device: (pipe.DarkIsForeground(), pipe.CARD))
    folder = tmp_path / "in"
    folder.mkdir()
    make_slide(folder / "case.svs", (512, 768), seed=5, islands=2)
    iio.imwrite(folder / "plain.png", np.full((40, 50, 3), 200, np.uint8))
    out = tmp_path / "out"
    code = cli.main(["segment", str(folder), "-o", str(out), "--chunk", "256", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "case.svs.labels.ome.zarr").is_dir()
    assert (out / "case.svs.objects.geojson").is_file() and (out / "case.svs.objects.csv").is_file()
    assert (out / "plain.png.labels.tif").is_file()
    assert "case.svs:" in captured.out and "objects, tissue" in captured.out
    assert not any(p.name.startswith(".") for p in out.iterdir())   # no work folder left
    code = cli.main(["segment", str(folder / "case.svs"), "-o", str(out), "--quiet"])
    assert code == 0 and "already done" in capsys.readouterr().err


def test_batch_report_prints_each_slide_and_the_time_left(capsys):
    from napari_dca._cli_slides import BatchReport
    from src_models.slide.cluster import SlideOutcome
    now = [100.0]
    report = BatchReport(3, clock=lambda: now[0])
    now[0] = 110.0
    assert report(SlideOutcome("a.svs", "done", "a.svs: 5 objects")) == \
        "1 of 3 slides finished, ~20 s left"
    now[0] = 120.0
    assert report(SlideOutcome("b.svs", "failed", "b.svs: failed: bad file")) == \
        "2 of 3 slides finished, ~10 s left"
    assert report(SlideOutcome("c.svs", "done", "c.svs: 7 objects")) is None   # nothing left
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["a.svs: 5 objects", "c.svs: 7 objects"]
    assert "b.svs: failed: bad file" in captured.err and "~10 s left" in captured.err


def test_one_slide_on_several_workers_goes_to_dask_with_chunk_tasks(tmp_path, monkeypatch, capsys):
    from src_models.slide import cluster
    monkeypatch.setattr(_cli_segment, "load_model",
                        lambda checkpoint, device: (pipe.DarkIsForeground(), pipe.CARD))
    slide, _ = make_slide(tmp_path / "one.svs", (512, 512), seed=6, islands=1)
    seen = {}

    def fake_run_slides(slides, out, checkpoint, options, **kw):
        seen.update(kw, slides=slides)
        return [cluster.SlideOutcome(slides[0], "done", "one.svs: 1 objects")]
    monkeypatch.setattr(cluster, "run_slides", fake_run_slides)
    code = cli.main(["segment", str(slide), "-o", str(tmp_path / "out"), "--workers", "2",
                     "--chunk-tasks-above", "0", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert seen["workers"] == 2 and seen["chunk_tasks_above"] == 0 and len(seen["slides"]) == 1
    assert cli.main(["segment", str(slide), "-o", str(tmp_path / "out"), "--workers", "2",
                     "--chunk-tasks-above", "-1"]) == 2
