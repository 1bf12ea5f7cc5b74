"""`napari-dca segment` never loses or half-writes a file: names that cannot collide, no output over
an input, skip-or-overwrite, no symlink followed, resumable after kill -9, "N of M failed"."""
import os
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch

from napari_dca import cli

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from src_models import build_model
    from src_models.checkpoints import card_for, save_checkpoint
    torch.manual_seed(0)
    model = build_model("unet", width=0.125)
    card = card_for(model, task="nuclei", tile_size=64, instance_params={"min_size": 1})
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", card)


def rgb(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def segment(*args):
    return cli.main(["segment", *map(str, args), "--quiet", "--device", "cpu"])


def test_inputs_sharing_a_stem_write_separate_outputs(tiny_checkpoint, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    iio.imwrite(tmp_path / "a" / "x.png", rgb(seed=1))
    iio.imwrite(tmp_path / "a" / "x.jpg", rgb(seed=2))
    tifffile.imwrite(tmp_path / "b" / "x.tif", rgb(seed=3))
    out = tmp_path / "out"
    assert segment(tmp_path / "a", tmp_path / "b", "-o", out, "-c", tiny_checkpoint) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x.jpg.labels.tif", "x.png.labels.tif",
                                                      "x.tif.labels.tif"]


def test_two_inputs_that_would_write_one_output_are_refused_before_any_work(tiny_checkpoint,
                                                                            tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        iio.imwrite(tmp_path / folder / "x.png", rgb())
    out = tmp_path / "out"
    assert segment(tmp_path / "a", tmp_path / "b", "-o", out, "-c", tiny_checkpoint) == 2
    err = capsys.readouterr().err
    assert "would both write" in err and "Traceback" not in err
    assert not out.exists()


def test_existing_outputs_are_skipped_unless_overwrite(tiny_checkpoint, tmp_path, capsys):
    iio.imwrite(tmp_path / "x.png", rgb())
    out = tmp_path / "out"
    out.mkdir()
    users = out / "x.tif"                       # a user's own file with the input's stem
    users.write_bytes(b"user data")
    previous = out / "x.png.labels.tif"
    tifffile.imwrite(previous, np.full((3, 3), 7, np.uint8))
    assert segment(tmp_path / "x.png", "-o", out, "-c", tiny_checkpoint) == 0
    assert "already done" in capsys.readouterr().err
    assert tifffile.imread(previous).shape == (3, 3)
    assert segment(tmp_path / "x.png", "-o", out, "-c", tiny_checkpoint, "--overwrite") == 0
    assert tifffile.imread(previous).shape == (40, 50)
    assert users.read_bytes() == b"user data"


def test_only_missing_outputs_are_written_when_some_exist(tiny_checkpoint, tmp_path):
    iio.imwrite(tmp_path / "x.png", rgb())
    out = tmp_path / "out"
    assert segment(tmp_path / "x.png", "-o", out, "-c", tiny_checkpoint) == 0
    first = (out / "x.png.labels.tif").stat().st_mtime_ns
    assert segment(tmp_path / "x.png", "-o", out, "-c", tiny_checkpoint, "--save-prob") == 0
    assert (out / "x.png.prob.tif").exists()
    assert (out / "x.png.labels.tif").stat().st_mtime_ns == first


def test_a_symlink_at_an_output_path_is_not_followed(tiny_checkpoint, tmp_path, capsys):
    iio.imwrite(tmp_path / "x.png", rgb())
    outside = tmp_path / "precious.tif"
    outside.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png.labels.tif").symlink_to(outside)
    assert segment(tmp_path / "x.png", "-o", out, "-c", tiny_checkpoint, "--overwrite") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert outside.read_bytes() == b"precious"
    assert (out / "x.png.labels.tif").is_symlink()


def test_a_batch_reports_n_of_m_failed_and_exits_non_zero(tiny_checkpoint, tmp_path, capsys):
    iio.imwrite(tmp_path / "good.png", rgb())
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    assert segment(tmp_path, "-o", out, "-c", tiny_checkpoint) == 1
    err = capsys.readouterr().err
    assert "2 of 3 images failed" in err
    assert "empty.tif: failed: empty.tif: empty file" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["good.png.labels.tif"]


@pytest.mark.parametrize("option, value, message", [
    ("--threads", "-1", "--threads must be"), ("--batch-size", "0", "--batch-size must be"),
    ("--tile", "8", "--tile must be"), ("--tile", "100000", "--tile must be"),
    ("--overlap", "0.99", "--overlap must be"), ("--threshold", "nan", "--threshold must be"),
])
def test_size_options_are_bounded_with_a_reason(tiny_checkpoint, tmp_path, capsys, option, value,
                                                message):
    iio.imwrite(tmp_path / "x.png", rgb())
    assert segment(tmp_path / "x.png", "-o", tmp_path / "out", "-c", tiny_checkpoint,
                   option, value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "(" in err[0]


def test_output_folder_that_cannot_be_created_is_one_line(tiny_checkpoint, tmp_path, capsys):
    iio.imwrite(tmp_path / "x.png", rgb())
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert segment(tmp_path / "x.png", "-o", blocker / "sub", "-c", tiny_checkpoint) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output folder" in err[0]
    assert segment(tmp_path / "x.png", "-o", blocker, "-c", tiny_checkpoint) == 2
    assert "is a file" in capsys.readouterr().err


def test_debug_shows_the_traceback(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError):
        cli.main(["segment", str(tmp_path), "-o", str(tmp_path / "o"), "--threads", "-1", "--debug"])


KILL_SCRIPT = """
import sys, time
import src_models.image_io as io
real = io.write_labels
def slow(path, labels, **kw):
    import tifffile
    # Write slowly so that the kill can land in the middle of a write.
    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"II*\\x00")
            f.flush()
            time.sleep(0.4)
        tifffile.imwrite(tmp, labels.astype("uint16"), compression="zlib")
    return io.write_atomic(path, writer, overwrite=kw.get("overwrite", True))
io.write_labels = slow
from napari_dca import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_mid_batch_leaves_only_complete_files_and_a_rerun_resumes(tiny_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        iio.imwrite(inputs / f"img{i}.png", rgb(48, 56, seed=i))
    reference = tmp_path / "reference"
    assert segment(inputs, "-o", reference, "-c", tiny_checkpoint) == 0

    out = tmp_path / "out"
    script = tmp_path / "slow_segment.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(script), "segment", str(inputs), "-o", str(out), "-c",
           str(tiny_checkpoint), "--quiet", "--device", "cpu", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Kill while the third image's labels are being written (its partial file exists).
    while time.time() < deadline:
        partial = list(out.glob(".img2.png.labels.tif.*.partial")) if out.exists() else []
        if partial:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert partial, "the kill did not land during a write"
    finals = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert 0 < len(finals) < 6
    for name in finals:                          # every file under a final name is complete
        np.testing.assert_array_equal(tifffile.imread(out / name), tifffile.imread(reference / name))

    assert segment(inputs, "-o", out, "-c", tiny_checkpoint) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in reference.iterdir())   # stale partials removed too
    for name in names:
        np.testing.assert_array_equal(tifffile.imread(out / name), tifffile.imread(reference / name))


def test_evaluate_scores_segment_outputs_by_their_source_name(tiny_checkpoint, tmp_path):
    from src_models.evaluate import match_files
    (tmp_path / "masks").mkdir()
    (tmp_path / "pred").mkdir()
    iio.imwrite(tmp_path / "masks" / "x.png", np.zeros((4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "pred" / "x.png.labels.tif", np.zeros((4, 4), np.uint8))
    [(name, pred, mask)] = match_files(tmp_path / "pred", tmp_path / "masks")
    assert name == "x" and pred.name == "x.png.labels.tif"
