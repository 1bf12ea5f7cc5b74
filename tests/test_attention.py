"""DCA attention overlays: shapes, placement, stitching, rows summing to one."""
import numpy as np
import pytest
import torch

from src_models import build_model
from src_models.attention import attention_maps, tile_around
from src_models.inference import Cancelled

torch.set_num_threads(1)
RNG = np.random.default_rng(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("unet", width=0.125).eval()


def test_maps_for_one_tile_have_grid_shape_and_sca_rows_sum_to_one(model):
    img = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    r = attention_maps(model, img, tile_size=64, query=(20, 40))
    assert r.grid == (8, 8) and r.tiles == 1 and len(r.stages) == 4
    assert r.scale == (8.0, 8.0) and r.translate == (3.5, 3.5)
    for s, c in zip(r.stages, (8, 16, 32, 64)):
        assert s.channels == c
        assert s.query_map.shape == s.received.shape == s.channel_summary.shape == (8, 8)
        assert s.query_map.sum() == pytest.approx(1.0, abs=1e-5)
        assert s.received.sum() == pytest.approx(1.0, abs=1e-5)
        assert (s.query_map >= 0).all()
        assert s.cca.shape == (1, c, 120)
        np.testing.assert_allclose(s.cca.sum(-1), 1.0, atol=1e-5)
        assert s.channel_weights.shape == (120,)
        assert s.channel_weights.sum() == pytest.approx(1.0, abs=1e-4)
    assert r.to_image(r.stages[0].received).shape == (64, 64)


def test_query_map_is_the_sca_row_of_the_query_token(model):
    from src_models import capture_attention
    from src_models.preprocess import prepare
    img = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    r = attention_maps(model, img, tile_size=64, query=(33, 9))   # token (4, 1)
    with torch.inference_mode(), capture_attention(model) as rec:
        model(torch.from_numpy(prepare(img, 3, None))[None])
    expected = rec[0].sca[-1][0][0].mean(0)[4 * 8 + 1].reshape(8, 8).numpy()
    np.testing.assert_allclose(r.stages[0].query_map, expected, atol=1e-5)
    # One SCA head at a time: its own row, summing to one; the mean of heads is the map above.
    st = r.stages[0]
    assert st.query_map_heads.shape == st.received_heads.shape == (4, 8, 8)
    for h in range(4):
        row = rec[0].sca[-1][0][0][h][4 * 8 + 1].reshape(8, 8).numpy()
        np.testing.assert_allclose(st.sca_map("query", h), row, atol=1e-5)
        assert st.sca_map("received", h).sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(st.sca_map("query", -1), st.query_map)
    np.testing.assert_allclose(st.query_map_heads.mean(0), st.query_map, atol=1e-6)


def test_big_image_maps_are_stitched_across_tiles(model):
    img = RNG.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    r = attention_maps(model, img, tile_size=64, query=(70, 140))
    assert r.tiles == 2 * 3
    assert r.stages[0].received.shape == (13, 19)     # ceil(100 / 8), ceil(150 / 8)
    assert r.query_tile == (64, 100, 128, 150)
    q = r.stages[1].query_map
    assert q[:8].sum() == 0 and q[:, :16].sum() == 0   # only the query's tile
    assert 0 < q.sum() <= 1.0 + 1e-5
    assert r.to_image(q).shape == (100, 150)


def test_region_around_a_point_is_placed_in_image_coordinates(model):
    img = RNG.integers(0, 256, (200, 300), dtype=np.uint8)
    region = tile_around((150, 290), img.shape, 64)
    assert region == (118, 182, 236, 300)
    r = attention_maps(model, img, tile_size=64, region=region, query=(150, 290))
    assert r.region == region and r.tiles == 1
    assert r.translate == (118 + 3.5, 236 + 3.5)
    assert r.stages[0].query_map.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="outside the region"):
        attention_maps(model, img, tile_size=64, region=region, query=(0, 0))


def test_stack_needs_a_plane_and_models_need_dca(model):
    stack = RNG.integers(0, 256, (2, 64, 64), dtype=np.uint8)
    with pytest.raises(ValueError, match="plane"):
        attention_maps(model, stack, tile_size=64)
    assert attention_maps(model, stack, tile_size=64, plane=1).tiles == 1
    plain = build_model("unet", width=0.125, dca=False)
    with pytest.raises(ValueError, match="no DCA"):
        attention_maps(plain, stack[0], tile_size=64)


def test_progress_and_cancel(model):
    img = RNG.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    seen = []
    attention_maps(model, img, tile_size=64, batch_size=1, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(Cancelled):
        attention_maps(model, img, tile_size=64, cancel=lambda: True)
