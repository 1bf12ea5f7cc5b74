"""`napari-dca`: command-line tools over the src_models engine.

Each subcommand is a module with `add_parser(subparsers)` (registers its argparse parser) and
`run(args) -> int` (does the work, returns the exit code). To add one, write the module and list
it in SUBCOMMANDS; modules that are not present in this installation are skipped. Parsers import
nothing heavy (no torch) so `napari-dca --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Sequence

SUBCOMMANDS: list[str] = [
    "napari_dca._cli_segment",    # segment  (inference)
    "napari_dca._cli_train",      # train    (lead)
    "napari_dca._cli_evaluate",   # evaluate (metrics)
    "napari_dca.launch",          # launch   (plugin; optional)
]


def _available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def subcommand_modules() -> list:
    """The SUBCOMMANDS modules present in this installation that expose add_parser and run."""
    modules = []
    for name in SUBCOMMANDS:
        if not _available(name):
            continue
        module = importlib.import_module(name)
        if hasattr(module, "add_parser") and hasattr(module, "run"):
            modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="napari-dca",
        description="Dual Cross-Attention U-Nets for H&E segmentation: command-line tools. "
                    "Run `napari-dca <command> --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"napari-dca {__version__}")
    parser.add_argument("--debug", dest="debug_top", action="store_true",
                        help="show Python tracebacks instead of one-line error messages")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for module in subcommand_modules():
        sub = module.add_parser(subparsers)
        if not any("--debug" in a.option_strings for a in sub._actions):
            sub.add_argument("--debug", action="store_true",
                             help="show Python tracebacks instead of one-line error messages")
        sub.set_defaults(_run=module.run)
    return parser


# Exceptions that mean "the user's input or options are wrong": one line, exit code 2.
def _user_error_types() -> tuple[type[BaseException], ...]:
    # OSError: unreadable files, full disks, permissions - the environment, not a bug
    return (ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug_top", False) or getattr(args, "debug", False))
    prog = f"napari-dca {args.command}"
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print(f"{prog}: error: out of memory; try a smaller --tile/--batch or a smaller image",
              file=sys.stderr)
        return 1
    except _user_error_types() as err:
        if debug:
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: say so in one line, traceback with --debug
        if debug:
            raise
        print(f"{prog}: error: {type(err).__name__}: {one_line(err)} (this is a bug; rerun with "
              f"--debug for the traceback and report it)", file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    """An exception's message on one line (a missing file's errno prefix kept short)."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
