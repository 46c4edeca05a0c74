"""bnfreeze.writers.atomic: the write-back thread that overlaps disk writes with the copy."""

from __future__ import annotations

import errno
import os
import time

import pytest

from bnfreeze.errors import OutputError
from bnfreeze.writers import atomic
from bnfreeze.writers.atomic import write_atomically


def test_the_file_is_written_back_while_it_is_produced(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "WRITEBACK_INTERVAL", 0.001)
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(atomic.os, "fdatasync", counting)

    def produce(tmp):
        tmp.write_bytes(b"x" * 4096)
        time.sleep(0.2)  # a long copy

    size = write_atomically(tmp_path / "out.bin", produce)
    assert size == 4096
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 4096
    assert calls, "no write-back happened during produce()"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_write_back_error_fails_the_write_and_leaves_nothing(tmp_path, monkeypatch):
    # An error seen by the write-back thread is not reported again to the final fsync (the
    # kernel marks it seen), so the thread itself must hand it on.
    monkeypatch.setattr(atomic, "WRITEBACK_INTERVAL", 0.001)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "fdatasync", failing)

    def produce(tmp):
        tmp.write_bytes(b"x" * 4096)
        time.sleep(0.2)

    (tmp_path / "out.bin").write_bytes(b"previous")
    with pytest.raises(OutputError, match="Input/output error"):
        write_atomically(tmp_path / "out.bin", produce)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"previous"



def test_a_descriptor_that_cannot_be_flushed_only_loses_the_overlap(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "WRITEBACK_INTERVAL", 0.001)

    def unsupported(fd: int) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(atomic.os, "fdatasync", unsupported)

    def produce(tmp):
        tmp.write_bytes(b"x" * 4096)
        time.sleep(0.1)

    assert write_atomically(tmp_path / "out.bin", produce) == 4096
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 4096
