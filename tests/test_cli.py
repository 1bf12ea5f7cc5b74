"""`napari-dca` command line: help texts, subcommand plumbing, segment end to end with a tiny model."""
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


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    import imageio.v3 as iio
    iio.imwrite(folder / "a.png", rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    tifffile.imwrite(folder / "b.tif", rng.integers(0, 256, (50, 60), dtype=np.uint16))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_help_lists_segment_and_each_subcommand_has_complete_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "segment" in text
    import argparse
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert parser.description, f"`napari-dca {name} --help` has no description"
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--device", "--tile", "--overlap", "--tta", "--save-prob",
                   "--threshold", "--min-size", "OUTDIR"):
        assert option in text


def test_subcommands_plug_in_from_the_list(monkeypatch):
    import types
    import sys
    mod = types.ModuleType("napari_dca._cli_hello")
    mod.add_parser = lambda sub: sub.add_parser("hello", help="say hello")
    mod.run = lambda args: 7
    monkeypatch.setitem(sys.modules, "napari_dca._cli_hello", mod)
    monkeypatch.setattr(cli, "_available", lambda name: name in sys.modules or
                        name == "napari_dca._cli_segment")
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["napari_dca._cli_segment", "napari_dca._cli_hello",
                                             "napari_dca._cli_missing"])
    assert cli.main(["hello"]) == 7
    assert cli.main([]) == 2


def test_segment_writes_labels_and_probabilities(tiny_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["segment", str(images), "-o", str(out), "--checkpoint", str(tiny_checkpoint),
                     "--device", "cpu", "--save-prob", "--quiet", "--threshold", "0.5"])
    assert code == 0
    a = tifffile.imread(out / "a.png.labels.tif")
    b = tifffile.imread(out / "b.tif.labels.tif")
    assert a.shape == (70, 90) and b.shape == (50, 60)
    assert np.issubdtype(a.dtype, np.unsignedinteger)
    prob = tifffile.imread(out / "a.png.prob.tif")
    assert prob.shape == (70, 90) and prob.dtype == np.float32
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert len(lines) == 2 and all(" s -> " in l and "object" in l for l in lines)


def test_segment_reports_missing_inputs_and_checkpoints(tiny_checkpoint, tmp_path, capsys):
    assert cli.main(["segment", str(tmp_path / "nope.png"), "-o", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    img = tmp_path / "x.png"
    import imageio.v3 as iio
    iio.imwrite(img, np.zeros((20, 20, 3), np.uint8))
    assert cli.main(["segment", str(img), "-o", str(tmp_path / "o"), "-c",
                     str(tmp_path / "missing.safetensors")]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_segment_into_the_input_folder_keeps_every_input(tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "c.tif"
    original = np.arange(20 * 20 * 3, dtype=np.uint16).reshape(20, 20, 3)
    tifffile.imwrite(src, original)
    import imageio.v3 as iio
    iio.imwrite(tmp_path / "c.png", np.zeros((20, 20, 3), np.uint8))
    assert cli.main(["segment", str(tmp_path), "-o", str(tmp_path), "-c", str(tiny_checkpoint),
                     "--quiet"]) == 0
    np.testing.assert_array_equal(tifffile.imread(src), original)
    assert (tmp_path / "c.tif.labels.tif").exists() and (tmp_path / "c.png.labels.tif").exists()
    # A rerun does not take its own outputs for inputs, and skips what is done.
    capsys.readouterr()
    assert cli.main(["segment", str(tmp_path), "-o", str(tmp_path), "-c", str(tiny_checkpoint),
                     "--quiet"]) == 0
    assert "already segmented" in capsys.readouterr().err


def test_evaluate_mistakes_are_one_line(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert cli.main(["evaluate", "-c", str(tiny_checkpoint), "--images", str(tmp_path / "images"),
                     "--masks", str(tmp_path / "nomasks"), "-o", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nomasks" in err[0]
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert cli.main(["evaluate", "-c", str(empty), "--images", str(tmp_path / "images"),
                     "--masks", str(tmp_path / "images"), "-o", str(tmp_path / "ev")]) == 2
    assert "empty file" in capsys.readouterr().err
    assert cli.main(["evaluate", "-c", str(tiny_checkpoint), "--images", str(tmp_path / "images"),
                     "--masks", str(tmp_path / "images"), "-o", str(tmp_path / "ev"),
                     "--overlap", "0.95"]) == 2
    assert "--overlap" in capsys.readouterr().err


def test_evaluate_passes_the_tile_overlap_to_predict(tiny_checkpoint, tmp_path, monkeypatch):
    import imageio.v3 as iio
    from src_models import evaluate
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "x.tif", np.zeros((40, 40), np.uint8))
    iio.imwrite(tmp_path / "masks" / "x.png", np.zeros((40, 40), np.uint8))
    seen = []
    real = evaluate.evaluate_folder
    monkeypatch.setattr(evaluate, "evaluate_folder",
                        lambda *a, **k: seen.append(k["predict_kwargs"]["overlap"]) or real(*a, **k))
    assert cli.main(["evaluate", "-c", str(tiny_checkpoint), "--images", str(tmp_path / "images"),
                     "--masks", str(tmp_path / "masks"), "-o", str(tmp_path / "ev"), "--device", "cpu",
                     "--overlap", "0.5"]) == 0
    assert seen == [0.5]


def test_evaluate_save_labels_into_the_image_folder_keeps_the_images(tiny_checkpoint, tmp_path):
    import imageio.v3 as iio
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "images" / "x.tif", image)
    iio.imwrite(tmp_path / "masks" / "x.png", np.zeros((40, 40), np.uint8))
    assert cli.main(["evaluate", "-c", str(tiny_checkpoint), "--images", str(tmp_path / "images"),
                     "--masks", str(tmp_path / "masks"), "-o", str(tmp_path / "ev"), "--device", "cpu",
                     "--save-labels", str(tmp_path / "images")]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "images" / "x.tif"), image)
    assert (tmp_path / "images" / "x.tif.labels.tif").exists()
