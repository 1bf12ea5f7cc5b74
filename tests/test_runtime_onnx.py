"""The exported-graph runtime: same outputs as torch, cached by content, falls back with a notice.

One export of a tiny model (~20 s of CPU) is shared by the module; the bundled models' exports are
marked slow. The cache folder is a temporary one (NAPARI_DCA_CACHE)."""
import warnings

import numpy as np
import pytest
import torch

from src_models import build_model, runtime_onnx
from src_models.inference import ModelRunner, predict

pytestmark = pytest.mark.skipif(
    not (runtime_onnx.runtime_available() and runtime_onnx.exporter_available()),
    reason=f"exported-graph runtime not installed ({runtime_onnx.INSTALL_HINT})")

TILE = 64
RNG = np.random.default_rng(3)
# OpenVINO runs the same exported file (an optional extra: its tests skip without it)
needs_openvino = pytest.mark.skipif(not runtime_onnx.openvino_available(),
                                    reason=f"OpenVINO not installed ({runtime_onnx.OPENVINO_HINT})")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(runtime_onnx.CACHE_ENV, str(folder))
        yield folder / "onnx"


@pytest.fixture(scope="module")
def tiny(cache):
    """A tiny DCA-U-Net, with its graph exported once for TILE x TILE inputs."""
    torch.manual_seed(0)
    model = build_model("unet", width=0.0625, patch_size=16).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding them is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    runner = ModelRunner(model, torch.device("cpu"), runtime="onnx")
    runner(RNG.normal(size=(1, 3, TILE, TILE)).astype(np.float32))
    assert runner.uses_graph
    return model


def rgb(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_graph_matches_torch_through_predict_on_tiled_and_smaller_than_tile_images(tiny, cache):
    card = {"tile_size": TILE}
    for shape in [(150, 130), (40, 50)]:  # several tiles with a ragged last batch; one padded tile
        image = rgb(*shape)
        fast = predict(tiny, image, card, device="cpu", batch_size=3, runtime="onnx")
        slow = predict(tiny, image, card, device="cpu", batch_size=3, runtime="torch")
        assert fast.shape == shape
        assert np.abs(fast - slow).max() <= 1e-4
    tta = predict(tiny, rgb(70, 70), card, device="cpu", tta=True, runtime="onnx")
    assert tta.shape == (70, 70)
    left = [p.suffix for p in cache.iterdir() if p.is_file() and p.name != runtime_onnx.LOCK_NAME]
    assert left == [".onnx"]  # one graph, no temporary file left


@pytest.fixture
def fresh_process(monkeypatch):
    """As if in a new process: no graph opened and probed yet (the cache folder stays)."""
    monkeypatch.setattr(runtime_onnx, "_checked_sessions", {})


def test_batches_side_by_side_give_the_same_output_in_order(tiny):
    """graph_workers > 1: batches run on a pool, results come back in their order, equal to one
    batch at a time with the same ONNX Runtime threads per batch."""
    one = ModelRunner(tiny, torch.device("cpu"), runtime="onnx", graph_workers=1)
    pool = ModelRunner(tiny, torch.device("cpu"), runtime="onnx", graph_workers=1)
    pool.graph_workers = 3   # as thread_plan gives on a machine with 3+ threads
    assert pool.graph_threads == one.graph_threads
    image = rgb(200, 170)
    card = {"tile_size": TILE}
    expected = predict(tiny, image, card, batch_size=2, runner=one)
    np.testing.assert_array_equal(predict(tiny, image, card, batch_size=2, runner=pool), expected)
    batches = [(i, RNG.normal(size=(2, 3, TILE, TILE)).astype(np.float32)) for i in range(7)]
    out = list(pool.run_batches(iter(batches)))
    assert [tag for tag, _ in out] == list(range(7))
    for (_, batch), (_, prob) in zip(batches, out):
        np.testing.assert_array_equal(prob, one(batch))
    assert runtime_onnx.thread_plan(2, 2) == (2, 1) and runtime_onnx.thread_plan(1, 2) == (1, 1)
    assert runtime_onnx.thread_plan(4, 1) == (1, 4)


def test_cache_is_reused_and_a_new_tile_size_or_new_weights_get_a_new_entry(tiny, cache, monkeypatch,
                                                                             fresh_process):
    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the graph is cached")

    monkeypatch.setattr(runtime_onnx, "export_graph", no_export)
    runner = ModelRunner(tiny, torch.device("cpu"), runtime="onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback notice either
        runner(RNG.normal(size=(2, 3, TILE, TILE)).astype(np.float32))
    assert runner.uses_graph

    key = runtime_onnx.key_for_model(tiny, (3, TILE, TILE))
    assert runtime_onnx.key_for_model(tiny, (3, TILE, TILE)) == key
    assert runtime_onnx.key_for_model(tiny, (3, 2 * TILE, 2 * TILE)) != key
    tuned = build_model("unet", width=0.0625, patch_size=16).eval()
    tuned.load_state_dict(tiny.state_dict())
    assert runtime_onnx.key_for_model(tuned, (3, TILE, TILE)) == key  # same content, same key
    with torch.no_grad():
        next(tuned.parameters()).add_(1e-3)  # "fine-tuned": new weights
    assert runtime_onnx.key_for_model(tuned, (3, TILE, TILE)) != key


def test_a_failing_export_falls_back_to_torch_with_one_notice(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded\nsecond line of a long trace")

    monkeypatch.setattr(runtime_onnx, "export_graph", broken)
    torch.manual_seed(1)
    fresh = build_model("unet", width=0.0625, patch_size=16).eval()  # not in the cache
    batch = RNG.normal(size=(2, 3, TILE, TILE)).astype(np.float32)
    runner = ModelRunner(fresh, torch.device("cpu"), runtime="onnx")
    with pytest.warns(runtime_onnx.RuntimeFallbackWarning) as record:
        out = runner(batch)
        runner(batch)  # the failure is remembered: no second export, no second notice
    assert len(record) == 1
    message = str(record[0].message)
    assert "exporter exploded" in message and "\n" not in message and "PyTorch" in message
    assert not runner.uses_graph
    reference = ModelRunner(fresh, torch.device("cpu"), runtime="torch")(batch)
    np.testing.assert_allclose(out, reference, atol=1e-6)


@pytest.mark.parametrize("runtime", ["onnx", pytest.param("openvino", marks=needs_openvino)])
def test_a_graph_that_disagrees_with_torch_is_not_used(tiny, monkeypatch, fresh_process, runtime):
    monkeypatch.setattr(runtime_onnx, "max_difference", lambda *a: 3e-3)
    runner = ModelRunner(tiny, torch.device("cpu"), runtime=runtime)
    with pytest.warns(runtime_onnx.RuntimeFallbackWarning, match="disagrees"):
        runner(RNG.normal(size=(1, 3, TILE, TILE)).astype(np.float32))
    assert not runner.uses_graph


def test_segment_command_with_runtime_onnx_gives_the_labels_of_torch(tiny, tmp_path, monkeypatch,
                                                                     capsys):
    import imageio.v3 as iio
    import tifffile

    from napari_dca import cli
    from src_models.checkpoints import card_for, save_checkpoint
    card = card_for(tiny, task="nuclei", tile_size=TILE, instance_params={"min_size": 1})
    checkpoint = save_checkpoint(tiny, tmp_path / "tiny.safetensors", card)
    iio.imwrite(tmp_path / "a.png", rgb(90, 110))
    monkeypatch.setattr(runtime_onnx, "export_graph", None)  # the graph of these weights is cached
    labels = {}
    for runtime in ("onnx", "torch"):
        out = tmp_path / runtime
        assert cli.main(["segment", str(tmp_path / "a.png"), "-o", str(out), "-c", str(checkpoint),
                         "--runtime", runtime, "--quiet"]) == 0
        (found,) = [p for p in out.iterdir() if p.suffix == ".tif"]
        labels[runtime] = tifffile.imread(found)
    assert "warning" not in capsys.readouterr().err  # no fallback: the cached graph ran
    assert np.mean((labels["onnx"] > 0) == (labels["torch"] > 0)) > 0.999


FAST_START_PROCESS = """
import sys
from napari_dca import cli
code = cli.main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


def test_segment_with_a_cached_graph_starts_without_torch_and_gives_the_same_labels(tiny, tmp_path,
                                                                                    monkeypatch):
    import json
    import os
    import subprocess
    import sys

    import imageio.v3 as iio
    import tifffile

    from napari_dca import cli
    from src_models import runtime_cached
    from src_models.checkpoints import card_for, save_checkpoint
    card = card_for(tiny, task="nuclei", tile_size=TILE, instance_params={"min_size": 1})
    checkpoint = save_checkpoint(tiny, tmp_path / "tiny.safetensors", card)
    iio.imwrite(tmp_path / "a.png", rgb(150, 140))
    monkeypatch.setattr(runtime_onnx, "export_graph", None)  # the graph of these weights is cached

    def segment(out, fresh_process):
        args = ["segment", str(tmp_path / "a.png"), "-o", str(tmp_path / out), "-c",
                str(checkpoint), "--runtime", "onnx", "--threads", "2", "--quiet"]
        if fresh_process:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            done = subprocess.run([sys.executable, "-c", FAST_START_PROCESS, *args], env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            return done.stdout, tifffile.imread(tmp_path / out / "a.png.labels.tif")
        assert cli.main(args) == 0
        return "", tifffile.imread(tmp_path / out / "a.png.labels.tif")

    runtime_cached._opened.clear()
    assert runtime_cached.find(checkpoint) is None      # not recorded yet: the first run loads torch
    _, by_torch_path = segment("first", fresh_process=False)
    cached = runtime_cached.find(checkpoint)
    assert cached is not None and cached.card["tile_size"] == TILE
    assert cached.runner((3, TILE, TILE), threads=2) is not None
    assert cached.runner((3, 2 * TILE, 2 * TILE), threads=2) is None   # no graph for that size
    stdout, fast = segment("second", fresh_process=True)
    assert "torch imported: False" in stdout
    np.testing.assert_array_equal(fast, by_torch_path)
    assert by_torch_path.max() > 0

    # another checkpoint file (same weights, another card) is not found; a graph file that is not
    # the one that was probed is not used
    other = save_checkpoint(tiny, tmp_path / "other.safetensors",
                            card_for(tiny, task="glands", tile_size=TILE))
    assert runtime_cached.find(other) is None
    index = runtime_cached._index_path(runtime_cached.checkpoint_digest(checkpoint))
    entry = json.loads(index.read_text())
    entry["graphs"][f"3x{TILE}x{TILE}"]["sha256"] = "0" * 64
    index.write_text(json.dumps(entry))
    runtime_cached._opened.clear()
    assert runtime_cached.find(checkpoint).runner((3, TILE, TILE), threads=2) is None


EXPORTER_PROCESS = """
import json, sys, time
from pathlib import Path
import torch
from src_models import build_model, runtime_onnx
torch.manual_seed(0)
model = build_model("unet", width=0.0625, patch_size=16).eval()
ready = Path(sys.argv[1])
(ready / sys.argv[2]).touch()
while len(list(ready.iterdir())) < 2:  # both processes ask for the graph at the same moment
    time.sleep(0.01)
graph = runtime_onnx.graph_for(model, (3, 32, 32), threads=1)
batch = runtime_onnx.probe_batch((3, 32, 32), batch=3, seed=5)
print(json.dumps({"exported": graph.exported,
                  "diff": runtime_onnx.max_difference(model, graph, batch)}))
"""


@pytest.mark.slow
def test_two_processes_asking_for_the_same_graph_at_once_export_it_once(tmp_path):
    import json
    import os
    import subprocess
    import sys
    (tmp_path / "ready").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", **{runtime_onnx.CACHE_ENV: str(tmp_path / "c")})
    procs = [subprocess.Popen([sys.executable, "-c", EXPORTER_PROCESS, str(tmp_path / "ready"),
                               str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["exported"] for r in results) == [False, True]   # one export
    assert all(r["diff"] <= 1e-4 for r in results)                   # both run a correct graph
    files = [p.name for p in (tmp_path / "c" / "onnx").iterdir()]
    assert len([f for f in files if f.endswith(".onnx")]) == 1
    assert not [f for f in files if f.endswith(".partial")]


def test_runtime_choice_auto_torch_onnx(monkeypatch):
    assert runtime_onnx.resolve_runtime("auto", "cpu") == "onnx"
    assert runtime_onnx.resolve_runtime("auto", "cuda") == "torch"
    assert runtime_onnx.resolve_runtime("auto", "mps") == "torch"
    assert runtime_onnx.resolve_runtime("auto", "cpu", "bfloat16") == "torch"
    assert runtime_onnx.resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="CPU"):
        runtime_onnx.resolve_runtime("onnx", "cuda")
    with pytest.raises(ValueError, match="unknown runtime"):
        runtime_onnx.resolve_runtime("tensorrt", "cpu")
    monkeypatch.setattr(runtime_onnx, "runtime_available", lambda: False)
    assert runtime_onnx.resolve_runtime("auto", "cpu") == "torch"  # absent: quietly torch
    with pytest.raises(ValueError, match="pip install"):
        runtime_onnx.resolve_runtime("onnx", "cpu")
    monkeypatch.setenv(runtime_onnx.RUNTIME_ENV, "onnx")
    assert runtime_onnx.default_runtime() == "onnx"


def test_cache_folder_is_the_users_not_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv(runtime_onnx.CACHE_ENV, str(tmp_path))
    assert runtime_onnx.cache_dir() == tmp_path / "onnx"
    monkeypatch.delenv(runtime_onnx.CACHE_ENV)
    folder = runtime_onnx.cache_dir()
    assert "site-packages" not in str(folder) and "napari-dca" in str(folder)


def test_checkpoint_index_lives_beside_the_graphs_unless_moved(monkeypatch, tmp_path):
    from src_models import runtime_cached
    monkeypatch.setenv(runtime_onnx.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(runtime_cached.INDEX_ENV)
    assert runtime_cached.index_dir() == tmp_path / "cache" / "onnx" / "checkpoints"
    monkeypatch.setenv(runtime_cached.INDEX_ENV, str(tmp_path / "index"))
    assert runtime_cached.index_dir() == tmp_path / "index"
    assert runtime_onnx.cache_dir() == tmp_path / "cache" / "onnx"   # the graphs stay put


def test_probabilities_match_torch():
    logits = RNG.normal(0, 30, size=(2, 1, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(runtime_onnx.probabilities(logits),
                               torch.sigmoid(torch.from_numpy(logits)).numpy(), atol=1e-6)
    logits = RNG.normal(0, 30, size=(2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(runtime_onnx.probabilities(logits),
                               torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nuclei", "glands"])
def test_bundled_models_graph_matches_torch(name, cache):
    from src_models.checkpoints import load_checkpoint
    model, card = load_checkpoint(name)
    image = rgb(card.tile_size + 40, 90)
    fast = predict(model, image, card, device="cpu", runtime="onnx")
    slow = predict(model, image, card, device="cpu", runtime="torch")
    assert np.abs(fast - slow).max() <= 1e-4


# ----------------------------------------------------------------------------------------------
# OpenVINO on the same exported file (an optional extra: skipped without it)
# ----------------------------------------------------------------------------------------------


@needs_openvino
def test_openvino_runs_the_cached_graph_with_torchs_outputs(tiny, fresh_process):
    """The same cached file (no second export), probed and run by OpenVINO: predict's output
    within the probe's 1e-4 of torch, two streams side by side giving one-at-a-time's output."""
    card = {"tile_size": TILE}
    image = rgb(150, 130)   # several tiles, a ragged last batch
    runners = {w: ModelRunner(tiny, torch.device("cpu"), runtime="openvino", graph_workers=w)
               for w in (1, 2)}
    runners[2].graph_workers, runners[2].graph_threads = 2, 1   # as on a 2-thread machine
    slow = predict(tiny, image, card, device="cpu", batch_size=3, runtime="torch")
    outs = {w: predict(tiny, image, card, batch_size=3, runner=r) for w, r in runners.items()}
    for w, runner in runners.items():
        (graph,) = runner.graphs.values()
        assert isinstance(graph.session, runtime_onnx.OpenVINOSession)
        assert not graph.exported   # the file the onnx tests exported
        assert np.abs(outs[w] - slow).max() <= 1e-4
    np.testing.assert_allclose(outs[2], outs[1], atol=1e-6)


def test_runtime_choice_openvino(monkeypatch):
    monkeypatch.setattr(runtime_onnx, "openvino_available", lambda: True)
    assert runtime_onnx.resolve_runtime("openvino", "cpu") == "openvino"
    assert runtime_onnx.resolve_runtime("auto", "cpu") == "onnx"   # auto stays ONNX Runtime
    with pytest.raises(ValueError, match="CPU"):
        runtime_onnx.resolve_runtime("openvino", "cuda")
    with pytest.raises(ValueError, match="float32"):
        runtime_onnx.resolve_runtime("openvino", "cpu", "bfloat16")
    monkeypatch.setattr(runtime_onnx, "openvino_available", lambda: False)
    with pytest.raises(ValueError, match="pip install"):
        runtime_onnx.resolve_runtime("openvino", "cpu")


@needs_openvino
def test_segment_runtime_openvino_fast_start_gives_the_labels_of_the_torch_path(tiny, tmp_path,
                                                                               monkeypatch):
    """`segment --runtime openvino`: the first run loads torch and records the graph; the next
    one runs it in OpenVINO without torch's runner (the fast start), with the same labels."""
    import imageio.v3 as iio
    import tifffile

    from napari_dca import _cli_segment, cli
    from src_models import runtime_cached
    from src_models.checkpoints import card_for, save_checkpoint
    card = card_for(tiny, task="nuclei", tile_size=TILE, instance_params={"min_size": 1})
    checkpoint = save_checkpoint(tiny, tmp_path / "tiny.safetensors", card)
    iio.imwrite(tmp_path / "a.png", rgb(150, 140))
    monkeypatch.setattr(runtime_onnx, "export_graph", None)  # the graph of these weights is cached
    runtime_cached._opened.clear()
    labels = {}
    for run in ("first", "second"):
        loaded = []
        monkeypatch.setattr(_cli_segment._Engine, "load_torch",
                            lambda self, real=_cli_segment._Engine.load_torch:
                            (loaded.append(True), real(self))[1])
        assert cli.main(["segment", str(tmp_path / "a.png"), "-o", str(tmp_path / run), "-c",
                         str(checkpoint), "--runtime", "openvino", "--threads", "2",
                         "--quiet"]) == 0
        labels[run] = tifffile.imread(tmp_path / run / "a.png.labels.tif")
        assert bool(loaded) == (run == "first")
    np.testing.assert_array_equal(labels["second"], labels["first"])
    assert labels["first"].max() > 0
    runner = runtime_cached.find(checkpoint).runner((3, TILE, TILE), threads=2, runtime="openvino")
    assert runner.runtime == "openvino"
    assert isinstance(runner.graph.session, runtime_onnx.OpenVINOSession)
