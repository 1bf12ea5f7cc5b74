"""Bounds for numeric command-line options: a value outside them is refused (or clamped, where
that is harmless) with one line saying the bound and why it exists."""
from __future__ import annotations

import math
import sys


def check_range(option: str, value: float, low: float | None, high: float | None, why: str) -> float:
    """ValueError unless low <= value <= high (and finite)."""
    if value is None or not math.isfinite(value) or (low is not None and value < low) \
            or (high is not None and value > high):
        bounds = (f"between {low:g} and {high:g}" if low is not None and high is not None
                  else f"at least {low:g}" if low is not None else f"at most {high:g}")
        raise ValueError(f"{option} must be {bounds} ({why}); got {value}")
    return value


def bounded_int(option: str, value: int, low: int | None, high: int | None, why: str,
                clamp_high: bool = False) -> int:
    """`value` if within [low, high]; above `high` with clamp_high: `high`, with a note on stderr;
    otherwise ValueError."""
    if clamp_high and high is not None and value > high:
        print(f"note: {option} {value} lowered to {high} ({why})", file=sys.stderr)
        return high
    check_range(option, value, low, high, why)
    return int(value)


MAX_INFERENCE_TILE = 4096   # a 4096 px tile of a light model already needs ~1 GB of activations


def check_inference_options(args) -> None:
    """The bounds of the options `segment` and `evaluate` share (--overlap, --tile, --threshold,
    --min-size, --threads); clamps --tile and --threads in `args`, ValueError for the rest."""
    import os

    from src_models.card_schema import MAX_OVERLAP   # the bound a card's own overlap has
    if args.overlap is not None:  # None: the checkpoint's own
        check_range("--overlap", args.overlap, 0.0, MAX_OVERLAP,
                    "tiles sharing more than 90% multiply the work by over 100")
    if args.tile is not None:
        args.tile = bounded_int("--tile", args.tile, 32, MAX_INFERENCE_TILE,
                                "the model needs 32 px of context; larger tiles only use more memory")
    if args.threshold is not None:
        check_range("--threshold", args.threshold, 0.0, 1.0, "it is a probability")
    if args.min_size is not None:
        bounded_int("--min-size", args.min_size, 0, None, "it is a number of pixels")
    if args.threads is not None:
        args.threads = bounded_int("--threads", args.threads, 1, os.cpu_count() or 1,
                                   "torch cannot use more threads than CPUs usefully", clamp_high=True)
