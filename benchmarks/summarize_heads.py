"""Summarise `napari-dca evaluate` JSON files into one markdown table: the mean and the per-image
spread (min / median / max) of each object score, and the per-image count error for nuclei.

    python benchmarks/summarize_heads.py NAME=PATH/evaluation.json [NAME=PATH ...]
"""
from __future__ import annotations

import json
import sys

import numpy as np

SCORES = {"glands": ("object_f1", "object_dice", "object_hausdorff", "dice"),
          "nuclei": ("aji", "pq", "dice")}


def spread(values: list[float]) -> str:
    v = np.array([x for x in values if x is not None], float)
    return f"{v.mean():.3f} ({v.min():.3f} / {np.median(v):.3f} / {v.max():.3f})" if v.size else "n/a"


def main() -> None:
    rows, task = [], None
    for arg in sys.argv[1:]:
        name, path = arg.split("=", 1)
        report = json.load(open(path))
        task = report["task"]
        per = report["per_image"]
        cells = [spread([r[m] for r in per]) for m in SCORES[task]]
        if task == "nuclei":
            err = [abs(r["objects_pred"] - r["objects_gt"]) / max(1, r["objects_gt"]) for r in per]
            cells.append(f"{np.mean(err):.1%} (max {np.max(err):.1%}; {sum(e <= 0.10 for e in err)}/{len(err)} within 10%)")
        rows.append((name, cells, report.get("meta", {}).get("seconds")))
    head = list(SCORES[task]) + (["count error per image"] if task == "nuclei" else [])
    print("| model | " + " | ".join(head) + " | eval seconds |")
    print("|---|" + "---|" * (len(head) + 1))
    for name, cells, secs in rows:
        print(f"| {name} | " + " | ".join(cells) + f" | {secs} |")
    print("\nEach cell: mean over the validation images (min / median / max per image).")


if __name__ == "__main__":
    main()
