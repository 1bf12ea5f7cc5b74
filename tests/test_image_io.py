"""Reading images: lazy by decoded size, planar RGB as RGB, real intensity ranges (12-bit,
negative, NaN/inf), empty files named as such; writers are atomic."""
import warnings

import numpy as np
import pytest
import tifffile
import torch

from src_models.image_io import read_image, tiff_value_range, write_labels
from src_models.inference import intensity_range, predict

torch.set_num_threads(1)


class Pointwise(torch.nn.Module):
    """Probability = the mean of the normalised input channels, through a sigmoid: sees brightness."""
    config = {"in_channels": 3, "num_classes": 1}

    def forward(self, x):
        return x.mean(1, keepdim=True)


def test_laziness_is_decided_by_decoded_size_not_file_size(tmp_path, monkeypatch):
    import src_models.image_io as io
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.zeros((2000, 2000), np.uint8), compression="zlib")
    assert path.stat().st_size < 100_000
    monkeypatch.setattr(io, "LAZY_BYTES", 1_000_000)       # 4 MB decoded > 1 MB
    image = read_image(path)
    assert not isinstance(image, np.ndarray) and image.shape == (2000, 2000)
    assert np.asarray(image[0:10, 0:10]).shape == (10, 10)


def test_planar_rgb_tiff_is_read_as_rgb_eager_and_lazy(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(path, lazy=False), rgb)
    lazy = read_image(path, lazy=True)
    assert lazy.shape == (30, 40, 3)
    np.testing.assert_array_equal(lazy[(slice(5, 9), slice(2, 7))], rgb[5:9, 2:7])
    np.testing.assert_allclose(predict(Pointwise(), lazy, tile_size=32),
                               predict(Pointwise(), rgb, tile_size=32), atol=1e-6)


def test_empty_and_truncated_files_say_so(tmp_path):
    empty = tmp_path / "e.tif"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        read_image(empty)
    truncated = tmp_path / "t.png"
    truncated.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="t.png: cannot read"):
        read_image(truncated)


def test_12_bit_data_in_16_bit_tiff_uses_its_real_range(tmp_path):
    img8 = np.random.default_rng(1).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    img12 = (img8.astype(np.uint32) * 4095 // 255).astype(np.uint16)
    with pytest.warns(RuntimeWarning, match="12 bits"):
        assert intensity_range(img12) == (0.0, 4095.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p12 = predict(Pointwise(), img12, tile_size=32)
    np.testing.assert_allclose(p12, predict(Pointwise(), img8, tile_size=32), atol=2e-3)
    # A TIFF that says so in its tags: the tags win over the data.
    path = tmp_path / "12bit.tif"
    tifffile.imwrite(path, img12 // 4, extratags=[(281, "H", 1, 4095, True)])  # MaxSampleValue
    assert tiff_value_range(path) == (0.0, 4095.0)
    full = np.full((4, 4), 60000, np.uint16)
    assert intensity_range(full) is None


def test_negative_int16_is_scaled_by_its_range():
    img = np.linspace(-1000, 1000, 40 * 40 * 3).reshape(40, 40, 3).astype(np.int16)
    with pytest.warns(RuntimeWarning, match="negative"):
        lo, hi = intensity_range(img)
    assert (lo, hi) == (-1000.0, 1000.0)


def test_nan_and_inf_pixels_are_replaced_with_a_warning_not_spread():
    rng = np.random.default_rng(2)
    img = rng.random((64, 64, 3)).astype(np.float32) * 200
    clean = predict(Pointwise(), img, tile_size=32)
    bad = img.copy()
    bad[10:20, 10:20] = np.nan
    bad[40, 40] = np.inf
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        prob = predict(Pointwise(), bad, tile_size=32)
    assert np.isfinite(prob).all()
    far = np.ones_like(clean, bool)
    far[5:25, 5:25] = far[35:46, 35:46] = False
    np.testing.assert_allclose(prob[far], clean[far], atol=2e-2)
    with pytest.raises(ValueError, match="no finite pixel"):
        intensity_range(np.full((4, 4), np.nan, np.float32))


def test_tile_larger_than_the_image_is_clamped():
    seen = []

    class Recording(Pointwise):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    predict(Recording(), np.zeros((40, 30, 3), np.uint8), tile_size=4096, fuse=False)
    assert seen and max(seen) <= (48, 48)


def test_labels_are_written_atomically_and_never_through_a_symlink(tmp_path):
    from src_models.safe_write import UnsafeOutputError
    out = tmp_path / "x.labels.tif"
    write_labels(out, np.ones((5, 5), np.int32))
    assert tifffile.imread(out).dtype == np.uint8
    assert [p.name for p in tmp_path.iterdir()] == ["x.labels.tif"]
    link = tmp_path / "link.tif"
    link.symlink_to(tmp_path / "elsewhere.tif")
    with pytest.raises(UnsafeOutputError):
        write_labels(link, np.ones((5, 5), np.int32))
    assert not (tmp_path / "elsewhere.tif").exists()


def test_as_float01_keeps_nan_inf_and_negative_values_in_range():
    from src_models.preprocess import as_float01
    img = np.array([[0.0, np.nan], [np.inf, 100.0]], np.float32)
    out = as_float01(img)
    assert np.isfinite(out).all() and out.min() == 0.0 and out.max() == 1.0
    signed = as_float01(np.array([[-100, 0], [50, 100]], np.int16))
    assert signed.min() == 0.0 and signed.max() == 1.0


def test_float64_beyond_float32_range_is_scaled_not_overflowed():
    rng = np.random.default_rng(3)
    img = rng.random((40, 40, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no overflow warnings either
        huge = predict(Pointwise(), img * 1e300, tile_size=32)
    np.testing.assert_allclose(huge, predict(Pointwise(), img, tile_size=32), atol=2e-2)


def test_a_grayscale_three_page_stack_stays_a_stack(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 20, 30), np.uint8), photometric="minisblack")
    assert read_image(path).shape == (3, 20, 30)
