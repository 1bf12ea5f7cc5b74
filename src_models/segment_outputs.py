"""Where a batch segmentation writes each image's results, decided before any work is done.

Naming rule (the input's full file name is kept, so inputs that share a stem never collide):

    <OUTDIR>/<input file name>.labels.tif     instance labels      e.g. slide.png -> slide.png.labels.tif
    <OUTDIR>/<input file name>.prob.tif       probabilities        (with save_prob)

`plan_outputs` refuses, before anything is computed, a batch in which two inputs would write the
same output (two folders both holding x.png), an output that is one of the inputs, and a symlink at
an output path. An image whose requested outputs all exist is skipped unless `overwrite`, so a rerun
after a kill resumes where it stopped (every file under a final name is complete: they are written
through safe_write). The slide pipeline and the command line share this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .image_io import OUTPUT_SUFFIXES
from .safe_write import UnsafeOutputError, check_not_input, check_output_path, same_file

LABELS_SUFFIX, PROB_SUFFIX = OUTPUT_SUFFIXES


def output_path(source: str | Path, out_dir: str | Path, kind: str = "labels") -> Path:
    """The output file of `kind` ("labels" or "prob") for the input `source`."""
    suffix = {"labels": LABELS_SUFFIX, "prob": PROB_SUFFIX}[kind]
    return Path(out_dir) / f"{Path(source).name}{suffix}"


def source_stem(output: str | Path) -> str:
    """The stem of the input an output was made from: x.png.labels.tif -> x (other names: their stem)."""
    name = Path(output).name
    for suffix in OUTPUT_SUFFIXES:
        if name.lower().endswith(suffix):
            return Path(name[:-len(suffix)]).stem
    return Path(name).stem


@dataclass
class ImageJob:
    """One input and the outputs it still needs (`todo`: kind -> path; empty when done)."""
    source: Path
    outputs: dict[str, Path]
    todo: dict[str, Path] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return not self.todo


def plan_outputs(images: Iterable[str | Path], out_dir: str | Path, *, save_prob: bool = False,
                 overwrite: bool = False) -> list[ImageJob]:
    """One ImageJob per image, in order. UnsafeOutputError (one line saying what to change) for a
    collision between two inputs, an output that is an input, or a symlink/folder at an output."""
    images = [Path(p) for p in images]
    kinds = ("labels", "prob") if save_prob else ("labels",)
    jobs, claimed = [], {}
    input_names = {p.name for p in images}
    for source in images:
        outputs = {kind: output_path(source, out_dir, kind) for kind in kinds}
        for path in outputs.values():
            key = str(path.resolve()) if path.parent.exists() else str(path.absolute())
            if key in claimed and not same_file(claimed[key], source):
                raise UnsafeOutputError(f"{claimed[key]} and {source} would both write {path}; "
                                        f"segment them into different -o folders (or rename one)")
            claimed[key] = source
            if path.exists() and path.name in input_names:
                check_not_input(path, images)
            check_output_path(path, overwrite=True)
        todo = {kind: path for kind, path in outputs.items() if overwrite or not path.exists()}
        jobs.append(ImageJob(source, outputs, todo))
    # The same file given twice (a file and its folder): segment it once.
    unique, seen = [], set()
    for job in jobs:
        st = job.source.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        unique.append(job)
    return unique
