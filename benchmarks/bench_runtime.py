"""Inference runtimes side by side, in one process, alternating: prints markdown tables.

    python benchmarks/bench_runtime.py [--threads 2] [--repeats 5] [--sections forward,segment,1000,train,sessions]
        [--official PATH/TO/Dual-Cross-Attention] [--openvino] (sections also: engines, profile,
        threads, coldstart, sessions, int8, train)

Sections (each timing is the median of --repeats runs; the runtimes alternate within every round,
so load from other jobs falls on all of them alike):
- forward: one batch (4 tiles of the model's tile size) through each runtime, as `predict` runs it:
  `torch` (eager, BatchNorm folded, channels_last: what ships), `onnx` (the exported graph in ONNX
  Runtime), `openvino` (the same exported file in OpenVINO, `--runtime openvino`; --openvino),
  each also as parts side by side (one thread each, what `predict` does), and for the
  paper-configuration DCA-U-Net the authors' own code (`official`, eager, same weights through
  `from_official`; --official PATH to a checkout of gorkemcanates/Dual-Cross-Attention, which needs
  einops; skipped without it). Ratios are against the eager row; max |diff| of the probabilities
  against eager torch.
- segment: the whole `napari-dca segment` (read the image, tiles, model, blending, instances,
  write the labels) on a 2048x2048 H&E image, per bundled model and runtime: the first command
  in this process, the same command again (median; in this process through
  `napari_dca.cli.main`) and a fresh process per command (median); then its two parts timed on
  their own (predict, instances) and whether the labels are the same.
- 1000: `predict` of the default (nuclei) model on a 1000x1000 H&E crop, per runtime.
  (--openvino adds the openvino runtime to the segment and 1000 sections, labels checked as onnx's.)
- coldstart: wall time of a fresh `napari-dca segment` process on a 256x256 image per runtime
  (graph cached), and of importing torch / onnxruntime alone.
- engines (--openvino): `predict` through ONNX Runtime and OpenVINO as they ship, wall and CPU
  seconds (CPU tells on a loaded machine too), and each one's labels against eager torch's.
- threads: `predict` of the 2048x2048 image with eager torch on all threads, the graph one batch
  at a time on all threads, and the graph running batches side by side on one thread each.
- profile: where the whole `segment` goes on the exported-graph path (read, setup, tiles, graph,
  predict, instances, write), per bundled model at --size and for nuclei at 1000x1000.
- sessions: settings of the graph's ONNX Runtime session (and OpenVINO with --openvino) on every
  tile of a 1024x1024 crop, one change at a time against what ships (wall and CPU seconds).
- int8: ONNX Runtime's dynamic and static int8 quantization of the nuclei graph against float32
  (speed of one batch, and how far the probabilities move).
- train: eager forward and training step of U-Net with and without DCA, ours and the official
  code's (--official), for the README's statement about DCA's cost (not an inference runtime).
The first `onnx` call of each model exports its graph into the cache (not timed; say
NAPARI_DCA_CACHE=/tmp/x to keep the user's cache clean). The CPU may be shared with other jobs:
compare ratios within one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("NAPARI_DCA_SHARED", REPO.parent / "shared"))  # the data, as in tests


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

# One loader for the benchmarks' H&E input: the first training image of the dataset, cropped or
# mirrored to the size (time_1000.py, which also records what it did).
sys.path.insert(0, str(REPO / "benchmarks"))
from time_1000 import he_image  # noqa: E402


def load_bundled(name: str):
    from src_models.checkpoints import load_checkpoint
    return load_checkpoint(name)


def paper_model():
    import torch
    from src_models import build_model
    torch.manual_seed(0)
    return build_model("unet").eval(), {"tile_size": 224}


def official_unet(path: Path):
    """The authors' DCA-U-Net at the paper configuration (random weights) and ours with the same
    weights; None when `path` is not a checkout of their code."""
    import torch
    sys.path.insert(0, str(path))
    try:
        from model.unet import Unet  # the reference's own module layout
    except ImportError as error:
        print(f"official code not usable at {path}: {error}", file=sys.stderr)
        return None
    kwargs = dict(attention=True, n=1, in_features=3, out_features=1, k=0.5, input_size=(224, 224),
                  patch_size=8, spatial_att=True, channel_att=True,
                  spatial_head_dim=[4, 4, 4, 4], channel_head_dim=[1, 1, 1, 1])
    torch.manual_seed(0)
    official = Unet(device="cpu", **kwargs).eval()
    from src_models import from_official
    ours = from_official("unet", official.state_dict(), kwargs).eval()
    return official, ours


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def alternate(functions: dict, repeats: int) -> dict[str, float]:
    """Median wall seconds of each function, the functions taking turns in every round."""
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def graph_runtimes(args) -> tuple[str, ...]:
    """The exported-graph runtimes this run times: onnx, and openvino with --openvino."""
    return ("onnx", "openvino") if args.openvino else ("onnx",)


def forward_section(args) -> list[str]:
    import torch
    from src_models.inference import ModelRunner
    cpu = torch.device("cpu")
    models = []
    for name in ("nuclei", "glands"):
        model, card = load_bundled(name)
        models.append((f"bundled `{name}`", model, card.tile_size, None))
    if args.official:
        pair = official_unet(Path(args.official))
        if pair is not None:
            models.append(("paper-config DCA-U-Net (same weights as the official)", pair[1], 224,
                           pair[0]))
    if len(models) == 2:
        model, card = paper_model()
        models.append(("paper-config DCA-U-Net", model, 224, None))

    lines = [f"one batch of {args.batch} tiles, {args.threads} threads, median of {args.repeats} "
             "alternating rounds (ms; ratio = eager torch / this)", "",
             "| model | tile | runtime | ms | speed-up over eager torch | max abs diff vs torch |",
             "|---|---|---|---|---|---|"]
    for label, model, tile, official in models:
        rng = np.random.default_rng(0)
        batch = rng.normal(0, 1, (args.batch, 3, tile, tile)).astype(np.float32)
        eager = ModelRunner(model, cpu, runtime="torch", max_batch=args.batch)
        reference = eager(batch)
        functions = {"torch (eager)": lambda: eager(batch)}
        outputs = {}
        engines = {"onnx": "onnx (ONNX Runtime)", "openvino": "openvino (OpenVINO)"}
        for runtime in graph_runtimes(args):
            fast = ModelRunner(model, cpu, runtime=runtime, max_batch=args.batch, graph_workers=1)
            side = ModelRunner(model, cpu, runtime=runtime, max_batch=args.batch,
                               graph_workers=args.threads)
            fast(batch)  # exports (or loads) the graph
            if not fast.uses_graph:
                continue
            functions[engines[runtime]] = lambda fast=fast: fast(batch)
            outputs[engines[runtime]] = fast(batch)
            if side.graph_workers > 1:   # the batch split in parts run side by side, 1 thread each
                label_side = f"{runtime}, {side.graph_workers} parts side by side"
                parts = np.array_split(batch, side.graph_workers)

                def run_side(side=side, parts=parts):
                    return np.concatenate([p for _, p in side.run_batches(enumerate(parts))])
                functions[label_side] = run_side
                outputs[label_side] = run_side()
        if official is not None:
            x = torch.from_numpy(batch)

            def run_official():
                with torch.inference_mode():
                    return torch.sigmoid(official(x)).numpy()
            functions["official code (eager)"] = run_official
            outputs["official code (eager)"] = run_official()
        for fn in functions.values():
            fn()  # warm-up
        medians = alternate(functions, args.repeats)
        base = medians["torch (eager)"]
        for runtime, seconds in medians.items():
            diff = ("-" if runtime not in outputs else
                    f"{float(np.abs(outputs[runtime] - reference).max()):.1e}")
            lines.append(f"| {label} | {tile} | {runtime} | {ms(seconds)} | {base / seconds:.2f}x | "
                         f"{diff} |")
        if official is not None and "onnx (ONNX Runtime)" in medians:
            for name in [k for k in medians if k.startswith(("onnx", "openvino"))]:
                ratio = medians["official code (eager)"] / medians[name]
                lines.append(f"| {label} | {tile} | {name} against the official code | | "
                             f"{ratio:.2f}x (goal >= 1.5x) | |")
    return lines


def segment_section(args) -> list[str]:
    """The whole `napari-dca segment` per bundled model and runtime, three ways, alternating:
    - first: the first command of this process (untimed before; the onnx one records the
      checkpoint's graph for the fast start when it is not recorded yet, and opens its session);
    - whole: the same command again, median of --repeats (what every later image of a run costs);
    - fresh process: `python -m napari_dca.cli segment ...` as a user types it (imports, torch or
      the torch-free start, model or graph loading, everything), median of --repeats;
    then its two parts on their own with one runner per runtime kept across rounds (predict,
    instances), and whether the labels are the same. whole - (predict + instances) is what
    reading, writing and the command's setup add."""
    import subprocess
    import tifffile
    from napari_dca import cli
    from src_models.inference import ModelRunner, image_layout, predict
    from src_models.instances import InstanceMaker
    import torch
    lines = [f"{args.size}x{args.size} H&E, {args.threads} threads, median of {args.repeats} "
             "alternating rounds (s)", "",
             "| model | image | runtime | first in process s | whole `segment` s | fresh process s | "
             "predict s | instances s | speed-up (whole) | speed-up (fresh process) | "
             "labels same as torch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    runtimes = ("torch",) + graph_runtimes(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for name, dataset in (("nuclei", "MoNuSeg"), ("glands", "GlaS")):
        image, source = he_image(args.size, dataset)
        model, card = load_bundled(name)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            tifffile.imwrite(tmp / "slide.tif", image)

            def command(runtime, tmp=tmp):
                return ["segment", str(tmp / "slide.tif"), "-o", str(tmp / runtime), "-c", name,
                        "--runtime", runtime, "--threads", str(args.threads), "--quiet",
                        "--overwrite"]

            def whole(runtime):
                assert cli.main(command(runtime)) == 0, f"segment --runtime {runtime} failed"

            def fresh(runtime):
                subprocess.run([sys.executable, "-m", "napari_dca.cli", *command(runtime)],
                               env=env, check=True, capture_output=True)

            probs, labels = {}, {}
            runners = {r: ModelRunner(model, torch.device("cpu"), runtime=r) for r in runtimes}

            def parts(runtime):
                t0 = time.perf_counter()
                probs[runtime] = predict(model, image, card, runner=runners[runtime])
                t1 = time.perf_counter()
                maker = InstanceMaker(probs[runtime], card, stack=image_layout(image.shape).is_stack)
                labels[runtime] = maker.labels()
                return t1 - t0, time.perf_counter() - t1

            for runtime in runtimes:  # warm-up; exports the onnx graph when it is not cached
                predict(model, image[:512, :512], card, runner=runners[runtime])
            first = {}
            for runtime in runtimes:
                start = time.perf_counter()
                whole(runtime)
                first[runtime] = time.perf_counter() - start
            whole_s = alternate({r: (lambda r=r: whole(r)) for r in runtimes}, args.repeats)
            fresh_s = alternate({r: (lambda r=r: fresh(r)) for r in runtimes}, args.repeats)
            split = {r: [] for r in runtimes}
            for _ in range(args.repeats):
                for r in runtimes:
                    split[r].append(parts(r))
            on_disk = {r: tifffile.imread(next((tmp / r).glob("*.tif"))) for r in runtimes}
        for r in runtimes:
            pred = statistics.median(p for p, _ in split[r])
            inst = statistics.median(i for _, i in split[r])
            same = np.array_equal(on_disk[r], on_disk["torch"])
            agree = float(np.mean((on_disk[r] > 0) == (on_disk["torch"] > 0)))
            n = len(np.unique(on_disk[r])) - 1
            verdict = "yes" if same else f"no: {agree:.5f} of pixels agree on foreground"
            lines.append(f"| {name} | {source} | {r} | {first[r]:.2f} | {whole_s[r]:.2f} | "
                         f"{fresh_s[r]:.2f} | {pred:.2f} | {inst:.2f} | "
                         f"{whole_s['torch'] / whole_s[r]:.2f}x (goal >= 2x) | "
                         f"{fresh_s['torch'] / fresh_s[r]:.2f}x | {verdict}; "
                         f"{n} objects; max prob diff "
                         f"{float(np.abs(probs[r] - probs['torch']).max()):.1e} |")
    return lines


def engines_section(args) -> list[str]:
    """The two exported-graph engines on the same cached file, through what ships (ModelRunner with
    runtime "onnx" / "openvino": batches side by side, one thread each): `predict` of each bundled
    model's --size H&E image and of nuclei at 1000x1000, alternating, medians of wall AND CPU
    seconds (CPU: the whole process, so it also tells on a loaded machine, where wall time is
    mostly waiting), then the instance labels of each against eager torch's (torch run once,
    untimed)."""
    import torch
    from src_models.inference import ModelRunner, predict
    from src_models.instances import InstanceMaker
    if not args.openvino:
        return ["skipped: needs --openvino"]
    cpu = torch.device("cpu")
    lines = [f"`predict`, {args.threads} threads, median of {args.repeats} alternating rounds", "",
             "| model | image | runtime | wall s | CPU s | CPU against onnx | labels same as torch | "
             "max prob diff vs torch |", "|---|---|---|---|---|---|---|---|"]
    for name, dataset, size in (("nuclei", "MoNuSeg", args.size), ("glands", "GlaS", args.size),
                                ("nuclei", "MoNuSeg", 1000)):
        image, source = he_image(size, dataset)
        model, card = load_bundled(name)
        runners = {r: ModelRunner(model, cpu, runtime=r) for r in ("onnx", "openvino")}
        for runner in runners.values():   # opens (or exports) and probes each graph
            predict(model, image[:512, :512], card, runner=runner)
        wall = {r: [] for r in runners}
        used = {r: [] for r in runners}
        probs = {}
        for _ in range(args.repeats):
            for r, runner in runners.items():
                t0, c0 = time.perf_counter(), time.process_time()
                probs[r] = predict(model, image, card, runner=runner)
                wall[r].append(time.perf_counter() - t0)
                used[r].append(time.process_time() - c0)
        probs["torch"] = predict(model, image, card, runner=ModelRunner(model, cpu, runtime="torch"))
        labels = {r: InstanceMaker(p, card).labels() for r, p in probs.items()}
        base = statistics.median(used["onnx"])
        for r in runners:
            same = np.array_equal(labels[r], labels["torch"])
            c = statistics.median(used[r])
            lines.append(f"| {name} | {source} | {r} | {statistics.median(wall[r]):.2f} | {c:.2f} | "
                         f"{c / base:.2f}x | {'yes' if same else 'no'}; "
                         f"{len(np.unique(labels[r])) - 1} objects | "
                         f"{float(np.abs(probs[r] - probs['torch']).max()):.1e} |")
    return lines


def threads_section(args) -> list[str]:
    """How the exported graph should use the threads: `predict` of a whole image (tiles, model,
    blending) with eager torch on all threads, the graph one batch at a time on all threads, and
    the graph running `--threads` batches side by side on one thread each (ModelRunner
    graph_workers); alternating, medians. The graph's outputs must be identical either way."""
    import torch
    from src_models.inference import ModelRunner, predict
    cpu = torch.device("cpu")
    n = args.threads
    lines = [f"`predict` of a {args.size}x{args.size} H&E image, {n} threads in all, median of "
             f"{args.repeats} alternating rounds (s)", "",
             "| model | torch (eager, intra-op " + str(n) + ") | onnx, 1 batch at a time, intra-op "
             + str(n) + f" | onnx, {n} batches side by side, intra-op 1 each | best onnx against "
             "torch | outputs of the two onnx ways identical |", "|---|---|---|---|---|---|"]
    for name, dataset in (("nuclei", "MoNuSeg"), ("glands", "GlaS")):
        image, _ = he_image(args.size, dataset)
        model, card = load_bundled(name)
        runners = {"torch": ModelRunner(model, cpu, runtime="torch"),
                   "onnx-1": ModelRunner(model, cpu, runtime="onnx", graph_workers=1),
                   f"onnx-{n}": ModelRunner(model, cpu, runtime="onnx", graph_workers=n)}
        outputs = {}
        for key, runner in runners.items():   # warm-up: exports / opens and probes each graph
            outputs[key] = predict(model, image[:1024, :1024], card, runner=runner)
        medians = alternate({k: (lambda r=r: predict(model, image, card, runner=r))
                             for k, r in runners.items()}, args.repeats)
        same = np.array_equal(outputs["onnx-1"], outputs[f"onnx-{n}"])
        best = min(medians["onnx-1"], medians[f"onnx-{n}"])
        lines.append(f"| {name} | {medians['torch']:.2f} | {medians['onnx-1']:.2f} | "
                     f"{medians[f'onnx-{n}']:.2f} | {medians['torch'] / best:.2f}x | "
                     f"{'yes' if same else 'no'} |")
    return lines


def coldstart_section(args) -> list[str]:
    """Wall time of a fresh `napari-dca segment` process on one small image (256x256, bundled
    nuclei, graph already cached), per runtime, and of importing torch / onnxruntime alone;
    alternating, medians. Each is a new Python process, as a user's command is."""
    import subprocess
    import tifffile
    image, source = he_image(256, "MoNuSeg")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tifffile.imwrite(tmp / "small.tif", image)

        def command(runtime):
            return [sys.executable, "-m", "napari_dca.cli", "segment", str(tmp / "small.tif"), "-o",
                    str(tmp / runtime), "-c", "nuclei", "--runtime", runtime, "--threads", "1",
                    "--quiet", "--overwrite"]
        runs = {f"segment --runtime {r}": command(r) for r in ("torch", "onnx")}
        runs["python -c 'import torch'"] = [sys.executable, "-c", "import torch"]
        runs["python -c 'import onnxruntime'"] = [sys.executable, "-c", "import onnxruntime"]
        runs["python -c 'pass'"] = [sys.executable, "-c", "pass"]
        subprocess.run(command("onnx"), env=env, check=True, capture_output=True)  # fills the cache
        medians = alternate({k: (lambda c=c: subprocess.run(c, env=env, check=True,
                                                            capture_output=True))
                             for k, c in runs.items()}, args.repeats)
        probe = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = "
                                + repr(command("onnx")[2:]) + "; "
                                "import napari_dca.cli as c; c.main(sys.argv[1:]); "
                                "print('torch' in sys.modules)"],
                               env=env, capture_output=True, text=True)
    lines = [f"a fresh process each: 256x256 ({source}), bundled nuclei, graph cached, 1 thread, "
             f"median of {args.repeats} alternating rounds (wall s)", "",
             "| command | wall s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in medians.items()]
    lines += ["", f"`segment --runtime onnx` imports torch: {probe.stdout.strip().splitlines()[-1:]}"]
    return lines


def thousand_section(args) -> list[str]:
    from src_models.inference import predict
    image, source = he_image(1000, "MoNuSeg")
    model, card = load_bundled("nuclei")
    runtimes = ("torch",) + graph_runtimes(args)
    for r in runtimes:
        predict(model, image, card, device="cpu", runtime=r)
    medians = alternate({r: (lambda r=r: predict(model, image, card, device="cpu", runtime=r))
                         for r in runtimes}, args.repeats)
    lines = [f"default model (`nuclei`), 1000x1000 ({source}), `predict` as the Segment widget "
             f"calls it, {args.threads} threads, median of {args.repeats} alternating rounds", "",
             "| runtime | s | goal |", "|---|---|---|"]
    for r in runtimes:
        lines.append(f"| {r} | {medians[r]:.2f} | <= 0.5 s |")
    return lines


def profile_section(args) -> list[str]:
    """Where a whole `segment` goes on the exported-graph path, stage by stage, each stage timed
    on its own in one process (the stages alternate within every round; medians):
    read (image_io.read_image of the TIFF), setup (a new ModelRunner: model copy, BatchNorm
    folding, the graph's key; the graph itself already open), tiles (reading, normalising and
    stacking every batch of tiles, no model), graph (every batch through the graph, batches side
    by side, inputs ready), predict (the whole `predict` with a ready runner: tiles + graph +
    blending, overlapped), instances (InstanceMaker.labels with the card's settings), write
    (write_labels + counting the objects). `predict - graph` is what the tiling and blending
    add beyond the model."""
    import torch
    import tifffile
    from src_models.image_io import read_image, write_labels
    from src_models.inference import (ModelRunner, _prepare_tile, _read_rows, predict,
                                      tile_starts)
    from src_models.instances import InstanceMaker
    cpu = torch.device("cpu")
    lines = [f"{args.threads} threads, median of {args.repeats} alternating rounds (s)", "",
             "| model | image | read | setup | tiles | graph | predict | instances | write | "
             "sum (read + setup + predict + instances + write) | graph share of the sum |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    cases = [("nuclei", "MoNuSeg", args.size), ("glands", "GlaS", args.size), ("nuclei", "MoNuSeg", 1000)]
    for name, dataset, size in cases:
        image, source = he_image(size, dataset)
        model, card = load_bundled(name)
        tile = card.tile_size
        runner = ModelRunner(model, cpu, runtime="onnx")
        predict(model, image, card, runner=runner)   # opens (or exports) the graph
        ys, xs = tile_starts(size, tile, 0.25), tile_starts(size, tile, 0.25)

        def tiles():
            out, batch = [], []
            for y in ys:
                row = _prepare_tile(_read_rows(image, predict_layout, 0, y, tile), 3,
                                    card.normalization, None)
                for x in xs:
                    batch.append(row[:, :, x:x + tile])
                    if len(batch) == 4:
                        out.append(np.stack(batch))
                        batch = []
            if batch:
                out.append(np.stack(batch))
            return out
        from src_models.inference import image_layout
        predict_layout = image_layout(image.shape)
        ready = tiles()
        prob = predict(model, image, card, runner=runner)
        labels = InstanceMaker(prob, card).labels()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "image.tif"
            tifffile.imwrite(path, image)
            from napari_dca._cli_segment import _count_ids
            stages = {
                "read": lambda: np.asarray(read_image(path)),
                "setup": lambda: ModelRunner(model, cpu, runtime="onnx")._graph((3, tile, tile)),
                "tiles": tiles,
                "graph": lambda: list(runner.run_batches(enumerate(ready))),
                "predict": lambda: predict(model, image, card, runner=runner),
                "instances": lambda: InstanceMaker(prob, card).labels(),
                "write": lambda: (write_labels(Path(tmp) / "labels.tif", labels),
                                  _count_ids(labels)),
            }
            t = alternate(stages, args.repeats)
        total = t["read"] + t["setup"] + t["predict"] + t["instances"] + t["write"]
        lines.append(f"| {name} | {source} | " + " | ".join(f"{t[k]:.3f}" for k in stages)
                     + f" | {total:.2f} | {100 * t['graph'] / total:.0f}% |")
    return lines


def sessions_section(args) -> list[str]:
    """Settings of the exported graph's session, each on every tile of a 1024x1024 H&E crop run
    as `predict` runs them (batches of 4 side by side on a pool of --threads workers, one ONNX
    Runtime thread each: what ships), one change at a time: denormals flushed to zero, graph
    optimisation EXTENDED instead of ALL (no NCHWc layout), the memory arena off, one session per
    worker instead of one shared, batches of 8, one batch at a time on --threads ONNX Runtime
    threads, and (--openvino) OpenVINO with --threads streams on the same file. Alternating,
    medians of wall and CPU seconds (CPU: the whole process, so spinning threads count); max
    |diff| of the logits against what ships."""
    import torch
    import onnxruntime as ort
    from concurrent.futures import ThreadPoolExecutor
    from src_models.inference import ModelRunner, _prepare_tile, _read_rows, image_layout, tile_starts
    level = ort.GraphOptimizationLevel
    n = args.threads
    lines = [f"every tile of a 1024x1024 crop, {n} workers, median of {args.repeats} alternating "
             "rounds", "", "| model | tiles | session | wall s | CPU s | speed-up (wall) | "
             "max abs diff of the logits |", "|---|---|---|---|---|---|---|"]
    pool = ThreadPoolExecutor(n)
    for name, dataset in (("nuclei", "MoNuSeg"), ("glands", "GlaS")):
        image, _ = he_image(1024, dataset)
        model, card = load_bundled(name)
        tile = card.tile_size
        runner = ModelRunner(model, torch.device("cpu"), runtime="onnx", graph_workers=1)
        runner(np.zeros((1, 3, tile, tile), np.float32))
        path = str(next(iter(runner.graphs.values())).path)
        starts = tile_starts(1024, tile, 0.25)
        tiles = []
        for y in starts:
            row = _prepare_tile(_read_rows(image, image_layout(image.shape), 0, y, tile), 3,
                                card.normalization, None)
            tiles += [np.ascontiguousarray(row[:, :, x:x + tile]) for x in starts]

        def batches(size):
            return [np.stack(tiles[i:i + size]) for i in range(0, len(tiles), size)]

        def session(opt=level.ORT_ENABLE_ALL, threads=1, arena=True, entries=()):
            options = ort.SessionOptions()
            options.graph_optimization_level = opt
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.enable_cpu_mem_arena = arena
            options.log_severity_level = 3
            for key, value in entries:
                options.add_session_config_entry(key, value)
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        def side_by_side(sessions, parts):
            futures = [pool.submit(sessions[i % len(sessions)].run, None, {"x": b})
                       for i, b in enumerate(parts)]
            return np.concatenate([f.result()[0] for f in futures])

        four, eight = batches(4), batches(8)
        shipped, flushed = session(), session(entries=[("session.set_denormal_as_zero", "1")])
        extended, no_arena = session(level.ORT_ENABLE_EXTENDED), session(arena=False)
        own = [session() for _ in range(n)]
        wide = session(threads=n)
        variants = {
            "what ships (ALL, 1 thread per batch, one shared session)":
                lambda: side_by_side([shipped], four),
            "denormals as zero": lambda: side_by_side([flushed], four),
            "optimisation EXTENDED": lambda: side_by_side([extended], four),
            "memory arena off": lambda: side_by_side([no_arena], four),
            "one session per worker": lambda: side_by_side(own, four),
            "batches of 8": lambda: side_by_side([shipped], eight),
            f"one batch at a time, {n} threads":
                lambda: np.concatenate([wide.run(None, {"x": b})[0] for b in four]),
        }
        if args.openvino:
            import openvino as ov
            compiled = ov.Core().compile_model(path, "CPU", {
                "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": n, "INFERENCE_NUM_THREADS": n,
                "INFERENCE_PRECISION_HINT": "f32"})

            def openvino_streams():
                queue, out = ov.AsyncInferQueue(compiled, n), [None] * len(four)
                queue.set_callback(lambda request, i: out.__setitem__(
                    i, request.get_output_tensor(0).data.copy()))
                for i, b in enumerate(four):
                    queue.start_async({0: b}, i)
                queue.wait_all()
                return np.concatenate(out)
            variants[f"OpenVINO, {n} streams"] = openvino_streams
        reference = variants[next(iter(variants))]()
        diffs = {k: float(np.abs(f() - reference).max()) for k, f in variants.items()}  # warm-up
        wall = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, f in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        base = statistics.median(wall[next(iter(variants))])
        for k in variants:
            w, c = statistics.median(wall[k]), statistics.median(cpu[k])
            lines.append(f"| {name} | {len(tiles)} of {tile} | {k} | {w:.2f} | {c:.2f} | "
                         f"{base / w:.2f}x | {diffs[k]:.1e} |")
    pool.shutdown()
    return lines


def int8_section(args) -> list[str]:
    """ONNX Runtime int8 quantization of the bundled nuclei graph against its float32 graph:
    dynamic (weights int8, activations quantized per call) and static (QDQ, activations
    calibrated on 16 tiles of MoNuSeg training images 2-9; per-channel int8 weights). One batch of
    4 tiles of the first MoNuSeg image, 1 thread each, alternating, medians; max |diff| of the
    probabilities against float32. (Whether object scores hold is only worth asking if it is
    faster.)"""
    import glob
    import imageio.v3 as iio
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from src_models.inference import ModelRunner
    from src_models.preprocess import prepare
    from src_models.runtime_onnx import open_session, probabilities
    import torch
    model, card = load_bundled("nuclei")
    runner = ModelRunner(model, torch.device("cpu"), runtime="onnx", graph_workers=1)
    tile = card.tile_size
    runner(np.zeros((1, 3, tile, tile), np.float32))
    graph = next(iter(runner.graphs.values()))
    files = sorted(glob.glob(str(SHARED / "data" / "MoNuSeg" / "train" / "images" / "*.png")))
    if len(files) < 10:
        return ["skipped: needs the MoNuSeg training images (NAPARI_DCA_SHARED)"]

    def tiles(path, n):
        x = prepare(np.asarray(iio.imread(path))[..., :3].astype(np.float32) / 255, 3,
                    card.normalization)
        corners = [(0, 0), (300, 300), (600, 100), (700, 700)]
        return [np.ascontiguousarray(x[:, y:y + tile, x0:x0 + tile]) for y, x0 in corners[:n]]
    calibration = [t for f in files[1:9] for t in tiles(f, 2)]
    batch = np.stack(tiles(files[0], 4)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": t[None]} for t in calibration])

        def get_next(self):
            return next(self.items, None)
    with tempfile.TemporaryDirectory() as tmp:
        pre, dyn, static = (str(Path(tmp) / n) for n in ("pre.onnx", "dyn.onnx", "static.onnx"))
        quant_pre_process(str(graph.path), pre)
        quantize_dynamic(pre, dyn, weight_type=QuantType.QInt8)
        quantize_static(pre, static, Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
        sessions = {"float32": open_session(graph.path, 1), "dynamic int8": open_session(dyn, 1),
                    "static int8 (QDQ)": open_session(static, 1)}
    out = {k: probabilities(s.run(None, {"x": batch})[0]) for k, s in sessions.items()}
    medians = alternate({k: (lambda s=s: s.run(None, {"x": batch})) for k, s in sessions.items()},
                        args.repeats)
    lines = [f"bundled `nuclei`, one batch of 4 tiles of {tile}, 1 thread, median of "
             f"{args.repeats} alternating rounds", "",
             "| graph | ms | speed-up over float32 | max abs prob diff vs float32 |",
             "|---|---|---|---|"]
    for k in sessions:
        lines.append(f"| {k} | {ms(medians[k])} | {medians['float32'] / medians[k]:.2f}x | "
                     f"{float(np.abs(out[k] - out['float32']).max()):.3f} |")
    return lines


def train_section(args) -> list[str]:
    """The DCA overhead claim, measured: one training step (forward, BCE loss, backward, Adam) of
    U-Net without and with DCA at the paper configuration, ours and the official code's."""
    if not args.official:
        return ["skipped: needs --official PATH"]
    import torch
    import torch.nn.functional as F
    from src_models import build_model
    pair = official_unet(Path(args.official))
    if pair is None:
        return ["skipped: the official code could not be imported"]
    from model.unet import Unet
    official_dca, ours_dca = pair
    torch.manual_seed(0)
    official_plain = Unet(device="cpu", attention=False, n=1, in_features=3, out_features=1, k=0.5,
                          input_size=(224, 224), patch_size=8)
    torch.manual_seed(0)
    ours_plain = build_model("unet", dca=False)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(0, 1, (args.batch, 3, 224, 224)).astype(np.float32))
    y = torch.from_numpy((rng.random((args.batch, 1, 224, 224)) > 0.5).astype(np.float32))

    def stepper(model):
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(x), y).backward()
            opt.step()
        return step

    def forward(model):
        def run():
            model.eval()
            with torch.inference_mode():
                model(x)
        return run

    variants = {"ours U-Net": ours_plain, "ours U-Net + DCA": ours_dca,
                "official U-Net": official_plain, "official U-Net + DCA": official_dca}
    steps = {name: stepper(m) for name, m in variants.items()}
    forwards = {name: forward(m) for name, m in variants.items()}
    for fn in list(steps.values()) + list(forwards.values()):
        fn()
    step_s = alternate(steps, args.repeats)
    forward_s = alternate(forwards, args.repeats)
    lines = [f"U-Net at the paper configuration (k = 0.5), 224², batch {args.batch}, "
             f"{args.threads} threads, eager PyTorch, median of {args.repeats} alternating rounds "
             "(ms; eval forward without BatchNorm folding, as both codes are written)", "",
             "| code | U-Net forward | U-Net + DCA forward | DCA overhead | U-Net train step | "
             "U-Net + DCA train step | DCA overhead |", "|---|---|---|---|---|---|---|"]
    for code in ("ours", "official"):
        f0, f1 = forward_s[f"{code} U-Net"], forward_s[f"{code} U-Net + DCA"]
        s0, s1 = step_s[f"{code} U-Net"], step_s[f"{code} U-Net + DCA"]
        lines.append(f"| {code} | {ms(f0)} | {ms(f1)} | {100 * (f1 / f0 - 1):+.0f}% | {ms(s0)} | "
                     f"{ms(s1)} | {100 * (s1 / s0 - 1):+.0f}% |")
    ratio_f = forward_s["official U-Net + DCA"] / forward_s["ours U-Net + DCA"]
    ratio_s = step_s["official U-Net + DCA"] / step_s["ours U-Net + DCA"]
    lines += ["", f"official / ours, U-Net + DCA: forward {ratio_f:.2f}x, train step {ratio_s:.2f}x"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4, help="tiles per forward batch")
    ap.add_argument("--size", type=int, default=2048, help="edge of the image of the segment section")
    ap.add_argument("--sections", default="forward,segment,1000")
    ap.add_argument("--official", default=None, metavar="PATH",
                    help="a checkout of gorkemcanates/Dual-Cross-Attention (optional)")
    ap.add_argument("--openvino", action="store_true", help="also time OpenVINO on the same graphs")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", FutureWarning)
    import onnxruntime
    load_start = os.getloadavg()[0]
    sections = {"forward": forward_section, "segment": segment_section, "1000": thousand_section,
                "train": train_section, "threads": threads_section, "engines": engines_section,
                "coldstart": coldstart_section, "int8": int8_section,
                "profile": profile_section, "sessions": sessions_section}
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(chosen) - set(sections)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {list(sections)}")
    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    if args.openvino:
        import openvino
        versions += f", openvino {openvino.__version__}"
    print(f"\nCPU ({os.cpu_count()} cores), {versions}, {args.threads} threads, load average "
          f"{load_start:.1f} at the start\n")
    for section in chosen:  # each table as soon as it is measured
        print("\n".join([f"### {section}", ""] + sections[section](args) + [""]), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
