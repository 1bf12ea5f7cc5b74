"""Synthetic slides shared by the tests/test_slide*.py files (built once per session)."""
import pytest

from src_models.testing.make_slide import make_slide

SIZE = (2048, 3072)     # a few thousand pixels a side: 4 islands, 3 pyramid levels


@pytest.fixture(scope="session")
def aperio_slide(tmp_path_factory):
    """(path, layout) of a JPEG-tiled SVS-layout pyramid, 0.5 µm/px."""
    return make_slide(tmp_path_factory.mktemp("slides") / "islands.svs", SIZE, seed=1)


@pytest.fixture(scope="session")
def ome_slide(tmp_path_factory):
    """(path, layout) of an OME-TIFF pyramid (levels in SubIFDs), 0.25 µm/px."""
    return make_slide(tmp_path_factory.mktemp("slides") / "islands.ome.tif", SIZE, seed=2,
                      mpp=0.25)
