"""Never write a corrupt output: zip members are checked against their CRC-32 as they are
copied, and inflated a bounded piece at a time.

A `.keras` archive records each member's CRC-32. A member whose bytes no longer match it (a
flipped bit on disk, another process writing the file while bnfreeze copies it) is damaged:
Keras's own loader refuses it (``zipfile`` raises "Bad CRC-32" on the last read). bnfreeze
copies most members byte for byte, so it must not trust the recorded CRC: it computes the
CRC-32 of the bytes it actually copied, *while* copying (:func:`copy_range`: the kernel
copies a piece, the piece is read back from the output and checksummed), and refuses the
input when it differs (:func:`damaged`, exit 2, nothing written).

The CRC runs at copy speed: ISA-L's CRC-32 (``isal``, about 9 GB/s on one core here) when it
is installed, else zlib's (about 1.7 GB/s). Both release the GIL.

Memory: a member is inflated (or checksummed) :data:`PIECE` bytes at a time
(:func:`check_member`, :func:`inflate_to`), so checking or unpacking a member of any size
or compression ratio holds at most one piece of its inflated bytes (docs/guarantees.md).
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
import zipfile
from collections.abc import Callable
from typing import IO

from bnfreeze.errors import ModelFormatError
from bnfreeze.limits import INFLATE_PIECE

try:  # ISA-L: the same CRC-32, 5x faster
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # the fast extra is not installed: zlib's CRC-32, the same check
    from zlib import crc32 as _crc32

crc32: Callable[..., int] = _crc32

#: copy_file_range errors that only mean "not here": copy in user space instead.
_NO_KERNEL_COPY = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF}
)

#: The most inflated (or copied-then-checksummed) bytes of one member held at a time.
PIECE = INFLATE_PIECE


def damaged(source: str | os.PathLike[str], member: str, why: str = "") -> ModelFormatError:
    """The error for a member whose bytes do not match the CRC-32 the archive records."""
    detail = why or "its bytes do not match the CRC-32 the archive records"
    return ModelFormatError(
        f"{os.fspath(source)}: {member} is damaged ({detail}); nothing was written.",
        hint="Restore the file from a backup or save the model again; if another program "
        "is writing it, wait until it is done.",
    )


def copy_range(src_fd: int, start: int, count: int, dst_fd: int, out_pos: int) -> int:
    """Copy ``count`` bytes at ``start`` of ``src_fd`` to ``out_pos`` of ``dst_fd``; return the
    CRC-32 of the bytes written.

    ``os.copy_file_range`` copies a piece in the kernel, then that piece of the output is
    mapped (from the page cache) and checksummed: what is checked is what the output holds,
    not what the input claimed. The checksum of one piece runs on another thread while the
    kernel copies the next (both release the GIL), so on two cores the check adds about one
    piece's checksum to the copy's time. Without ``copy_file_range`` (another OS, another file
    system) each piece is read, checksummed and written. Raises :class:`ModelFormatError` when
    the input ends early.
    """
    buf = bytearray(min(PIECE, max(count, 1)))
    view = memoryview(buf)
    done = 0
    with _Checksums(dst_fd, view, threaded=count > PIECE) as sums:
        while done < count:
            want = min(PIECE, count - done)
            n = 0
            if sums.kernel:
                n = _kernel_copy(src_fd, dst_fd, want, start + done, out_pos + done)
            if n:
                sums.add(out_pos + done, n)
            else:
                sums.kernel = False  # a cross-device copy, an old kernel: copy it ourselves
                n = _user_copy(src_fd, dst_fd, view[:want], start + done, out_pos + done, sums)
            done += n
    return sums.crc & 0xFFFFFFFF


def _kernel_copy(src_fd: int, dst_fd: int, want: int, at: int, out_at: int) -> int:
    """``os.copy_file_range``, or 0 where the kernel cannot copy between these files."""
    if not hasattr(os, "copy_file_range"):
        return 0
    try:
        return os.copy_file_range(src_fd, dst_fd, want, at, out_at)
    except OSError as exc:
        if exc.errno not in _NO_KERNEL_COPY:
            raise  # a full disk, an I/O error: the write fails
        return 0


def _user_copy(
    src_fd: int, dst_fd: int, view: memoryview, at: int, out_at: int, sums: _Checksums
) -> int:
    """Read a piece into ``view``, checksum it, write it; return its size."""
    sums.join()  # ``view`` may still be the buffer of a piece being checksummed
    n = os.preadv(src_fd, [view], at)
    if n == 0:
        raise ModelFormatError("the input archive is truncated.")
    sums.crc = crc32(view[:n], sums.crc)
    written = 0
    while written < n:  # a short write is retried: a full disk then raises ENOSPC
        written += os.pwrite(dst_fd, view[written:n], out_at + written)
    return n


class _Checksums:
    """The running CRC-32 of the pieces written, folded in order. With ``threaded``, the
    pieces are checksummed in order on one helper thread while the caller copies the next."""

    def __init__(self, fd: int, view: memoryview, *, threaded: bool) -> None:
        self.fd, self.view, self.crc, self.kernel = fd, view, 0, True
        self._queue: queue.SimpleQueue[tuple[int, int] | None] | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        if threaded:
            self._queue = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._fold_all, daemon=True)
            self._worker.start()

    def __enter__(self) -> _Checksums:
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()

    def add(self, at: int, n: int) -> None:
        """Fold the ``n`` bytes now at ``at`` of the output into the CRC (maybe later)."""
        if self._queue is None:
            self.crc = _crc_of_written(self.fd, at, n, self.crc, self.view)
        else:
            self._queue.put((at, n))

    def _fold_all(self) -> None:
        assert self._queue is not None
        while (piece := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.crc = _crc_of_written(self.fd, *piece, self.crc, self.view)
                except BaseException as exc:  # re-raised on the caller's thread by join()
                    self._error = exc

    def join(self) -> None:
        """Wait until every piece added is folded in; raise what the helper thread raised."""
        if self._worker is not None and self._queue is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = self._queue = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _crc_of_written(fd: int, at: int, n: int, crc: int, view: memoryview) -> int:
    """Fold the ``n`` bytes at ``at`` of ``fd`` into ``crc``. They are mapped from the page
    cache (``mmap``: about a quarter of the CPU time of reading them into a buffer, measured
    on a 284 MB checkpoint); read into ``view`` where mapping is not possible."""
    if _MAP_FLAGS is not None:
        base = at - at % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(
                fd, n + at - base, flags=_MAP_FLAGS, prot=mmap.PROT_READ, offset=base
            )
        except (OSError, ValueError):
            pass
        else:
            with mapped, memoryview(mapped) as whole:
                return crc32(whole[at - base : at - base + n], crc)
    if os.preadv(fd, [view[:n]], at) != n:
        raise OSError("short read of the output")
    return crc32(view[:n], crc)


_MAP_FLAGS = (
    mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0) if hasattr(mmap, "PROT_READ") else None
)


def check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> None:
    """Raise :func:`damaged` unless ``info``'s data inflates to its recorded size and CRC-32,
    reading :data:`PIECE` bytes at a time (``zipfile`` checks the CRC at the end)."""
    try:
        with archive.open(info) as fh:
            while fh.read(PIECE):
                pass
    except zipfile.BadZipFile as exc:
        raise damaged(source, info.filename, str(exc)) from None
    except (OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise damaged(source, info.filename, str(exc)) from None
    except Exception as exc:  # zlib.error and friends
        raise damaged(source, info.filename, str(exc)) from None


def inflate_to(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, dst: IO[bytes], source: str, limit: int
) -> int:
    """Inflate member ``info`` into ``dst``, :data:`PIECE` bytes at a time, checking its
    CRC-32; refuse it when it inflates past ``limit`` or its recorded size. Returns the size."""
    total = 0
    try:
        with archive.open(info) as fh:
            while True:
                piece = fh.read(PIECE)
                if not piece:
                    break
                total += len(piece)
                if total > min(limit, info.file_size):
                    raise ModelFormatError(
                        f"{source}: {info.filename} is larger than it claims; refusing it."
                    )
                dst.write(piece)
    except ModelFormatError:
        raise
    except Exception as exc:  # BadZipFile (bad CRC-32), zlib.error, EOFError...
        raise damaged(source, info.filename, str(exc)) from None
    return total
