"""Writing files so that nothing is lost and nothing is half-written: every writer in the project
goes through `write_atomic` (or its bytes/text shorthands).

    write to `.<name>.<pid>.partial` in the same folder -> fsync -> os.replace onto the final name
    -> fsync the folder

so a kill at any moment leaves either the previous file or the complete new one under the final
name, never a truncated one (a stray `.partial` file at worst; `list_images` skips dot-files and
the next write to the same name removes partials whose process is gone). A symlink at the final
path is refused rather than followed or replaced (it may point outside the output folder), and an
output that resolves to one of the run's inputs is refused (`check_not_input`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

PARTIAL_SUFFIX = ".partial"


class UnsafeOutputError(ValueError):
    """An output path that must not be written: a symlink, an input of the same run, a folder."""


class OutputExistsError(FileExistsError):
    """The output exists and the caller did not ask to overwrite it."""


def partial_name(path: Path, pid: int | None = None) -> Path:
    """The temporary name a write to `path` uses while it is incomplete."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}{PARTIAL_SUFFIX}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partials(path: Path) -> None:
    """Delete `.partial` files left for `path` by processes that no longer run (a kill -9)."""
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)):
            continue
        pid_text = name[len(prefix):-len(PARTIAL_SUFFIX)]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _process_alive(int(pid_text)):
            try:
                entry.unlink()
            except OSError:
                pass


def check_output_path(path: str | Path, overwrite: bool = True) -> Path:
    """Raise UnsafeOutputError for a symlink or folder at `path`, OutputExistsError when it exists
    and overwrite is False. Returns `path` as a Path."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafeOutputError(f"{path} is a symbolic link; refusing to write through it "
                                f"(remove the link or choose another output)")
    if path.is_dir():
        raise UnsafeOutputError(f"{path} is a folder, not a file; choose another output name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it "
                                f"(or choose another output)")
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when both paths name one file (hard links, symlinks and `..` included)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_not_input(output: str | Path, inputs: Iterable[str | Path]) -> None:
    """UnsafeOutputError when `output` is (the same file as) one of `inputs`."""
    for source in inputs:
        if same_file(output, source):
            raise UnsafeOutputError(f"the output {output} would overwrite the input {source}; "
                                    f"choose another output folder")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[Path], object], *, overwrite: bool = True,
                 mkdir: bool = True) -> Path:
    """Call write(tmp) to produce the file at a temporary name beside `path`, then move it into
    place. On any error (or KeyboardInterrupt) the temporary file is removed and `path` is
    untouched. overwrite=False: OutputExistsError if `path` exists (checked before and, without
    races that matter here, again just before the rename)."""
    path = check_output_path(path, overwrite)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = partial_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        check_output_path(path, overwrite)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes, **kwargs) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), **kwargs)


def write_text_atomic(path: str | Path, text: str, **kwargs) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), **kwargs)


class PartialFile:
    """A text file written bit by bit (memory does not grow with what is written) at a temporary
    name beside `path`; commit() fsyncs it and moves it into place, abort() removes it. The same
    checks and rename as write_atomic, for writers that stream."""

    def __init__(self, path: str | Path, *, newline: str | None = None):
        self.path = check_output_path(path)
        remove_stale_partials(self.path)
        self.tmp = partial_name(self.path)
        self.file = open(self.tmp, "w", newline=newline, encoding="utf-8")

    def commit(self) -> Path:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        check_output_path(self.path)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
