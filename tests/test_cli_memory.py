"""The instance step of a large image stays bounded (issue 12's 12000 x 12000 case, scaled down so
that it runs in seconds): the whole-image step needed about 49 bytes per pixel on top of the
probabilities; the chunked step (slides' src_models/chunked_instances.py) adds the labels and one
chunk's temporaries."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_instance_step_of_a_large_image_adds_few_bytes_per_pixel():
    # Scaled down so that it runs in seconds: chunked above 1 MP, 512-pixel chunks, a 3000^2 map.
    side = 3000
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_instance_memory.py"),
                           "--size", str(side), "--chunk", "512", "--chunked-above", str(1024 ** 2)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    added_mib = float(proc.stdout.split("peak RSS added ")[1].split(" MiB")[0])
    pixels = side * side
    # int32 labels plus a fixed budget for one chunk's temporaries; the whole-image step would
    # add about 49 bytes/pixel (~420 MiB here).
    assert added_mib * 2 ** 20 < 8 * pixels + 100 * 2 ** 20, proc.stdout
