"""Atomic writes: a temporary file in the destination folder, verified, then
``os.replace``-d into place; fsynced first when it replaces an existing file.

An interrupted or failed run (an exception, a failed verification, Ctrl-C, SIGKILL, a full
disk) removes its temporary file, or at worst leaves a hidden one, and leaves the input and
any previous output untouched: ``os.replace`` within one folder is atomic on POSIX and
Windows, so readers see either the old file or the new one.

Durability against a crash of the whole machine (power loss, kernel panic) is what fsync
buys, and it costs a full write of the file to disk: 0.7 s for a 457 MB model here, more
than the rest of the work. It is paid where a crash could destroy data that existed before:
when the output replaces a file (``--in-place``, or ``-o`` naming an existing file), the new
file is fsynced before the rename and the folder after, so after a crash the path holds the
old file or the complete new one. A *new* output is not fsynced, like ``cp`` or Keras's own
``model.save``: a machine crash right after the run can at worst lose or truncate that new
file, never the input or anything else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from bnfreeze.errors import OutputError

T = TypeVar("T")

#: Temporary files are named ``.<output name>.<host>-<pid>-<random>.bnfreeze-tmp`` next to the
#: output: which machine and process writes it, so a later run can tell one left behind by a
#: killed process (:func:`remove_stale`).
TEMP_SUFFIX = ".bnfreeze-tmp"


#: The longest file name most file systems take (bytes).
NAME_MAX = 255


def _host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else ""


def _temp_stem(stem: str) -> str:
    """``stem`` as it appears in a temporary file's name: cut, when the output's own name is
    long, so that the whole name fits in :data:`NAME_MAX` bytes with room for any pid (10
    digits) and mkstemp's 8 random characters. The same for every process of a machine, so
    :func:`remove_stale` finds what another one left."""
    room = NAME_MAX - len(f"..{_host()}-{'9' * 10}-{'x' * 8}{TEMP_SUFFIX}".encode())
    raw = stem.encode()
    return stem if len(raw) <= room else raw[: max(room, 1)].decode("utf-8", "ignore")


def _temp_prefix(stem: str) -> str:
    return f".{_temp_stem(stem)}.{_host()}-{os.getpid()}-"


def _make_temp(folder: Path, stem: str) -> Path:
    remove_stale(folder, stem)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(stem), suffix=TEMP_SUFFIX, dir=folder)
    os.close(fd)
    return Path(name)


def remove_stale(folder: Path, stem: str) -> list[str]:
    """Remove the temporary files for ``stem`` in ``folder`` that a process of this machine
    left behind when it was killed (SIGKILL, a power cut): their process no longer exists.
    Returns their names. Files of live processes, of other machines (a shared folder) and of
    older bnfreeze versions, whose names carry no process, are left alone. POSIX only:
    elsewhere no process can be probed without side effects."""
    if os.name != "posix":
        return []
    start = f".{_temp_stem(stem)}."
    here = _host()
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        name = entry.name
        if not (name.startswith(start) and name.endswith(TEMP_SUFFIX)):
            continue
        writer = name[len(start) : -len(TEMP_SUFFIX)].rsplit("-", 2)
        if len(writer) != 3 or writer[0] != here or not writer[1].isdigit():
            continue
        if _alive(int(writer[1])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM), or anything unclear: assume alive
        return True
    return True


def resolve_destination(dest: Path) -> Path:
    """Where an output named ``dest`` is written. A symbolic link is followed to the file it
    names, as ``cp`` does: that file is replaced atomically (the temporary file is made in
    *its* folder) and the link is left as it was, so ``--in-place`` on a link edits the model
    it points to instead of replacing the link with a copy."""
    if os.path.islink(dest):
        return Path(os.path.realpath(dest))
    return dest


_SPECIAL = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def refuse_special(dest: Path, what: str = "") -> None:
    """Raise :class:`OutputError` when ``dest`` exists and is not a regular file or folder (a
    FIFO, a device, a socket): an atomic write renames a new regular file over the name, which
    would silently replace that special file instead of writing into it."""
    try:
        mode = os.stat(dest).st_mode
    except OSError:
        return  # nothing there (or unreadable): the usual checks decide
    for test, kind in _SPECIAL:
        if test(mode):
            raise OutputError(
                f"{what}{dest}: is {kind}, not a regular file; bnfreeze writes a complete new "
                "file and renames it into place, which would replace it. Nothing was written.",
                hint="Give the path of a regular file (a new one, or one to replace).",
            )


def check_destination(dest: Path) -> Path:
    """Raise :class:`OutputError` unless a file can be created at ``dest`` (after
    :func:`resolve_destination`), and ``dest`` is not a FIFO, device or socket.

    Returns the destination folder. Checks what can be checked before any work is done; the
    write itself still handles every ``OSError`` (root ignores permission bits, say).
    """
    dest = resolve_destination(dest)
    refuse_special(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        is_dir, folder_exists = dest.is_dir(), folder.exists()
    except OSError as exc:  # a folder on the way that this user may not enter
        raise OutputError(f"{dest}: cannot be written ({_describe(exc)}).") from None
    if is_dir:
        raise OutputError(f"{dest}: is a directory.", hint="Give a file name for the output.")
    if not folder_exists:
        raise OutputError(
            f"{dest}: the folder {folder} does not exist.",
            hint="Create it first, or pick another -o.",
        )
    if not folder.is_dir():
        raise OutputError(f"{dest}: {folder} is not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(
            f"{dest}: the folder {folder} is not writable (permission denied).",
            hint="Pick another -o.",
        )
    return folder


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable. Not possible on every platform (Windows): best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: How often the write-back thread flushes the file being produced (seconds).
WRITEBACK_INTERVAL = 0.02
_CANNOT_FLUSH = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


@contextlib.contextmanager
def _writing_back(path: Path) -> Iterator[None]:
    """While the body runs, a thread ``fdatasync``s ``path`` every :data:`WRITEBACK_INTERVAL`
    seconds (the call releases the GIL), so the disk writes overlap the copy instead of all
    waiting for the final fsync. Costs nothing for a small file: the first flush comes after
    the interval.

    On a clean exit the thread is stopped and joined, and its error, if any, is raised: an
    error it saw is not reported again to a later fsync. When the body raises (a failed
    verification, Ctrl-C), the thread is told to stop but not waited for; it is a daemon and
    closes its own descriptor.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield  # produce() will fail on its own, or the final fsync will
        return
    stop = threading.Event()
    failure: list[OSError] = []

    def flush() -> None:
        sync = getattr(os, "fdatasync", None) or os.fsync  # macOS and Windows lack fdatasync
        try:
            while not stop.wait(WRITEBACK_INTERVAL):
                sync(fd)
        except OSError as exc:
            # A descriptor that cannot be flushed (Windows: opened read-only) only loses the
            # overlap; a write error (EIO, ENOSPC) fails the write.
            if exc.errno not in _CANNOT_FLUSH:
                failure.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=flush, name="bnfreeze-writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
    thread.join()
    if failure:
        raise failure[0]


def _final_mode(dest: Path) -> int:
    """Keep an existing output's permission bits; else what a plain ``open()`` would give."""
    try:
        return os.stat(dest).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike[str], *, durable: bool | None = None) -> Iterator[Path]:
    """Create ``dest`` atomically: yield ``tmp``, a fresh empty file in ``dest``'s folder, for
    the body to write the complete file at (it may truncate or reopen it) and check; when the
    body ends without an error, ``tmp`` is renamed over ``dest``.

    With ``durable``, ``tmp`` is fsynced before the rename (a background thread writes its
    data to disk while the body runs) and the folder after it; ``None``, the default, means
    "when ``dest`` exists" (see the module docstring). On any failure, including
    ``KeyboardInterrupt``, ``tmp`` is removed and the exception propagates; an ``OSError``
    becomes an :class:`OutputError` written for users. A ``dest`` that is a symbolic link is
    followed (:func:`resolve_destination`); a FIFO, device or socket is refused
    (:func:`refuse_special`).
    """
    dest = resolve_destination(Path(dest))
    folder = check_destination(dest)
    if durable is None:
        durable = os.path.lexists(dest)
    try:
        tmp = _make_temp(folder, dest.name)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot create a file in {folder} ({_describe(exc)}).") from None
    try:
        # Writing a big model to disk takes longer than copying it in the page cache: a
        # thread writes the data back while it is produced and verified, so the fsync before
        # the rename has little left to do.
        with _writing_back(tmp) if durable else contextlib.nullcontext():
            yield tmp
            if durable:
                # While the write-back thread may still be in a flush: both wait for the same
                # disk writes, instead of this one starting only after that one ended.
                _fsync_path(tmp)
        os.chmod(tmp, _final_mode(dest))
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"{dest}: cannot be written ({_describe(exc)}).") from None
        raise
    if durable:
        _fsync_folder(folder)


def write_atomically(
    dest: str | os.PathLike[str],
    produce: Callable[[Path], None],
    verify: Callable[[Path], None] | None = None,
    *,
    durable: bool | None = None,
) -> int:
    """Create ``dest`` atomically (:func:`atomic_file`); return its size in bytes.

    ``produce(tmp)`` writes the complete file at ``tmp``. ``verify(tmp)`` re-reads it and
    raises if it is not what was meant (an :class:`OutputError`, say). Only then is ``tmp``
    renamed over ``dest``.
    """
    with atomic_file(dest, durable=durable) as tmp:
        produce(tmp)
        if verify is not None:
            verify(tmp)
    return Path(dest).stat().st_size


@contextlib.contextmanager
def scratch_file(folder: Path, stem: str):  # type: ignore[no-untyped-def]
    """A temporary file in ``folder`` that is always removed, for intermediate data (a
    rewritten weights file on its way into a zip, say)."""
    try:
        path = _make_temp(folder, stem)
    except OSError as exc:
        reason = _describe(exc)
        raise OutputError(f"cannot create a temporary file in {folder} ({reason}).") from None
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


class Background(Generic[T]):
    """``function(*args)`` on a thread, from ``with`` to :meth:`result`: the kernel's copy of a
    big archive runs while the caller's thread plans the rest. Leaving the ``with`` block
    waits for the thread, so nothing it writes outlives the block (an error in the block then
    propagates, and ``atomic_file`` removes the temporary file)."""

    def __init__(self, function: Callable[..., T], *args: object) -> None:
        self._value: list[T] = []
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value.append(function(*args))
            except BaseException as exc:  # re-raised by result(), on the caller's thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="bnfreeze-copy", daemon=True)

    #: While the thread runs, a thread waiting for the GIL gets it within 0.5 ms, not 5 ms:
    #: a copy needs it for a moment between pieces the kernel copies and checksums without it,
    #: and the caller's thread runs Python meanwhile (EfficientNetV2L: the copy of 1.4 GB took
    #: 913-961 ms instead of 1009-1060 ms, three runs each).
    SWITCH_INTERVAL = 0.0005

    def __enter__(self) -> Background[T]:
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, self.SWITCH_INTERVAL))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._thread.join()
        finally:
            sys.setswitchinterval(self._interval)

    def result(self) -> T:
        """What the function returned, once the ``with`` block has ended; what it raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value[0]
