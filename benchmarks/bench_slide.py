"""Whole-slide throughput and memory: a generated slide, the bundled nuclei model, the full pipeline.

    python benchmarks/bench_slide.py --size 40000 [--tissue 0.3] [--islands N] [--threads 1]
        [--chunk 2048] [--out DIR] [--workers-check]

Steps (each `segment_slide` run in a fresh subprocess so its peak RSS is its own):
1. write a synthetic Aperio-layout slide (src_models/testing/make_slide.py: H&E training images as
   tissue islands on glass, JPEG tiles, 4x pyramid) of SIZE x SIZE with about TISSUE tissue
2. segment it with tissue detection (only chunks touching tissue) and 3. without (every chunk)
   -> wall time, tissue MP/s (tissue megapixels / wall time), slides per hour, peak RSS
4. (--workers-check) four 2048 x 2048 slides through the dask LocalCluster with 1 and with 2
   workers -> slides per hour each
Writes benchmarks/results/slide_<size>.json and .md with the command line. The CPU may be shared:
numbers are as measured on this machine at the time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(args) -> int:
    """One pipeline run in this (fresh) process; prints a JSON line."""
    import torch
    torch.set_num_threads(args.threads)
    from src_models.checkpoints import load_checkpoint
    from src_models.slide.pipeline import segment_slide
    model, card = load_checkpoint(args.checkpoint, device="cpu")
    start = time.perf_counter()
    result = segment_slide(args.child, model, card, args.out, tissue=args.tissue_on,
                           chunk=args.chunk, batch_size=4)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss_mb = usage.ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "peak_rss_mb": rss_mb, "objects": result.n_objects,
                      "tissue_mp": result.tissue_megapixels, "tissue_fraction":
                      result.tissue_fraction, "chunks": result.chunks,
                      "chunks_segmented": result.chunks_segmented,
                      "summary": result.summary()}))
    return 0


def run_child(slide: Path, out: Path, tissue_on: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(slide), "--out", str(out),
           "--threads", str(args.threads), "--chunk", str(args.chunk),
           "--checkpoint", args.checkpoint] + ([] if tissue_on else ["--tissue-off"])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def workers_check(tmp: Path, args) -> dict:
    """Four slides of 2048x2048 through the LocalCluster with 1 and 2 workers."""
    from src_models.slide.cluster import timed_run, slides_per_hour
    from src_models.testing.make_slide import make_slide
    slides = [make_slide(tmp / f"w{i}.svs", (2048, 2048), tissue=args.tissue, seed=20 + i)[0]
              for i in range(4)]
    out = {}
    for workers in (1, 2):
        dest = tmp / f"workers{workers}"
        outcomes, wall = timed_run(slides, dest, args.checkpoint,
                                   {"chunk": args.chunk, "threads": 1, "device": "cpu"},
                                   workers=workers)
        out[workers] = {"wall_s": wall, "slides_per_hour": slides_per_hour(outcomes, wall),
                        "statuses": [o.status for o in outcomes]}
        shutil.rmtree(dest, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=40000)
    p.add_argument("--tissue", type=float, default=0.3)
    p.add_argument("--islands", type=int, default=None,
                   help="tissue sections on the glass (default: one per ~3000² px, as in tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--checkpoint", default="nuclei")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--keep", default=None, help="folder to keep the generated slide in")
    p.add_argument("--workers-check", action="store_true")
    p.add_argument("--skip-off", action="store_true", help="skip the tissue-detection-off run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tissue-off", dest="tissue_on", action="store_false", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    results_dir = Path(args.out or REPO / "benchmarks" / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_slide_"))
    keep = Path(args.keep) if args.keep else tmp
    keep.mkdir(parents=True, exist_ok=True)
    try:
        from src_models.testing.make_slide import make_slide, tissue_fraction
        slide = keep / f"bench_{args.size}_{args.islands or 'grid'}.svs"
        start = time.perf_counter()
        if slide.exists():
            from src_models.testing.make_slide import make_layout
            layout = make_layout(args.size, args.size, args.tissue, seed=0, cells=[],
                                 islands=args.islands)
            made = None
        else:
            slide, layout = make_slide(slide, (args.size, args.size), tissue=args.tissue,
                                       islands=args.islands)
            made = time.perf_counter() - start
        rows = {"generate_s": made, "true_tissue_fraction": tissue_fraction(layout),
                "slide_bytes": slide.stat().st_size}
        runs = [("tissue detection on", True)] + ([] if args.skip_off else
                                                  [("tissue detection off", False)])
        for name, on in runs:
            out = tmp / ("on" if on else "off")
            r = run_child(slide, out, on, args)
            r["tissue_mp_per_s"] = r["tissue_mp"] / r["wall_s"]
            r["slide_mp_per_s"] = args.size * args.size / 1e6 / r["wall_s"]
            r["slides_per_hour"] = 3600.0 / r["wall_s"]
            rows[name] = r
            print(f"{name}: {r['summary']}; peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if args.workers_check:
            rows["workers"] = workers_check(tmp, args)
        rows["command"] = "python benchmarks/bench_slide.py " + " ".join(argv or sys.argv[1:])
        rows["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs " \
                          f"(shared), torch threads {args.threads}"
        (results_dir / f"slide_{args.size}.json").write_text(json.dumps(rows, indent=1))
        (results_dir / f"slide_{args.size}.md").write_text(markdown(rows, args))
        print(markdown(rows, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def markdown(rows: dict, args) -> str:
    lines = [f"# Whole-slide benchmark, {args.size} x {args.size} generated slide",
             "", f"Command: `{rows['command']}`", f"Machine: {rows['machine']}", "",
             f"Slide: Aperio-layout JPEG pyramid, {rows['slide_bytes'] / 1e6:.0f} MB, true tissue "
             f"{rows['true_tissue_fraction']:.1%}"
             + (f", generated in {rows['generate_s']:.0f} s" if rows.get("generate_s") else ""),
             "", "| run | wall s | CPU s | tissue MP | tissue MP/s | slide MP/s | slides/hour | "
             "chunks segmented | objects | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("tissue detection on", "tissue detection off"):
        r = rows.get(name)
        if r:
            cpu = f"{r['cpu_s']:.0f}" if r.get("cpu_s") is not None else "-"
            lines.append(f"| {name} | {r['wall_s']:.0f} | {cpu} | {r['tissue_mp']:.0f} | "
                         f"{r['tissue_mp_per_s']:.3f} | {r['slide_mp_per_s']:.3f} | "
                         f"{r['slides_per_hour']:.2f} | {r['chunks_segmented']}/{r['chunks']} | "
                         f"{r['objects']} | {r['peak_rss_mb']:.0f} |")
    if "workers" in rows:
        lines += ["", "| LocalCluster workers (4 slides of 2048², worker start-up included) | wall s "
                  "| slides/hour |",
                  "|---|---|---|"]
        for w, r in rows["workers"].items():
            lines.append(f"| {w} | {r['wall_s']:.0f} | {r['slides_per_hour']:.1f} |")
    lines += ["", "Tissue MP/s counts the tissue area found (tissue detection on) or the whole "
              "slide (off) per second of wall time, generation excluded."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
