"""Tiled inference: input kinds, blending, devices, progress, cancel, output targets."""
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

from src_models import build_model
from src_models import inference
from src_models.inference import (Cancelled, ModelRunner, axis_weights, image_layout, predict,
                                  predict_full, select_device, tile_starts)

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


class Pointwise(nn.Module):
    """1x1 convolution: receptive field of one pixel, so tiling cannot change its output."""

    def __init__(self, in_channels=3, classes=1):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(in_channels, classes, 1)
        self.config = {"in_channels": in_channels, "num_classes": classes}
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


class Constant(nn.Module):
    config = {"in_channels": 3}

    def forward(self, x):
        return torch.full((x.shape[0], 1, *x.shape[-2:]), 0.7).logit()


class CountingBatches(Pointwise):
    """Records batch sizes; raises a GPU-style out-of-memory error for batches above `limit`."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.sizes = limit, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return super().forward(x)


def rgb(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_model("unet", width=0.125).eval()


def test_rgb_uint8_tiled_equals_full_pass_for_pointwise_model():
    img = rgb(150, 200)
    out = predict(Pointwise(), img, tile_size=64, device="cpu")
    assert out.shape == (150, 200) and out.dtype == np.float32
    np.testing.assert_allclose(out, predict_full(Pointwise(), img), atol=1e-5)


@pytest.mark.parametrize("kind", ["rgba", "gray", "gray1", "uint16", "float01", "float255", "bool"])
def test_every_2d_input_kind_matches_its_full_pass(kind):
    base = rgb(90, 110)
    img = {"rgba": np.dstack([base, np.full(base.shape[:2], 7, np.uint8)]),
           "gray": base[..., 0], "gray1": base[..., :1],
           "uint16": base.astype(np.uint16) * 257,
           "float01": base.astype(np.float32) / 255,
           "float255": base.astype(np.float64) * 3.0 - 20.0,
           "bool": base[..., 0] > 128}[kind]
    out = predict(Pointwise(), img, tile_size=48)
    assert out.shape == (90, 110) and out.dtype == np.float32
    np.testing.assert_allclose(out, predict_full(Pointwise(), img), atol=1e-5)


def test_rgba_alpha_is_dropped():
    img = rgb(40, 50)
    rgba = np.dstack([img, RNG.integers(0, 256, img.shape[:2], dtype=np.uint8)])
    np.testing.assert_allclose(predict(Pointwise(), rgba, tile_size=32),
                               predict(Pointwise(), img, tile_size=32), atol=1e-6)


def test_uint16_scaled_like_uint8():
    img = rgb(40, 50)
    np.testing.assert_allclose(predict(Pointwise(), img.astype(np.uint16) * 257, tile_size=32),
                               predict(Pointwise(), img, tile_size=32), atol=1e-5)


def test_float_tiles_use_the_whole_images_intensity_range():
    img = rgb(60, 200).astype(np.float32) * 10
    img[:, :100] *= 0.1   # the left tiles alone have a much smaller range
    np.testing.assert_allclose(predict(Pointwise(), img, tile_size=32),
                               predict_full(Pointwise(), img), atol=1e-5)


def test_dask_and_zarr_inputs_read_lazily_and_match_numpy():
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    img = rgb(100, 130)
    ref = predict(Pointwise(), img, tile_size=48)
    d = da.from_array(img, chunks=(32, 32, 3))
    np.testing.assert_allclose(predict(Pointwise(), d, tile_size=48), ref, atol=1e-6)
    z = zarr.create_array(store={}, shape=img.shape, chunks=(32, 32, 3), dtype=img.dtype)
    z[:] = img
    np.testing.assert_allclose(predict(Pointwise(), z, tile_size=48), ref, atol=1e-6)


def test_lazy_input_is_never_read_whole():
    img = rgb(200, 200)

    class Spy:
        shape, dtype = img.shape, img.dtype
        largest = 0

        def __getitem__(self, key):
            block = img[key]
            Spy.largest = max(Spy.largest, block.shape[0] * block.shape[1])
            return block

    predict(Pointwise(), Spy(), tile_size=64)
    assert 0 < Spy.largest <= 64 * 64


def test_stack_is_segmented_plane_by_plane():
    stack = np.stack([rgb(50, 60) for _ in range(3)])
    out = predict(Pointwise(), stack, tile_size=32)
    assert out.shape == (3, 50, 60)
    for z in range(3):
        np.testing.assert_allclose(out[z], predict_full(Pointwise(), stack[z]), atol=1e-5)
    gray = stack[..., 0]
    assert predict(Pointwise(), gray, tile_size=32).shape == (3, 50, 60)


@pytest.mark.parametrize("shape", [(10,), (5, 6, 7, 8, 9), (20, 30, 2), (2, 20, 30, 5), (0, 10)])
def test_bad_shapes_raise_a_clear_error(shape):
    with pytest.raises(ValueError) as err:
        predict(Pointwise(), np.zeros(shape, np.uint8), tile_size=32)
    assert str(tuple(shape)) in str(err.value) and "(H, W)" in str(err.value)


def test_layout_reading():
    assert image_layout((100, 200)).channels is None
    assert image_layout((100, 200, 3)) == inference.ImageLayout(None, 100, 200, 3)
    assert image_layout((5, 100, 200)).planes == 5
    assert image_layout((5, 100, 200, 4)).channels == 4


def test_multiclass_gives_softmax_probabilities():
    out = predict(Pointwise(classes=3), rgb(70, 90), tile_size=32)
    assert out.shape == (3, 70, 90)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


def test_constant_model_gives_constant_output_at_every_overlap():
    for overlap, blend in [(0.25, "gaussian"), (0.5, "cosine"), (0.0, "gaussian"), (0.1, "constant")]:
        out = predict(Constant(), rgb(170, 230), tile_size=64, overlap=overlap, blend=blend)
        np.testing.assert_allclose(out, 0.7, atol=1e-5)


def test_blend_weights_sum_to_one():
    for length, tile, overlap in [(1000, 256, 0.25), (300, 64, 0.5), (64, 64, 0.25), (65, 64, 0.1)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == max(0, length - tile)
        total = np.zeros(max(length, tile))
        for s, w in zip(starts, axis_weights(length, tile, starts)):
            total[s:s + tile] += w
        np.testing.assert_allclose(total[:length], 1.0, atol=1e-6)


def test_no_seams_with_a_real_network(tiny_unet):
    """Blended tiled output varies no more across tile borders than elsewhere."""
    yy, xx = np.mgrid[:192, :192]
    img = (np.stack([np.sin(yy / 9.0), np.cos(xx / 7.0), np.sin((yy + xx) / 13.0)], -1) * 100 + 128)
    img = img.astype(np.uint8)
    out = predict(tiny_unet, img, tile_size=64, overlap=0.25)
    full = predict_full(tiny_unet, img)
    # Tiling changes a conv net's context but must not create steps at tile borders.
    grad = np.abs(np.diff(out, axis=1))
    borders = [s + 64 for s in tile_starts(192, 64, 0.25)[:-1]] + tile_starts(192, 64, 0.25)[1:]
    at_borders = max(grad[:, b - 1].mean() for b in borders)
    assert at_borders < 3 * grad.mean() + 1e-6
    assert np.abs(out - full).mean() < 0.1


def test_small_image_is_padded_to_a_tile(tiny_unet):
    img = rgb(20, 35)
    out = predict(tiny_unet, img, tile_size=64)
    assert out.shape == (20, 35) and np.isfinite(out).all()
    np.testing.assert_allclose(predict(Pointwise(), img, tile_size=64),
                               predict_full(Pointwise(), img), atol=1e-6)


def test_region_only_segments_the_window():
    img = rgb(200, 260)
    full = predict_full(Pointwise(), img)
    out = predict(Pointwise(), img, tile_size=64, region=(30, 110, 100, 250))
    assert out.shape == (80, 150)
    np.testing.assert_allclose(out, full[30:110, 100:250], atol=1e-5)
    with pytest.raises(ValueError, match="does not overlap"):
        predict(Pointwise(), img, tile_size=64, region=(300, 400, 0, 10))


def test_writes_into_preallocated_numpy_and_zarr_outputs():
    zarr = pytest.importorskip("zarr")
    img = rgb(100, 120)
    ref = predict(Pointwise(), img, tile_size=48)
    buf = np.full((100, 120), -1, np.float32)
    assert predict(Pointwise(), img, tile_size=48, out=buf) is buf
    np.testing.assert_allclose(buf, ref, atol=1e-6)
    z = zarr.create_array(store={}, shape=(100, 120), chunks=(48, 120), dtype="float32")
    predict(Pointwise(), img, tile_size=48, out=z)
    np.testing.assert_allclose(z[:], ref, atol=1e-6)
    with pytest.raises(ValueError, match="out has shape"):
        predict(Pointwise(), img, tile_size=48, out=np.zeros((10, 10), np.float32))


def test_progress_reports_every_batch_up_to_the_total():
    calls = []
    predict(Pointwise(), rgb(100, 100), tile_size=32, batch_size=3,
            progress=lambda done, total: calls.append((done, total)))
    total = len(tile_starts(100, 32, 0.25)) ** 2
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) == -(-total // 3)


def test_cancel_between_tiles_with_event_or_callable():
    event = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        if done >= 4:
            event.set()

    model = Pointwise()
    with pytest.raises(Cancelled):
        predict(model, rgb(200, 200), tile_size=32, batch_size=2, progress=progress, cancel=event,
                fuse=False)
    assert seen[-1] == 4 and model.calls == 2
    with pytest.raises(Cancelled):
        predict(Pointwise(), rgb(64, 64), tile_size=32, cancel=lambda: True)


def test_tta_is_exact_for_a_flip_equivariant_model():
    img = rgb(70, 80)
    np.testing.assert_allclose(predict(Pointwise(), img, tile_size=32, tta=True),
                               predict(Pointwise(), img, tile_size=32), atol=1e-5)


def test_conv_bn_fusion_keeps_outputs(tiny_unet):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tiny_unet.train()(x)  # move the BatchNorm statistics away from their init
        tiny_unet.eval()
        ref = tiny_unet(x)
        fused = inference.fuse_conv_bn(tiny_unet)(x)
    assert torch.allclose(ref, fused, atol=1e-4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny_unet.modules())  # original untouched


def test_card_supplies_tile_size_and_normalization():
    img = rgb(64, 64)
    card = {"tile_size": 32, "normalization": {"mean": [0.5] * 3, "std": [0.1] * 3}}
    calls = []
    predict(Pointwise(), img, card, overlap=0.0, progress=lambda d, t: calls.append(t))
    assert calls[-1] == 4
    a = predict(Pointwise(), img, card)
    b = predict(Pointwise(), img, tile_size=32)
    assert not np.allclose(a, b)
    np.testing.assert_allclose(a, predict_full(Pointwise(), img, card), atol=1e-5)



def test_card_overlap_sets_the_tiling_unless_one_is_given():
    # 110 px at 32-px tiles: 0.25 (the default) needs 5 tiles a side, 0.0 needs 4.
    img = rgb(110, 110)
    tiles = {}
    for name, card, overlap in (("default", {"tile_size": 32}, None),
                                ("card", {"tile_size": 32, "overlap": 0.0}, None),
                                ("given", {"tile_size": 32, "overlap": 0.0}, 0.25)):
        calls = []
        predict(Pointwise(), img, card, overlap=overlap, batch_size=64, progress=lambda d, t: calls.append(t))
        tiles[name] = calls[-1]
    assert tiles == {"default": 25, "card": 16, "given": 25}
    from src_models.card_schema import validate_card
    from src_models.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="overlap"):
        validate_card({"architecture": "unet", "model_kwargs": {}, "overlap": 0.95})


# ---- devices ---------------------------------------------------------------------------------

def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(inference, "_mps_available", lambda: True)
    assert select_device(None).type == "mps"
    monkeypatch.setattr(inference, "_mps_available", lambda: False)
    assert select_device("auto").type == "cpu"
    assert select_device("cpu").type == "cpu"


def test_unavailable_explicit_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(inference, "_mps_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA"):
        select_device("cuda")
    with pytest.raises(ValueError, match="MPS"):
        select_device("mps")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")


def test_out_of_memory_halves_the_batch_and_continues():
    model = CountingBatches(limit=2)
    img = rgb(100, 100)
    out = predict(model, img, tile_size=32, batch_size=8, fuse=False)
    np.testing.assert_allclose(out, predict_full(Pointwise(), img), atol=1e-5)
    assert model.sizes[:3] == [8, 4, 2] and max(model.sizes[3:]) <= 2


def test_out_of_memory_at_batch_one_moves_to_cpu(monkeypatch):
    runner = ModelRunner(CountingBatches(limit=0), torch.device("cpu"), max_batch=1, fuse=False,
                         precision="float32")
    runner.device = torch.device("cuda")  # pretend the model lives on a GPU that is full
    moved = []

    def fake_to_cpu():
        moved.append(True)
        runner.device = torch.device("cpu")
        runner.model = Pointwise()

    monkeypatch.setattr(runner, "to_cpu", fake_to_cpu)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)
    prob = runner(np.zeros((2, 3, 16, 16), np.float32))
    assert moved and prob.shape == (2, 1, 16, 16)


def test_out_of_memory_on_cpu_is_raised():
    runner = ModelRunner(CountingBatches(limit=0), torch.device("cpu"), max_batch=1, fuse=False)
    with pytest.raises(RuntimeError, match="out of memory"):
        runner(np.zeros((1, 3, 16, 16), np.float32))


def test_autocast_choice_per_device():
    assert isinstance(inference._autocast(torch.device("cpu"), "auto"),
                      type(inference.contextlib.nullcontext()))
    with pytest.raises(ValueError, match="precision"):
        inference._autocast(torch.device("cpu"), "int4")
    with inference._autocast(torch.device("cpu"), "bfloat16"):
        assert torch.is_autocast_cpu_enabled() or torch.is_autocast_enabled("cpu")



def test_big_tiffs_open_lazily_and_segment_like_numpy(tmp_path):
    import tifffile
    from src_models.image_io import read_image
    img = rgb(130, 150)
    tifffile.imwrite(tmp_path / "big.tif", img, tile=(32, 32))
    lazy = read_image(tmp_path / "big.tif", lazy=True)
    assert not isinstance(lazy, np.ndarray) and lazy.shape == img.shape
    np.testing.assert_allclose(predict(Pointwise(), lazy, tile_size=48),
                               predict(Pointwise(), img, tile_size=48), atol=1e-6)


def test_predict_reuses_its_runner_until_the_weights_or_settings_change(tiny_unet):
    """The Segment widget calls predict once per click: the model copy / BatchNorm folding is
    made once, and made again as soon as the weights change (fine-tuning steps in place)."""
    import copy
    model = copy.deepcopy(tiny_unet)   # its own weights: this test changes them
    image = np.random.default_rng(5).integers(0, 256, (90, 80, 3), dtype=np.uint8)
    card = {"tile_size": 64}
    first = predict(model, image, card, device="cpu")
    runner = inference._recent["runner"][1]
    np.testing.assert_array_equal(predict(model, image, card, device="cpu"), first)
    assert inference._recent["runner"][1] is runner
    predict(model, image, card, device="cpu", tta=True)           # other settings: another runner
    assert inference._recent["runner"][1] is not runner
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)                         # "fine-tuned" in place
    changed = predict(model, image, card, device="cpu")
    expected = predict(model, image, card, device="cpu",
                       runner=ModelRunner(model, torch.device("cpu")))
    np.testing.assert_array_equal(changed, expected)
    assert not np.array_equal(changed, first)


def test_normalize_gives_the_broadcast_formula_exactly_channel_first():
    from src_models.preprocess import DEFAULT_NORMALIZATION, normalize
    rng = np.random.default_rng(7)
    mean = np.asarray(DEFAULT_NORMALIZATION["mean"], np.float32)
    std = np.asarray(DEFAULT_NORMALIZATION["std"], np.float32)
    for shape in [(33, 70, 3), (16, 9, 1)]:
        x = rng.random(shape, dtype=np.float32)
        m, s = (mean, std) if shape[-1] == 3 else (mean.mean(dtype=np.float32), std.mean(dtype=np.float32))
        expected = ((x - m) / s).transpose(2, 0, 1)
        out = normalize(x, None)
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, expected)
