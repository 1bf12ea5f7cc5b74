"""Pyramidal slides open lazily with the right levels and µm/px; plain TIFFs are not slides;
the tissue mask finds the islands and not the pen stroke."""
import importlib.util

import numpy as np
import pytest
import tifffile

from slide_helpers import SIZE, aperio_slide, ome_slide  # noqa: F401  (fixtures)
from src_models.slide.reader import Slide, is_slide, open_slide
from src_models.slide.tissue import TissueMask, detect_tissue, slide_tissue
from src_models.testing.make_slide import _island_mask, _pen_mask, render


@pytest.mark.parametrize("which,fmt,mpp", [("aperio_slide", "aperio", 0.5),
                                           ("ome_slide", "ome", 0.25)])
def test_reader_gives_levels_and_scale(request, which, fmt, mpp):
    path, layout = request.getfixturevalue(which)
    assert is_slide(path)
    with open_slide(path) as slide:
        assert slide.format == fmt
        assert slide.shape == SIZE
        assert slide.mpp == pytest.approx((mpp, mpp))
        assert [lv.shape[:2] for lv in slide.levels] == [(2048, 3072), (512, 768), (128, 192)]
        assert all(lv.shape[2] == 3 and lv.dtype == np.uint8 for lv in slide.levels)
        assert slide.downsamples == pytest.approx([1, 4, 16])
        # lazy levels read what they are indexed with; the pixels are the rendered ones (JPEG)
        window = slide.read(0, 1000, 1100, 1500, 1620)
        truth = render(layout, 1000, 1500, 100, 120)
        assert window.shape == (100, 120, 3)
        assert np.abs(window.astype(int) - truth).mean() < 12
        dask_levels = slide.as_dask()
        assert dask_levels[2].shape == (128, 192, 3)
        assert np.array_equal(np.asarray(dask_levels[1][5:9, 7:11]), slide.read(1, 5, 9, 7, 11))


def test_plain_tiff_is_not_a_slide(tmp_path):
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((64, 64, 3), np.uint8))
    assert not is_slide(tmp_path / "small.tif")
    assert not is_slide(tmp_path / "missing.svs")


@pytest.mark.skipif(importlib.util.find_spec("openslide") is None,
                    reason="openslide-python is an optional extra (napari-dca[openslide])")
def test_openslide_formats_use_the_same_interface(tmp_path, aperio_slide):
    from src_models.slide.reader import open_with_openslide
    path, _ = aperio_slide
    slide = open_with_openslide(path)
    assert isinstance(slide, Slide) and slide.shape == SIZE
    assert slide.levels[1][10:20, 30:50].shape == (10, 20, 3)
    slide.close()


def test_tissue_mask_finds_the_islands_and_rejects_the_pen(aperio_slide):
    path, layout = aperio_slide
    with open_slide(path) as slide:
        tissue = slide_tissue(slide)
    h, w = tissue.mask.shape
    dy, dx = tissue.downsample
    truth = _island_mask(layout, 0, 0, h, w, int(round(dy)))
    pen = _pen_mask(layout, 0, 0, h, w, int(round(dy)))
    hits = (tissue.mask & truth).sum()
    assert hits / tissue.mask.sum() > 0.97      # what it calls tissue is tissue
    assert hits / truth.sum() > 0.7             # nearly white texture (fat, lumina) can pass as glass
    assert pen.sum() > 50 and not (tissue.mask & pen).any()
    assert tissue.area_um2((0.5, 0.5)) == pytest.approx(tissue.mask.sum() * dy * dx * 0.25)
    # every island is found; glass far from them is not tissue
    for isl in layout.islands:
        r = int(isl.radius / 2)
        assert tissue.touches(int(isl.cy) - r, int(isl.cy) + r, int(isl.cx) - r, int(isl.cx) + r)
    assert not tissue.touches(0, 40, 0, 40)


def test_blank_glass_has_no_tissue():
    glass = np.full((200, 300, 3), 240, np.uint8)
    mask, _ = detect_tissue(glass)
    assert not mask.any()
    assert TissueMask.everywhere((100, 100)).touches(0, 1, 0, 1)


def test_napari_reader_gives_a_multiscale_layer_in_microns_and_the_tissue(aperio_slide, tmp_path):
    from napari_dca._reader import get_slide_reader, read_slide
    path, _ = aperio_slide
    assert get_slide_reader(str(path)) is read_slide
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((32, 32, 3), np.uint8))
    assert get_slide_reader(str(plain)) is None          # napari's own reader keeps plain TIFFs
    (levels, kwargs, kind), (mask, mask_kwargs, mask_kind) = read_slide(str(path))
    assert kind == "image" and kwargs["multiscale"] and kwargs["rgb"]
    assert kwargs["scale"] == pytest.approx((0.5, 0.5)) and len(levels) == 3
    assert levels[0].shape == (2048, 3072, 3)
    assert mask_kind == "labels" and mask.any()
    # the mask's pixels cover 16 level-0 pixels: its extent in µm equals the slide's
    assert mask.shape[0] * mask_kwargs["scale"][0] == pytest.approx(2048 * 0.5, rel=0.02)


def test_labels_layer_saved_as_geojson_is_in_level0_pixels(tmp_path):
    import json
    from napari_dca._reader import write_labels_geojson
    labels = np.zeros((40, 60), np.uint8)
    labels[10:20, 30:45] = 3
    meta = {"scale": (0.5, 0.5), "translate": (50.0, 100.0), "name": "region"}  # µm
    write_labels_geojson(str(tmp_path / "r.geojson"), labels, meta)
    feat = json.loads((tmp_path / "r.geojson").read_text())["features"][0]
    ring = np.asarray(feat["geometry"]["coordinates"][0])
    assert feat["properties"]["objectType"] == "detection"
    # level-0 pixel offset = translate / scale = (100, 200): x in [230, 245], y in [110, 120]
    assert ring[:, 0].min() == pytest.approx(230) and ring[:, 0].max() == pytest.approx(245)
    assert ring[:, 1].min() == pytest.approx(110) and ring[:, 1].max() == pytest.approx(120)


def test_visible_region_of_a_multiscale_layer_is_in_level0_pixels():
    from types import SimpleNamespace

    from napari_dca._widgets._common import layer_region
    # the canvas shows rows 10..19, cols 20..39 of level 2 (downsample 16)
    layer = SimpleNamespace(multiscale=True, data_level=2, corner_pixels=np.array([[10, 20], [19, 39]]),
                            downsample_factors=np.array([[1, 1], [4, 4], [16, 16]]))
    assert layer_region(layer, (2048, 3072)) == (slice(160, 320), slice(320, 640))
    plain = SimpleNamespace(corner_pixels=np.array([[10, 20], [59, 79]]))
    assert layer_region(plain, (100, 100)) == (slice(10, 60), slice(20, 80))


def test_tissue_box_within_a_window():
    mask = np.zeros((10, 10), bool)
    mask[2:4, 5:7] = True                      # level-0 rows 32..63, cols 80..111 (16 px/pixel)
    tissue = TissueMask(mask, (16.0, 16.0))
    assert tissue.box_within(0, 160, 0, 160) == (32, 64, 80, 112)
    assert tissue.box_within(0, 160, 0, 160, pad=8) == (24, 72, 72, 120)
    assert tissue.box_within(40, 160, 0, 90, pad=100) == (40, 160, 0, 90)   # clipped to the window
    assert tissue.box_within(100, 160, 0, 160) is None


def test_openslide_level_reads_regions_as_rgb_on_white():
    from PIL import Image

    from src_models.slide.reader import OpenSlideLevel

    class FakeHandle:                     # openslide.OpenSlide's level API, no library needed
        level_dimensions = [(400, 300), (100, 75)]
        level_downsamples = [1.0, 4.0]
        calls = []

        def read_region(self, location, level, size):
            self.calls.append((location, level, size))
            rgba = np.zeros((size[1], size[0], 4), np.uint8)
            rgba[..., 0] = 200
            rgba[..., 3] = 255
            rgba[0, 0] = 0                # transparent: outside the scanned area
            return Image.fromarray(rgba, "RGBA")
    handle = FakeHandle()
    level = OpenSlideLevel(handle, 1)
    assert level.shape == (75, 100, 3) and level.dtype == np.uint8
    block = level[10:20, 30:50]
    assert block.shape == (10, 20, 3)
    assert handle.calls[-1] == ((120, 40), 1, (20, 10))   # level-0 location, level size
    assert block[0, 0].tolist() == [255, 255, 255] and block[1, 1].tolist() == [200, 0, 0]
