"""One table of several `bench_finetune.py` runs of the same images (e.g. one per seed): per image,
the unseen-half change of each run (kept rounds; a rolled-back round changes nothing), and per run
and over all of them the mean change, the kept rounds and the worst kept change.

    python benchmarks/summarize_seeds.py seed0=benchmarks/results/finetune_glands_s11_seed0.json \
        seed1=benchmarks/results/finetune_glands_s11_seed1.json ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def change(row: dict) -> float:
    return row["after"] - row["before"]


def table(runs: dict[str, list[dict]]) -> str:
    names = list(runs)
    images = [r["image"] for r in runs[names[0]]]
    by = {n: {r["image"]: r for r in rows} for n, rows in runs.items()}
    lines = ["| image | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for image in images:
        cells = []
        for n in names:
            r = by[n].get(image)
            if r is None:
                cells.append("-")
                continue
            kept = "kept" if r["kept"] and r.get("weights_kept", True) else (
                "settings" if r["kept"] else "rolled back")
            cells.append(f"{change(r):+.3f} ({kept})")
        lines.append(f"| {image} | " + " | ".join(cells) + " |")
    lines += ["", "| run | images | kept | mean change | worst kept change | kept rounds below -0.01 |",
              "|---|---|---|---|---|---|"]
    every = []
    for n, rows in runs.items():
        every += rows
        lines.append(summary_row(n, rows))
    lines.append(summary_row("all", every))
    return "\n".join(lines)


def summary_row(name: str, rows: list[dict]) -> str:
    kept = [change(r) for r in rows if r["kept"]]
    mean = sum(change(r) for r in rows) / len(rows)
    return (f"| {name} | {len(rows)} | {len(kept)} | {mean:+.4f} | {min(kept, default=0.0):+.3f} | "
            f"{sum(c < -0.01 for c in kept)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=bench_finetune JSON")
    args = ap.parse_args()
    runs = {}
    for spec in args.runs:
        name, path = spec.split("=", 1)
        runs[name] = json.loads(Path(path).read_text())["rows"]
    print(table(runs))


if __name__ == "__main__":
    main()
