"""Whole-slide throughput and memory: a generated slide, the bundled nuclei model, the full pipeline.

    python benchmarks/bench_slide.py --size 40000 [--tissue 0.3] [--islands N] [--threads 2]
        [--runtime onnx] [--chunk 2048] [--keep DIR] [--off-region Y0 Y1 X0 X1] [--skip-on]
        [--workers-check --workers-size 2048 --workers-slides 4 --workers-rounds 2
         --chunk-tasks-above CHUNKS]
    python benchmarks/bench_slide.py --size 40000 --keep DIR --generate-only

Steps, each measured run in a fresh subprocess (so its memory is its own):
1. write (or reuse, from --keep) a synthetic Aperio-layout slide (src_models/testing/make_slide.py:
   H&E training images as tissue islands on glass, JPEG tiles, 4x pyramid) of SIZE x SIZE with
   about TISSUE tissue. The writer renders one strip of 256-pixel tiles at a time and hands
   tifffile an iterator of tiles, so memory does not grow with the slide (its peak RSS is recorded).
2. segment it with tissue detection (only chunks touching tissue)
3. without tissue detection (every chunk): the whole slide, or with --off-region only the cores
   meeting that level-0 box, extrapolated to the whole slide by its area (the result says so);
   --on-region does the same for step 2, extrapolated by the tissue area
   -> wall time, CPU time, tissue MP/s (tissue megapixels / wall time), slides per hour, peak RSS
4. (--workers-check) the same medium slide copied WORKERS_SLIDES times through the dask
   LocalCluster with 1 and with 2 single-threaded workers, interleaved 1, 2, 1, 2, ... for
   WORKERS_ROUNDS rounds; medians of slides per hour. With --workers-slides 1 --chunk-tasks-above
   0 it measures one slide whose chunks run as tasks spread over the workers.
Peak RSS is the largest sum of the resident memory of the run's whole process tree (the run and
every process under it: dask nanny and workers), sampled every 0.25 s with psutil, next to the
kernel's ru_maxrss of the largest single process. The 1-minute load average is sampled alongside
(min / median / max): the CPU may be shared, and the numbers are as measured then.
Progress (stage, chunks done, seconds left) goes to stderr with a time stamp, so a log shows how
far a run got. Writes benchmarks/results/slide_<size>.json and .md with the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------------
# Measuring a subprocess: its process tree's memory and the machine's load while it runs
# ----------------------------------------------------------------------------------------------

class TreeSampler:
    """Samples, every `every` s, the summed RSS of a process and all its descendants, and the
    1-minute load average, in a background thread."""

    def __init__(self, pid: int, every: float = 0.25):
        import psutil
        self.root = psutil.Process(pid)
        self.every = every
        self.peak_bytes = 0
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self) -> int:
        import psutil
        total = 0
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:   # exited between the listing and the read
                pass
        return total

    def _run(self) -> None:
        last_load = 0.0
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._tree_rss())
            now = time.monotonic()
            if now - last_load >= 5.0:
                self.loads.append(os.getloadavg()[0])
                last_load = now
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.loads.append(os.getloadavg()[0])

    def load_summary(self) -> dict:
        return {"min": min(self.loads), "median": statistics.median(self.loads),
                "max": max(self.loads)}


def measured(cmd: list[str], threads: int) -> dict:
    """Runs `cmd` (a child mode of this script that prints one JSON line on stdout; its stderr
    goes to ours), sampling its process tree; the JSON plus peak_tree_rss_mb, the children's
    ru_maxrss and the load average."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    with TreeSampler(proc.pid) as sampler:
        stdout, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = json.loads(stdout.strip().splitlines()[-1])
    row["peak_tree_rss_mb"] = sampler.peak_bytes / 2 ** 20
    row["max_process_rss_mb"] = after.ru_maxrss / 1024   # largest child so far (kernel's figure)
    row["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    row["load_average_1min"] = sampler.load_summary()
    return row


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC] {message}", file=sys.stderr,
          flush=True)


# ----------------------------------------------------------------------------------------------
# Child modes (each runs in its own process)
# ----------------------------------------------------------------------------------------------

def child_segment(args) -> int:
    """One segment_slide run; prints a JSON line."""
    import torch
    torch.set_num_threads(args.threads)
    from src_models.checkpoints import load_checkpoint
    from src_models.slide.pipeline import segment_slide
    model, card = load_checkpoint(args.checkpoint, device="cpu")
    last = {"t": 0.0}

    def progress(stage, done, total, left):
        now = time.monotonic()
        if now - last["t"] >= 10 or done == total:   # a line every 10 s at most
            last["t"] = now
            eta = "" if left is None else f", ~{left:.0f} s left in this stage"
            log(f"{stage} {done}/{total}{eta}")
    start = time.perf_counter()
    result = segment_slide(args.child, model, card, args.out, tissue=args.tissue_on,
                           chunk=args.chunk, batch_size=4, runtime=args.runtime,
                           region=args.region, progress=progress)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "objects": result.n_objects,
                      "tissue_mp": result.tissue_megapixels,
                      "tissue_fraction": result.tissue_fraction, "chunks": result.chunks,
                      "chunks_segmented": result.chunks_segmented, "stages": result.stages,
                      "runtime": result.runtime, "region": result.region,
                      "region_tissue_mp": result.region_tissue_megapixels,
                      "summary": result.summary()}))
    return 0


def child_workers(args) -> int:
    """The slides in --child-slides through a LocalCluster of --child-workers workers."""
    from src_models.slide.cluster import slides_per_hour, timed_run
    from src_models.slide.cluster import CHUNK_TASKS_ABOVE
    above = CHUNK_TASKS_ABOVE if args.chunk_tasks_above is None else args.chunk_tasks_above
    outcomes, wall = timed_run(args.child_slides, args.out, args.checkpoint,
                               {"chunk": args.chunk, "threads": 1, "device": "cpu",
                                "runtime": args.runtime},
                               workers=args.child_workers, retries=0, chunk_tasks_above=above)
    print(json.dumps({"wall_s": wall, "slides_per_hour": slides_per_hour(outcomes, wall),
                      "statuses": [o.status for o in outcomes],
                      "slide_seconds": [o.seconds for o in outcomes],
                      "chunk_tasks": [o.chunk_tasks for o in outcomes],
                      "chunk_workers": [o.chunk_workers for o in outcomes],
                      "summaries": [o.summary for o in outcomes]}))
    return 0


def child_generate(args) -> int:
    from src_models.testing.make_slide import make_slide, tissue_fraction
    start = time.perf_counter()
    path, layout = make_slide(args.generate, (args.size, args.size), tissue=args.tissue,
                              islands=args.islands)
    print(json.dumps({"wall_s": time.perf_counter() - start, "slide_bytes": path.stat().st_size,
                      "true_tissue_fraction": tissue_fraction(layout)}))
    return 0


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------

def child_cmd(args, *extra: str) -> list[str]:
    return [sys.executable, __file__, "--threads", str(args.threads), "--chunk", str(args.chunk),
            *([] if args.chunk_tasks_above is None else
              ["--chunk-tasks-above", str(args.chunk_tasks_above)]),
            "--checkpoint", args.checkpoint, "--runtime", args.runtime, "--size", str(args.size),
            "--tissue", str(args.tissue)] + \
        (["--islands", str(args.islands)] if args.islands else []) + list(extra)


def slide_for(args, keep: Path) -> tuple[Path, dict]:
    slide = keep / f"bench_{args.size}_{args.islands or 'grid'}.svs"
    if slide.exists():
        from src_models.testing.make_slide import make_layout, tissue_fraction
        layout = make_layout(args.size, args.size, args.tissue, seed=0, cells=[],
                             islands=args.islands)
        return slide, {"generate": None, "true_tissue_fraction": tissue_fraction(layout),
                       "slide_bytes": slide.stat().st_size}
    log(f"generating {slide}")
    row = measured(child_cmd(args, "--generate", str(slide)), 1)
    return slide, {"generate": row, "true_tissue_fraction": row["true_tissue_fraction"],
                   "slide_bytes": row["slide_bytes"]}


def segment_run(args, slide: Path, out: Path, tissue_on: bool, region=None) -> dict:
    extra = ["--child", str(slide), "--out", str(out)] + ([] if tissue_on else ["--tissue-off"])
    if region:
        extra += ["--region"] + [str(v) for v in region]
    r = measured(child_cmd(args, *extra), args.threads)
    shutil.rmtree(out, ignore_errors=True)
    r["tissue_mp_per_s"] = r["tissue_mp"] / r["wall_s"]
    r["slides_per_hour"] = 3600.0 / r["wall_s"]
    if region:
        # a sample: scaled to the whole slide by its tissue (tissue off: by its area)
        cores_in = r["chunks_segmented"]
        scale = r["tissue_mp"] / r["region_tissue_mp"]
        r["extrapolated"] = {"from_cores": cores_in, "of_cores": r["chunks"], "scale": scale,
                             "wall_s": r["wall_s"] * scale, "objects": r["objects"] * scale,
                             "tissue_mp_per_s": r["tissue_mp"] / (r["wall_s"] * scale),
                             "slides_per_hour": 3600.0 / (r["wall_s"] * scale)}
    return r


def runtimes_check(args, slide: Path, tmp: Path) -> dict:
    """The tissue-on run with torch and with the exported graph, alternating, `rounds` times."""
    runs: dict[str, list[dict]] = {"torch": [], "onnx": []}
    runtime = args.runtime
    try:
        for rnd in range(args.runtimes_check):
            for name in ("torch", "onnx"):
                args.runtime = name
                log(f"runtimes check: round {rnd + 1}, {name}")
                runs[name].append(segment_run(args, slide, tmp / f"rt_{name}", True))
    finally:
        args.runtime = runtime
    out = {k: {"median_wall_s": statistics.median(r["wall_s"] for r in v),
               "median_cpu_s": statistics.median(r["cpu_s"] for r in v),
               "walls": [r["wall_s"] for r in v], "objects": [r["objects"] for r in v],
               "loads": [r["load_average_1min"] for r in v]} for k, v in runs.items()}
    out["onnx_speedup"] = out["torch"]["median_wall_s"] / out["onnx"]["median_wall_s"]
    return out


def workers_check(tmp: Path, args) -> dict:
    """Copies of one medium slide through the LocalCluster with 1 and 2 workers, interleaved."""
    from src_models.testing.make_slide import make_slide
    base, _ = make_slide(tmp / "medium.svs", (args.workers_size, args.workers_size),
                         tissue=args.tissue, seed=20, islands=1)
    slides = []
    for i in range(args.workers_slides):
        copy = tmp / f"medium_{i}.svs"
        shutil.copyfile(base, copy)
        slides.append(str(copy))
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for rnd in range(args.workers_rounds):
        for workers in (1, 2):
            dest = tmp / f"workers{workers}_{rnd}"
            log(f"workers check: round {rnd + 1}, {workers} worker(s)")
            r = measured(child_cmd(args, "--child-workers", str(workers), "--out", str(dest),
                                   "--child-slides", *slides), 1)
            shutil.rmtree(dest, ignore_errors=True)
            runs[workers].append(r)
    tasks = ("" if args.chunk_tasks_above is None else
             f", one task per chunk above {args.chunk_tasks_above} tissue chunks")
    out = {"slide": f"{args.workers_size}x{args.workers_size}, {args.workers_slides} copies, "
                    f"chunk {args.chunk}{tasks}",
           "order": "1, 2 workers alternating, rounds " + str(args.workers_rounds)}
    for workers, rows in runs.items():
        out[str(workers)] = {
            "median_wall_s": statistics.median(r["wall_s"] for r in rows),
            "median_slides_per_hour": statistics.median(r["slides_per_hour"] for r in rows),
            "peak_tree_rss_mb": max(r["peak_tree_rss_mb"] for r in rows),
            "runs": rows}
    out["speedup_2_over_1"] = out["2"]["median_slides_per_hour"] / out["1"]["median_slides_per_hour"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=40000)
    p.add_argument("--tissue", type=float, default=0.3)
    p.add_argument("--islands", type=int, default=None,
                   help="tissue sections on the glass (default: one per ~3000² px, as in tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx", "auto"])
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--checkpoint", default="nuclei")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--keep", default=None, help="folder to keep (and reuse) the generated slide in")
    p.add_argument("--generate-only", action="store_true", help="write the slide into --keep, stop")
    p.add_argument("--skip-on", action="store_true", help="skip the tissue-detection-on run")
    p.add_argument("--skip-off", action="store_true", help="skip the tissue-detection-off run")
    p.add_argument("--off-region", type=int, nargs=4, default=None, metavar=("Y0", "Y1", "X0", "X1"),
                   help="time the tissue-off run on the cores meeting this box only, and "
                        "extrapolate to the whole slide by its area")
    p.add_argument("--on-region", type=int, nargs=4, default=None, metavar=("Y0", "Y1", "X0", "X1"),
                   help="time the tissue-on run on the cores meeting this box only, and "
                        "extrapolate to the whole slide by its tissue area")
    p.add_argument("--off-first", action="store_true", help="run the tissue-off run first")
    p.add_argument("--runtimes-check", type=int, default=0, metavar="ROUNDS",
                   help="also run the tissue-on run with torch and onnx alternately, ROUNDS times")
    p.add_argument("--workers-check", action="store_true")
    p.add_argument("--workers-size", type=int, default=2048)
    p.add_argument("--workers-slides", type=int, default=4)
    p.add_argument("--workers-rounds", type=int, default=2)
    p.add_argument("--chunk-tasks-above", type=int, default=None, metavar="CHUNKS",
                   help="workers check: slides with more tissue chunks run one task per chunk "
                        "(default: cluster.CHUNK_TASKS_ABOVE; 0 with --workers-slides 1: one "
                        "slide's chunks spread over the workers)")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    # child modes
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--region", type=int, nargs=4, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tissue-off", dest="tissue_on", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--child-workers", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-slides", nargs="+", default=None, help=argparse.SUPPRESS)
    p.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_segment(args)
    if args.child_workers:
        return child_workers(args)
    if args.generate:
        return child_generate(args)

    results_dir = Path(args.out or REPO / "benchmarks" / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_slide_"))
    keep = Path(args.keep) if args.keep else tmp
    keep.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_slide.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
    try:
        needs_slide = not (args.skip_on and args.skip_off) or args.runtimes_check
        slide, rows = slide_for(args, keep) if needs_slide else (None, {"generate": None})
        if rows["generate"]:
            g = rows["generate"]
            log(f"generated {slide}: {g['wall_s']:.0f} s, peak RSS {g['peak_tree_rss_mb']:.0f} MB")
        if args.generate_only:
            print(json.dumps(rows, indent=1))
            return 0
        runs = ([] if args.skip_on else [("tissue detection on", True, args.on_region)]) + \
            ([] if args.skip_off else [("tissue detection off", False, args.off_region)])
        if args.off_first:   # the short sampled run first, so a long run stopped late loses less
            runs.reverse()
        rows["command"] = command
        rows["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs " \
                          f"(shared), threads {args.threads}, runtime {args.runtime}"

        def save() -> None:   # after every step: a run stopped later keeps what was measured
            rows["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            name = f"slide_{args.size}{args.tag}"
            (results_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
            (results_dir / f"{name}.md").write_text(markdown(rows, args))
        for name, on, region in runs:
            log(f"{name}: start" + (f" (region {region})" if region else ""))
            r = segment_run(args, slide, tmp / ("on" if on else "off"), on, region)
            rows[name] = r
            log(f"{name}: {r['summary']}; peak RSS (process tree) {r['peak_tree_rss_mb']:.0f} MB;"
                f" load {r['load_average_1min']}")
            save()
        if args.runtimes_check:
            rows["runtimes"] = runtimes_check(args, slide, tmp)
            save()
        if args.workers_check:
            rows["workers"] = workers_check(tmp, args)
            save()
        print(markdown(rows, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _load(r: dict) -> str:
    la = r["load_average_1min"]
    return f"{la['min']:.1f} / {la['median']:.1f} / {la['max']:.1f}"


def markdown(rows: dict, args) -> str:
    g = rows.get("generate")
    lines = [f"# Whole-slide benchmark, {args.size} x {args.size} generated slide",
             "", f"Command: `{rows['command']}`", f"Machine: {rows['machine']}",
             f"Finished: {rows['finished_utc']} UTC", "",
             (f"Slide: Aperio-layout JPEG pyramid, {rows['slide_bytes'] / 1e6:.1f} MB, true tissue "
              f"{rows['true_tissue_fraction']:.1%}"
              + (f", generated in {g['wall_s']:.0f} s at a peak RSS of "
                 f"{g['peak_tree_rss_mb']:.0f} MB" if g else " (generated earlier)"))
             if "slide_bytes" in rows else "",
             "", "| run | wall s | CPU s | tissue MP | tissue MP/s | slides/hour | chunks segmented "
             "| objects | peak RSS MB (process tree) | load average (1 min: min / median / max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("tissue detection on", "tissue detection off"):
        r = rows.get(name)
        if not r:
            continue
        mp = r["region_tissue_mp"] if r.get("region") else r["tissue_mp"]
        label = name + (f", measured on region {r['region']}" if r.get("region") else "")
        lines.append(f"| {label} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {mp:.1f} | "
                     f"{mp / r['wall_s']:.3f} | {r['slides_per_hour']:.2f} | "
                     f"{r['chunks_segmented']}/{r['chunks']} | {r['objects']} | "
                     f"{r['peak_tree_rss_mb']:.0f} | {_load(r)} |")
        if r.get("extrapolated"):
            e = r["extrapolated"]
            lines.append(f"| {name}, whole slide **extrapolated** ×{e['scale']:.2f} (by tissue"
                         f" area) from {e['from_cores']} of {e['of_cores']} cores | "
                         f"~{e['wall_s']:.0f} | - | "
                         f"{r['tissue_mp']:.1f} | ~{e['tissue_mp_per_s']:.3f} | "
                         f"~{e['slides_per_hour']:.2f} | - | ~{e['objects']:.0f} | - | - |")
    for name in ("tissue detection on", "tissue detection off"):
        r = rows.get(name)
        if r and r.get("stages"):
            lines.append("")
            lines.append(f"{name}, seconds per stage: " + ", ".join(
                f"{k} {v:.0f}" for k, v in r["stages"].items()) + f"; runtime {r['runtime']}")
    if "runtimes" in rows:
        rt = rows["runtimes"]
        lines += ["", "Runtimes, tissue-on run, alternating torch / onnx:", "",
                  "| runtime | median wall s | median CPU s | runs (wall s) | objects |",
                  "|---|---|---|---|---|"]
        for k in ("torch", "onnx"):
            r = rt[k]
            lines.append(f"| {k} | {r['median_wall_s']:.1f} | {r['median_cpu_s']:.1f} | "
                         + ", ".join(f"{x:.1f}" for x in r["walls"]) + f" | {r['objects']} |")
        lines.append(f"\nonnx against torch, wall: {rt['onnx_speedup']:.2f}x")
    if "workers" in rows:
        w = rows["workers"]
        lines += ["", f"LocalCluster workers, one thread each, on {w['slide']} ({w['order']}; "
                  "worker start-up included):", "",
                  "| workers | median wall s | median slides/hour | runs (wall s) | peak RSS MB "
                  "(process tree) | load average |", "|---|---|---|---|---|---|"]
        for k in ("1", "2"):
            r = w[k]
            lines.append(f"| {k} | {r['median_wall_s']:.0f} | {r['median_slides_per_hour']:.1f} | "
                         + ", ".join(f"{x['wall_s']:.0f}" for x in r["runs"])
                         + f" | {r['peak_tree_rss_mb']:.0f} | "
                         + "; ".join(_load(x) for x in r["runs"]) + " |")
        lines.append(f"\n2 workers / 1 worker, slides per hour: {w['speedup_2_over_1']:.2f}x")
        for k in ("1", "2"):
            tasks = [(x.get("chunk_tasks") or [0]) for x in w[k]["runs"]]
            if any(sum(t) for t in tasks):
                lines.append(f"\n{k} worker(s): chunk tasks per slide "
                             + "; ".join(f"{t} on {x['chunk_workers']} worker process(es)"
                                         for t, x in zip(tasks, w[k]["runs"])))
    lines += ["", "Tissue MP/s counts the tissue area found (tissue detection on) or the whole "
              "slide (off) per second of wall time, generation excluded. CPU s is user + system "
              "time of the run's processes."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
