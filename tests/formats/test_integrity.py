"""Never write a corrupt output (issue 20, items 6 and 7; docs/guarantees.md).

A zip member whose bytes no longer match the CRC-32 the archive records is damaged: every
route that copies or reads it refuses it with exit 2 and writes nothing. Inflating a
compressed member holds a bounded piece of it in memory, whatever its size and ratio.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import bnfreeze
from bnfreeze.cli import cli

PIECE_MIB = 8  # bnfreeze.formats.integrity.PIECE
#: The bnfreeze under test (its subprocesses import the same one).
ROOT = Path(bnfreeze.__file__).resolve().parent.parent


def _flip_in_dataset(src: Path, dest: Path, dataset: str) -> Path:
    """``src`` with one bit flipped in the middle of ``dataset``'s values: the HDF5 structure
    still reads, only the member's CRC-32 tells."""
    from bnfreeze.formats.readers import read_model

    info = read_model(src).weights.locations[dataset].info()
    data = bytearray(src.read_bytes())
    data[info.offset + info.nbytes // 2] ^= 0x10
    dest.write_bytes(bytes(data))
    return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from hostile import trained_large_keras

    return trained_large_keras(tmp_path_factory.mktemp("t") / "t.keras", inputs=16, hidden=32)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("state", ["keep", "remap", "drop"])
def test_a_damaged_weights_member_is_refused(trained, tmp_path, state):
    """Each optimizer-state route copies the weights member its own way (raw, patched,
    rewritten with h5py); each refuses a member that fails its CRC-32. On main all three
    exited 0 and wrote an output whose weights member failed its CRC."""
    bad = _flip_in_dataset(trained, tmp_path / "bad.keras", "/layers/dense/vars/0")
    before = _files(tmp_path)
    out = tmp_path / "out.keras"
    args = ["freeze", str(bad), "--bn-inference", "--optimizer-state", state, "-o", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert (
        result.stderr.startswith(
            f"error: {bad}: model.weights.h5 is damaged (its bytes do not match the CRC-32 the "
            "archive records); nothing was written."
        )
        or "model.weights.h5 is damaged (Bad CRC-32" in result.stderr
    ), result.stderr
    assert _files(tmp_path) == before  # no output, no temporary file left


def test_in_place_on_a_damaged_file_leaves_it_as_it_was(samples, tmp_path):
    bad = _flip_in_dataset(
        samples / "seed_bn.keras", tmp_path / "bad.keras", "/layers/batch_normalization/vars/0"
    )
    data = bad.read_bytes()
    result = CliRunner().invoke(cli, ["freeze", str(bad), "--bn-inference", "--in-place"])
    assert result.exit_code == 2
    assert "model.weights.h5 is damaged" in result.stderr
    assert bad.read_bytes() == data
    assert _files(tmp_path) == ["bad.keras"]


def test_a_member_that_changes_during_the_copy_is_refused(samples, tmp_path, monkeypatch):
    """Another process writing the input while bnfreeze copies it: the CRC of the bytes
    actually copied tells, not the one the archive recorded before."""
    from bnfreeze.formats import integrity

    model = tmp_path / "m.keras"
    model.write_bytes((samples / "seed_bn.keras").read_bytes())
    copy = integrity.copy_range

    def writer_meanwhile(src_fd, start, count, dst_fd, out_pos):
        with open(model, "r+b") as fh:  # another process changes the member's bytes
            fh.seek(start + count // 2)
            byte = fh.read(1)
            fh.seek(start + count // 2)
            fh.write(bytes([byte[0] ^ 0xFF]))
        return copy(src_fd, start, count, dst_fd, out_pos)

    monkeypatch.setattr(integrity, "copy_range", writer_meanwhile)
    out = tmp_path / "out.keras"
    result = CliRunner().invoke(cli, ["freeze", str(model), "--bn-inference", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "is damaged (its bytes do not match the CRC-32" in result.stderr
    assert not out.exists()


def test_a_damaged_deflated_member_is_refused(samples, tmp_path):
    """A compressed member (not what Keras writes) is copied compressed; its CRC-32 is of
    the inflated bytes, checked by inflating the copy."""
    with zipfile.ZipFile(samples / "seed_bn.keras") as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    model = tmp_path / "m.keras"
    with zipfile.ZipFile(model, "w") as z:
        for name, data in members.items():
            method = zipfile.ZIP_DEFLATED if name == "metadata.json" else zipfile.ZIP_STORED
            z.writestr(name, data, compress_type=method)
        info = z.getinfo("metadata.json")
    raw = bytearray(model.read_bytes())
    # The CRC-32 field of the local header and of the central directory: both claim another
    # value, so the bytes no longer match it.
    old = info.CRC.to_bytes(4, "little")
    new = (info.CRC ^ 1).to_bytes(4, "little")
    model.write_bytes(bytes(raw).replace(old, new))
    out = tmp_path / "out.keras"
    result = CliRunner().invoke(cli, ["freeze", str(model), "--bn-inference", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "metadata.json is damaged" in result.stderr
    assert not out.exists()


def test_the_crc_is_zlibs():
    from bnfreeze.formats import integrity

    data = os.urandom(3 * integrity.PIECE // 2)
    assert integrity.crc32(data) == zlib.crc32(data)


def test_copy_range_checksums_what_it_copied(tmp_path):
    from bnfreeze.formats import integrity

    src, dst = tmp_path / "a", tmp_path / "b"
    data = os.urandom(2 * integrity.PIECE + 123)
    src.write_bytes(b"xx" + data)
    with open(src, "rb") as fi, open(dst, "w+b") as fo:
        crc = integrity.copy_range(fi.fileno(), 2, len(data), fo.fileno(), 5)
    assert crc == zlib.crc32(data)
    assert dst.read_bytes()[5:] == data


def test_a_checksum_that_fails_on_the_helper_thread_fails_the_copy(tmp_path, monkeypatch):
    """Pieces after the first are checksummed on a helper thread while the next is copied;
    an error there must reach the caller, not vanish with the thread."""
    from bnfreeze.formats import integrity

    def broken(fd, at, n, crc, view):
        if at:
            raise OSError("the output went away")
        return crc

    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(os.urandom(3 * integrity.PIECE))
    monkeypatch.setattr(integrity, "_crc_of_written", broken)
    with (
        open(src, "rb") as fi,
        open(dst, "w+b") as fo,
        pytest.raises(OSError, match="the output went away"),
    ):
        integrity.copy_range(fi.fileno(), 0, 3 * integrity.PIECE, fo.fileno(), 0)


def test_without_a_kernel_copy_each_piece_is_read_checksummed_and_written(tmp_path, monkeypatch):
    """Another file system (EXDEV) or an old kernel: the copy falls back to user space,
    after pieces the kernel already copied, and the CRC still covers every byte."""
    import errno

    from bnfreeze.formats import integrity

    calls = []
    real = os.copy_file_range

    def kernel_once(src_fd, dst_fd, count, offset_src, offset_dst):
        calls.append(offset_src)
        if len(calls) > 1:
            raise OSError(errno.EXDEV, "cross-device")
        return real(src_fd, dst_fd, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", kernel_once)
    src, dst = tmp_path / "a", tmp_path / "b"
    data = os.urandom(3 * integrity.PIECE + 7)
    src.write_bytes(b"x" + data)
    with open(src, "rb") as fi, open(dst, "w+b") as fo:
        crc = integrity.copy_range(fi.fileno(), 1, len(data), fo.fileno(), 3)
    assert len(calls) == 2
    assert crc == zlib.crc32(data)
    assert dst.read_bytes()[3:] == data


def _bomb(path: Path, samples: Path, zeros_mib: int, noise_kib: int) -> float:
    """seed_bn.keras with a deflated weights member holding ``zeros_mib`` MiB of zeros and
    some noise: a ratio just under the zip-bomb limit (200)."""
    import h5py
    import numpy as np

    with zipfile.ZipFile(samples / "seed_bn.keras") as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    buf = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buf, "r+") as h5:
        h5.create_dataset("pad/zeros", data=np.zeros(zeros_mib << 20, "u1"))
        noise = np.random.default_rng(0).integers(0, 255, noise_kib << 10, dtype="u1")
        h5.create_dataset("pad/noise", data=noise)
    members["model.weights.h5"] = buf.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            method = zipfile.ZIP_DEFLATED if name.endswith(".h5") else zipfile.ZIP_STORED
            z.writestr(name, data, compress_type=method)
        info = z.getinfo("model.weights.h5")
    return info.file_size / info.compress_size


def _peak_rss_mib(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnfreeze", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read() if proc.stderr else ""
    return usage.ru_maxrss / 1024


def test_inflating_a_member_is_capped(samples, tmp_path):
    """A 48 MiB weights member deflated about 150:1: inspect, freeze and diff hold a piece of
    it at a time (integrity.PIECE, 8 MiB), not all of it (main peaked at ~2 bytes of RSS per
    inflated byte: 843 MB for 400 MB; holding the member once would exceed the bound too)."""
    small = tmp_path / "small.keras"
    _bomb(small, samples, 1, 16)
    big = tmp_path / "big.keras"
    ratio = _bomb(big, samples, 48, 300)
    assert 100 < ratio < 200  # under the bomb limit: read, not refused
    for args in (
        ["inspect", "{}"],
        ["freeze", "{}", "--bn-inference", "-o", str(tmp_path / "o.keras")],
        ["diff", str(samples / "seed_bn.keras"), "{}"],
    ):
        base = _peak_rss_mib([str(small) if a == "{}" else a for a in args])
        peak = _peak_rss_mib([str(big) if a == "{}" else a for a in args])
        assert peak - base < 3 * PIECE_MIB, (args, base, peak)
