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
