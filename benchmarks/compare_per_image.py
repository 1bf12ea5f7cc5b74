"""Per-image differences between two scorings of the same images (B minus A): for each glands
(or nuclei) score the mean difference, on how many images B is better / worse / equal, and the largest drop
and gain with their image names.

    python benchmarks/compare_per_image.py A/evaluation.json B/evaluation.json
    python benchmarks/compare_per_image.py A_overlap.json@0.125 B_overlap.json@0.125

A file is a `napari-dca evaluate` evaluation.json, or a bench_overlap.py JSON with @OVERLAP.
Better means higher, except for object_hausdorff (lower).
"""
from __future__ import annotations

import json
import sys

import numpy as np

GLANDS_METRICS = ("object_f1", "object_dice", "object_hausdorff", "dice")
NUCLEI_METRICS = ("aji", "pq", "dice")


def metrics_of(row: dict) -> tuple[str, ...]:
    """The glands scores where the report has them, else the nuclei ones."""
    return GLANDS_METRICS if "object_f1" in row else NUCLEI_METRICS


def rows(arg: str) -> dict[str, dict]:
    path, _, overlap = arg.partition("@")
    report = json.load(open(path))
    per = report["overlaps"][overlap]["per_image"] if overlap else report["per_image"]
    return {r["name"]: r for r in per}


def main() -> None:
    a, b = rows(sys.argv[1]), rows(sys.argv[2])
    if set(a) != set(b):
        sys.exit(f"different images: {sorted(set(a) ^ set(b))}")
    names = sorted(a)
    print(f"B = {sys.argv[2]}  minus  A = {sys.argv[1]}  ({len(names)} images)\n")
    print("| score | mean A | mean B | mean B-A | B better / worse / equal | largest drop | largest gain |")
    print("|---|---|---|---|---|---|---|")
    for m in metrics_of(a[names[0]]):
        sign = -1.0 if m == "object_hausdorff" else 1.0
        d = np.array([b[n][m] - a[n][m] for n in names], float)
        good = sign * d
        tol = 1e-9
        lo, hi = int(np.argmin(good)), int(np.argmax(good))
        print(f"| {m} | {np.mean([a[n][m] for n in names]):.4f} | {np.mean([b[n][m] for n in names]):.4f} | "
              f"{d.mean():+.4f} | {int((good > tol).sum())} / {int((good < -tol).sum())} / "
              f"{int((abs(good) <= tol).sum())} | {d[lo]:+.3f} ({names[lo]}) | {d[hi]:+.3f} ({names[hi]}) |")


if __name__ == "__main__":
    main()
