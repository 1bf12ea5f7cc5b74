"""labels_to_geojson's progress callback can stop the write (the GUI's Cancel): while outlines are
traced or between Features, the temporary file goes and an earlier file at the path stays."""
import numpy as np
import pytest

from src_models.slide.geojson import labels_to_geojson


class Stop(Exception):
    pass


def _labels(n=20, cell=8):
    labels = np.zeros((n * cell, n * cell), np.int32)
    for i in range(n):
        for j in range(n):
            labels[i * cell + 1:(i + 1) * cell - 1, j * cell + 1:(j + 1) * cell - 1] = i * n + j + 1
    return labels


@pytest.mark.parametrize("stop_at", ["tracing", "writing", "before the rename"])
def test_an_exception_from_progress_stops_the_write_and_keeps_the_earlier_file(tmp_path, stop_at):
    target = tmp_path / "x.geojson"
    target.write_text("earlier")
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if ((stop_at == "tracing" and done == 0 and len(calls) > 1)
                or (stop_at == "writing" and 0 < done < total)
                or (stop_at == "before the rename" and done == total)):
            raise Stop
    with pytest.raises(Stop):
        labels_to_geojson(_labels(), target, progress=progress)
    assert target.read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["x.geojson"]
    assert all(total == 400 for _, total in calls)


def test_progress_counts_every_object_once_to_the_end(tmp_path):
    calls = []
    labels_to_geojson(_labels(), tmp_path / "x.geojson", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (400, 400) and [d for d, _ in calls] == sorted(d for d, _ in calls)
