"""Peak memory of the instance step on a large probability map (the 12000 x 12000 case of issue 12).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_instance_memory.py --size 12000

Prints the object count, seconds, and the peak RSS added by `InstanceMaker.labels()` per pixel of
the image (the probability map itself is allocated before the measurement starts)."""
import argparse
import resource
import time

import numpy as np


def synthetic_probabilities(n: int) -> np.ndarray:
    """Nucleus-sized discs on a grid: n x n float32."""
    prob = np.zeros((n, n), np.float32)
    yy, xx = np.mgrid[:40, :40]
    disc = (((yy - 20) ** 2 + (xx - 20) ** 2) < 150).astype(np.float32) * 0.9
    for y in range(0, n - 40, 97):
        for x in range(0, n - 40, 89):
            prob[y:y + 40, x:x + 40] = disc
    return prob


def main() -> None:
    from src_models.instances import InstanceMaker
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--chunk", type=int, default=None,
                        help="chunk edge of the chunked step (default: chunked_instances.DEFAULT_CHUNK)")
    parser.add_argument("--chunked-above", type=int, default=None, metavar="PIXELS",
                        help="images above this many pixels are chunked (default: CHUNKED_ABOVE_PIXELS)")
    args = parser.parse_args()
    import functools

    from src_models import chunked_instances
    if args.chunked_above is not None:
        chunked_instances.CHUNKED_ABOVE_PIXELS = args.chunked_above
    if args.chunk is not None:
        chunked_instances.chunked_labels = functools.partial(chunked_instances.chunked_labels,
                                                             chunk=args.chunk)
    prob = synthetic_probabilities(args.size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    labels = InstanceMaker(prob, {"task": "nuclei", "instance_params": {"min_size": 4}}).labels()
    seconds = time.perf_counter() - start
    added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(f"{args.size}x{args.size}: {int(labels.max())} objects, {seconds:.1f} s, peak RSS added "
          f"{added / 2 ** 20:.0f} MiB = {added / prob.size:.1f} bytes/pixel")


if __name__ == "__main__":
    main()
