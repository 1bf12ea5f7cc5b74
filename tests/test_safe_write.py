"""safe_write: a file under its final name is always complete; symlinks and inputs are never
written through."""
import os

import pytest

from src_models.safe_write import (OutputExistsError, UnsafeOutputError, check_not_input,
                                   partial_name, write_atomic, write_bytes_atomic)


def test_a_failing_writer_leaves_the_previous_file_and_no_partial(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_overwrite_false_refuses_an_existing_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"user")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_bytes_atomic(target, b"new", overwrite=False)
    assert target.read_bytes() == b"user"


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep")
    link = tmp_path / "link.txt"
    link.symlink_to(outside)
    with pytest.raises(UnsafeOutputError, match="symbolic link"):
        write_bytes_atomic(link, b"new")
    assert outside.read_bytes() == b"keep" and link.is_symlink()


def test_an_output_that_is_an_input_is_refused(tmp_path):
    src = tmp_path / "a.tif"
    src.write_bytes(b"x")
    with pytest.raises(UnsafeOutputError, match="overwrite the input"):
        check_not_input(tmp_path / "sub" / ".." / "a.tif", [src])
    check_not_input(tmp_path / "b.tif", [src])


def test_partials_of_dead_processes_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "out.bin"
    stale = partial_name(target, pid=2 ** 22 + 12345)   # no such process
    stale.write_bytes(b"half")
    mine_elsewhere = partial_name(tmp_path / "other.bin", pid=2 ** 22 + 12345)
    mine_elsewhere.write_bytes(b"half")
    write_bytes_atomic(target, b"done")
    assert target.read_bytes() == b"done" and not stale.exists() and mine_elsewhere.exists()
    assert partial_name(target).name.startswith(".") and str(os.getpid()) in partial_name(target).name
