"""`napari-dca train` under bad input and faults: one line and a non-zero exit for every mistake,
an existing checkpoint never replaced unless asked, the user's suffix kept, atomic and safely
loaded resume state, nothing written on an early cancel, divergence keeps the last good weights."""
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from napari_dca import cli

torch.set_num_threads(1)
FAST = ["--tile", "32", "--batch", "1", "--steps", "2", "--val-every", "2", "--width", "0.0625",
        "--no-dca", "--device", "cpu", "--threads", "1"]


def write_dataset(root, n=3, size=40, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        img = np.full((size, size, 3), 230, np.uint8)
        for j in range(1, 4):
            cy, cx = rng.integers(8, size - 8, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 25
            mask[disc], img[disc] = j, (90, 40, 140)
        iio.imwrite(root / "images" / f"img_{i}.png", img)
        iio.imwrite(root / "masks" / f"img_{i}.png", mask)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds") / "ds")


def train(*args):
    return cli.main(["train", *map(str, args)])


def one_line_error(capsys, *words):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and all(w in err[0] for w in words), err[0]
    return err[0]


@pytest.mark.parametrize("extra, words", [
    (["--arch", "resnet"], ["--arch", "unet"]), (["--model-kwargs", "{bad"], ["--model-kwargs", "JSON"]),
    (["--model-kwargs", "[1]"], ["JSON object"]), (["--val-every", "0"], ["--val-every"]),
    (["--batch", "0"], ["--batch"]), (["--tile", "1"], ["--tile"]), (["--tile", "100000"], ["--tile"]),
    (["--lr", "nan"], ["--lr"]), (["--threads", "-1"], ["--threads"]), (["--width", "50"], ["--width"]),
    (["--batch", "256", "--tile", "2048"], ["pixels per step"]), (["--steps", "0"], ["--steps"]),
    (["--model-kwargs", '{"patch_size": 0}'], ["patch_size"]),
])
def test_bad_options_are_one_line(data, tmp_path, capsys, extra, words):
    assert train(data, "-o", tmp_path / "m", *FAST, *extra) == 2
    one_line_error(capsys, *words)
    assert not list(tmp_path.iterdir())


def test_bad_datasets_are_one_line(tmp_path, capsys):
    assert train(tmp_path / "nope", "-o", tmp_path / "m", *FAST) == 2
    one_line_error(capsys, "no dataset folder")
    (tmp_path / "ds" / "images").mkdir(parents=True)
    assert train(tmp_path / "ds", "-o", tmp_path / "m", *FAST) == 2
    one_line_error(capsys, "no masks/")
    one = write_dataset(tmp_path / "one", n=1)
    assert train(one, "-o", tmp_path / "m", *FAST) == 2
    one_line_error(capsys, "at least 2")
    shapes = write_dataset(tmp_path / "shapes", n=2)
    iio.imwrite(shapes / "masks" / "img_0.png", np.zeros((10, 10), np.uint8))
    assert train(shapes, "-o", tmp_path / "m", *FAST) == 2
    one_line_error(capsys, "mask shape")


def test_unavailable_device_and_corrupt_init_are_one_line(data, tmp_path, capsys):
    if not torch.cuda.is_available():
        assert train(data, "-o", tmp_path / "m", *FAST, "--device", "cuda") == 2
        one_line_error(capsys, "cuda")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert train(data, "-o", tmp_path / "m", *FAST, "--init", bad) == 2
    one_line_error(capsys, "bad.safetensors")


def test_existing_output_is_refused_and_the_users_suffix_is_kept(data, tmp_path, capsys):
    theirs = tmp_path / "mymodel.safetensors"
    theirs.write_bytes(b"the user's model")
    assert train(data, "-o", tmp_path / "mymodel", *FAST) == 2
    one_line_error(capsys, "exists", "--overwrite")
    assert train(data, "-o", tmp_path / "mymodel.v2", *FAST) == 0
    assert (tmp_path / "mymodel.v2.safetensors").exists() and (tmp_path / "mymodel.v2.json").exists()
    assert theirs.read_bytes() == b"the user's model"
    capsys.readouterr()
    assert train(data, "-o", tmp_path / "mymodel.v2", *FAST) == 2
    one_line_error(capsys, "exists")
    assert train(data, "-o", tmp_path / "mymodel.v2", *FAST, "--overwrite") == 0


def test_resume_state_is_atomic_and_loaded_safely(data, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert train(data, "-o", out, *FAST) == 0
    state = tmp_path / "m.resume.pt"
    assert state.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    good = state.read_bytes()
    capsys.readouterr()
    state.write_bytes(good[: len(good) // 3])                      # truncated by a crash elsewhere
    assert train(data, "-o", out, *FAST, "--steps", "4", "--resume") == 2
    one_line_error(capsys, "m.resume.pt", "truncated")
    state.write_bytes(good)
    assert train(data, "-o", out, *FAST, "--width", "0.125", "--steps", "4", "--resume") == 2
    one_line_error(capsys, "another model")
    assert train(data, "-o", tmp_path / "fresh", *FAST, "--resume") == 2
    one_line_error(capsys, "to resume from")


def base_cfg(data, out, **kw):
    from src_models.train import TrainConfig
    return TrainConfig(**{**dict(data=str(data), out=str(out), model_kwargs={"dca": False, "width": 0.0625},
                                 tile_size=32, batch_size=1, steps=2, val_every=2, warmup_steps=1,
                                 device="cpu"), **kw})


def test_a_cancel_before_any_validation_writes_nothing(data, tmp_path):
    from src_models.train import train as train_engine
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"previous model")
    summary = train_engine(base_cfg(data, out, overwrite=True), cancel=lambda: True)
    assert summary["checkpoint"] is None and summary["stopped"] == "cancelled"
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(data, tmp_path):
    from src_models.checkpoints import load_checkpoint
    from src_models.train import TrainingDiverged, train as train_engine
    out = tmp_path / "m.safetensors"
    train_engine(base_cfg(data, out, steps=2, val_every=1))
    before = out.read_bytes()
    with pytest.raises(TrainingDiverged, match="kept"):
        train_engine(base_cfg(data, out, lr=1e6, steps=40, val_every=1, overwrite=True, warmup_steps=1))
    model, _ = load_checkpoint(out)          # whatever is on disk is finite and loadable
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
    fresh = tmp_path / "fresh.safetensors"
    with pytest.raises(TrainingDiverged, match="nothing was saved"):
        train_engine(base_cfg(data, fresh, lr=1e6, steps=40, val_every=39, warmup_steps=1))
    assert not fresh.exists()
    del before


def test_one_non_finite_loss_skips_its_step_and_training_goes_on(data, tmp_path, monkeypatch):
    import src_models.train as engine
    real, calls = engine.dice_ce_loss, []

    def once_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss
    monkeypatch.setattr(engine, "dice_ce_loss", once_nan)
    summary = engine.train(base_cfg(data, tmp_path / "m.safetensors"))
    assert summary["stopped"] == "steps" and summary["steps"] == 2 and len(calls) == 3
