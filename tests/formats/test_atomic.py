"""bnfreeze.formats.atomic: when the output is fsynced, and the write-back thread that
overlaps those disk writes with the copy."""

from __future__ import annotations

import errno
import os
import time

import pytest

import bnfreeze
from bnfreeze.errors import OutputError
from bnfreeze.formats import atomic
from bnfreeze.formats.atomic import write_atomically


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

    (tmp_path / "out.bin").write_bytes(b"previous")  # replacing a file: durable
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

    assert write_atomically(tmp_path / "out.bin", produce, durable=True) == 4096
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 4096


class _SyncLog:
    """Records fsync/fdatasync calls, with the order of the rename among them."""

    def __init__(self, monkeypatch, folder):
        self.events: list[str] = []
        self.folder = folder
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            target = os.readlink(f"/proc/self/fd/{fd}")
            self.events.append("fsync folder" if target == str(folder) else "fsync file")
            real_fsync(fd)

        def replace(a, b):
            self.events.append("replace")
            real_replace(a, b)

        monkeypatch.setattr(atomic.os, "fsync", fsync)
        monkeypatch.setattr(atomic.os, "fdatasync", lambda fd: self.events.append("writeback"))
        monkeypatch.setattr(atomic.os, "replace", replace)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name descriptors")
def test_replacing_a_file_fsyncs_it_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    (tmp_path / "out.bin").write_bytes(b"previous")
    log = _SyncLog(monkeypatch, tmp_path)
    write_atomically(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"new"))
    assert [e for e in log.events if e != "writeback"] == ["fsync file", "replace", "fsync folder"]
    assert (tmp_path / "out.bin").read_bytes() == b"new"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name descriptors")
def test_a_new_file_is_not_fsynced(tmp_path, monkeypatch):
    # Like cp or model.save: a machine crash can lose only this new file, so the write does
    # not pay for a full disk write (0.7 s for a 457 MB model).
    log = _SyncLog(monkeypatch, tmp_path)
    write_atomically(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"new"))
    assert log.events == ["replace"]
    assert (tmp_path / "out.bin").read_bytes() == b"new"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name descriptors")
def test_durable_true_fsyncs_a_new_file_too(tmp_path, monkeypatch):
    log = _SyncLog(monkeypatch, tmp_path)
    write_atomically(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"new"), durable=True)
    assert [e for e in log.events if e != "writeback"] == ["fsync file", "replace", "fsync folder"]


def test_an_error_in_the_worker_reaches_the_caller(tmp_path):
    def produce(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="no space left"):
        write_atomically(tmp_path / "out.bin", produce)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="processes are probed on POSIX only")
def test_a_killed_run_s_temporary_file_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    host = os.uname().nodename
    names = {
        "dead": f".out.bin.{host}-{dead_pid}-abc123_x{atomic.TEMP_SUFFIX}",
        "alive": f".out.bin.{host}-{os.getppid()}-abc123_y{atomic.TEMP_SUFFIX}",
        "other host": f".out.bin.{host}x-{dead_pid}-abc123_z{atomic.TEMP_SUFFIX}",
        "old name": f".out.bin.abc123_w{atomic.TEMP_SUFFIX}",
        "other output": f".out.bin2.{host}-{dead_pid}-abc123_v{atomic.TEMP_SUFFIX}",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    write_atomically(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"new"))
    left = {p.name for p in tmp_path.iterdir()}
    assert names["dead"] not in left
    assert left == {"out.bin"} | {v for k, v in names.items() if k != "dead"}


def test_temporary_files_name_their_machine_and_process(tmp_path):
    seen = []

    def produce(tmp):
        seen.append(tmp.name)
        tmp.write_bytes(b"x")

    write_atomically(tmp_path / "out.bin", produce)
    (name,) = seen
    assert name.startswith(f".out.bin.{os.uname().nodename}-{os.getpid()}-")
    assert name.endswith(atomic.TEMP_SUFFIX)


@pytest.mark.parametrize("length", [200, 240, 255])
def test_a_long_output_name_still_gets_a_temporary_file(tmp_path, length):
    # The output's name may use all 255 bytes; the temporary file's name must fit too.
    name = "m" * (length - len(".keras")) + ".keras"
    seen = []

    def produce(tmp):
        seen.append(tmp.name)
        tmp.write_bytes(b"x")

    write_atomically(tmp_path / name, produce)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert len(seen[0].encode()) <= atomic.NAME_MAX
    assert seen[0].endswith(atomic.TEMP_SUFFIX)


@pytest.mark.skipif(os.name != "posix", reason="processes are probed on POSIX only")
def test_a_long_name_s_stale_temporary_file_is_found(tmp_path):
    import subprocess
    import sys

    name = "n" * 240 + ".keras"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = (
        f".{atomic._temp_stem(name)}.{os.uname().nodename}-{int(dead.stdout)}-"
        f"abcd1234{atomic.TEMP_SUFFIX}"
    )
    assert len(stale.encode()) <= atomic.NAME_MAX
    (tmp_path / stale).write_bytes(b"partial")
    write_atomically(tmp_path / name, lambda tmp: tmp.write_bytes(b"x"))
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize(
    "failure", [OutputError("not what was meant"), KeyboardInterrupt()], ids=type
)
def test_a_failed_verification_renames_nothing(tmp_path, existing, failure):
    """verify() sees the complete temporary file, and when it raises, nothing is renamed: the
    destination stays absent or the previous file, and the temporary file is gone."""
    out = tmp_path / "out.bin"
    if existing:
        out.write_bytes(b"previous")
    seen: list[bytes] = []

    def verify(tmp):
        seen.append(tmp.read_bytes())
        assert not out.exists() or out.read_bytes() == b"previous"  # not renamed yet
        raise failure

    with pytest.raises(type(failure)):
        write_atomically(out, lambda tmp: tmp.write_bytes(b"new"), verify)
    assert seen == [b"new"]
    assert [p.name for p in tmp_path.iterdir()] == (["out.bin"] if existing else [])
    if existing:
        assert out.read_bytes() == b"previous"


def test_a_passed_verification_renames(tmp_path):
    verified: list[str] = []
    size = write_atomically(
        tmp_path / "out.bin",
        lambda tmp: tmp.write_bytes(b"new"),
        lambda tmp: verified.append(tmp.name),
    )
    assert size == 3 and len(verified) == 1 and verified[0].endswith(atomic.TEMP_SUFFIX)
    assert (tmp_path / "out.bin").read_bytes() == b"new"


def test_a_remap_that_fails_its_check_replaces_nothing(tmp_path, monkeypatch):
    """The optimizer-state rewrite is verified before the rename: a check that fails leaves
    the previous output and the input as they were, and no temporary file."""
    import hostile

    import bnfreeze.formats.writers.keras_zip as keras_zip

    model = hostile.trained_large_keras(tmp_path / "in.keras", inputs=64, hidden=64)
    before = hostile.fingerprint(model)
    out = tmp_path / "out.keras"
    out.write_bytes(b"previous")

    def failing(*args, **kwargs):
        raise OutputError("the check failed")

    monkeypatch.setattr(keras_zip, "check_patched", failing)
    with pytest.raises(OutputError, match="the check failed"):
        bnfreeze.freeze(model, output=out, bn_inference=True)
    assert out.read_bytes() == b"previous"
    assert hostile.fingerprint(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.keras", "out.keras"]
