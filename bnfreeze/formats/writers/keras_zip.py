"""Writer for the Keras 3 `.keras` zip archive, without TensorFlow.

Only ``config.json`` is rewritten, serialized as Keras serializes it (``json.dumps`` with its
defaults). Every other member (``metadata.json``, ``model.weights.h5``, ``assets/...``) is
copied byte-for-byte *as stored*: its raw, possibly compressed bytes are copied from the
input with the same CRC, sizes, compression, timestamp and attributes, in the same order.
The copy streams (``os.copy_file_range`` where the OS has it, else 8 MiB pieces), so memory
does not grow with the file size; a large member's local header is padded so that its bytes
keep their offset within a page (:func:`local_header`).

When asked to rewrite the saved optimizer state (``WriteRequest.optimizer_slots``: the
remapped list, or an empty one to drop it; README, "Saved optimizer state"),
``model.weights.h5`` is copied the same way, then a few addresses are patched and the new
``/optimizer/vars`` group is appended (:mod:`bnfreeze.formats.writers._hdf5_edit`): no h5py,
every other byte where it was, memory flat in the file size. Its CRC-32 is derived from the
input's without reading the copied bytes, and :meth:`KerasZipWriter.verify` proves the result
without reading every value: it indexes the output with the lean HDF5 reader and checks that
every dataset sits at the same offset with the same type and shape as in the input (or, for a
new slot, that it is shaped like its variable and zero), comparing the first and last bytes of
each. Dropped slots keep their bytes in the file, unreferenced.

Files that path does not handle (a compressed weights member, or an HDF5 layout h5py does not
write by default) are dropped the old way: ``model.weights.h5`` is rewritten with h5py, every
group, dataset and attribute copied except the top-level ``optimizer`` group, and compared
value by value. Keras 3.15 then compiles the loaded model from its ``compile_config`` with a
fresh optimizer, printing once "Skipping variable loading for optimizer '<name>', because it
has N variables whereas the saved optimizer has 0 variables." (measured; an empty
``optimizer/vars`` group gives the same message). Optimizer groups of nested models
(``layers/<name>/optimizer``) are never loaded by Keras and are kept as they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bnfreeze.errors import ModelFormatError, OutputError
from bnfreeze.formats import integrity
from bnfreeze.formats.atomic import scratch_file
from bnfreeze.formats.readers._keras_common import CONFIG, WEIGHTS, MemberFile
from bnfreeze.formats.readers.keras_zip import stored_member
from bnfreeze.formats.writers import WriteOutcome, WriteRequest, verify_config_bytes
from bnfreeze.formats.writers._hdf5_edit import Rewrite
from bnfreeze.formats.writers.weights_check import (
    CHUNK,
    OPTIMIZER_GROUP,
    check_patched,
    compare_weights,
)
from bnfreeze.model.records import ModelFormat

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_MAGIC = b"PK\x03\x04"
_ZIP64_EXTRA = 0x0001
_DATA_DESCRIPTOR = 0x08

#: A member at least this large is written with its bytes at the same offset within a page
#: as in the input, by a padding record in its local header's extra field (the record
#: Android's zipalign writes: ``0xD935``, the alignment, zeros; zip readers skip it). The
#: kernel then copies whole pages: measured on EfficientNetV2L's 1.4 GB weights member,
#: a copy 3 bytes off its input's page offset took about 25% longer than one aligned.
ALIGN_FROM = 8 << 20
_PAGE = 4096
_ALIGN_RECORD = 0xD935


def serialize_config(config: dict[str, Any]) -> bytes:
    """``config.json`` as Keras writes it: ``json.dumps(config).encode()``."""
    return json.dumps(config).encode()


# -- raw member access -------------------------------------------------------------------


def data_offset(fh: IO[bytes], info: zipfile.ZipInfo) -> int:
    """Where a member's (possibly compressed) bytes start in the archive file."""
    fh.seek(info.header_offset)
    header = fh.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_MAGIC:
        raise ModelFormatError(f"{info.filename}: damaged local header in the archive.")
    fields = _LOCAL_HEADER.unpack(header)
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


@contextlib.contextmanager
def open_weights(path: Path, info: zipfile.ZipInfo, scratch_folder: Path) -> Iterator[Any]:
    """An open ``h5py.File`` on a `.keras` archive's weights member, read-only."""
    import h5py

    if info.compress_type == zipfile.ZIP_STORED:
        # Read in place, through the same bounded view the readers use.
        member = stored_member(path, info)
        with open(path, "rb") as fh, h5py.File(MemberFile(fh.fileno(), member), "r") as h5:
            yield h5
        return
    # A compressed member (not what Keras writes): inflate it to a scratch file, streaming.
    with scratch_file(scratch_folder, "weights") as tmp:
        with zipfile.ZipFile(path) as archive, archive.open(info) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        with h5py.File(tmp, "r") as h5:
            yield h5


def _strip_zip64(extra: bytes) -> bytes:
    """The extra field without zip64 records, which zipfile writes itself when needed."""
    out, i = bytearray(), 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack("<HH", extra[i : i + 4])
        if tag != _ZIP64_EXTRA:
            out += extra[i : i + 4 + size]
        i += 4 + size
    return bytes(out)


def local_header(new: zipfile.ZipInfo, zip64: bool, at: int, start: int) -> bytes:
    """``new``'s local header written at ``at``, padded (when the member is large) so that
    its bytes start at ``start``'s offset within a page (:data:`ALIGN_FROM`). Only the local
    header carries the padding: the central directory keeps the member's own extra field."""
    header = new.FileHeader(zip64)
    pad = (start - (at + len(header))) % _PAGE
    if new.compress_size < ALIGN_FROM or pad == 0:
        return header
    if pad < 6:  # the record's own 4 bytes and its 2-byte alignment
        pad += _PAGE
    own = new.extra
    new.extra = own + struct.pack("<HHH", _ALIGN_RECORD, pad - 4, _PAGE) + bytes(pad - 6)
    try:
        return new.FileHeader(zip64)
    finally:
        new.extra = own


def clone_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A fresh ZipInfo with the member's name, timestamp, compression and attributes."""
    new = zipfile.ZipInfo(info.filename, info.date_time)
    new.compress_type = info.compress_type
    new.comment = info.comment
    new.extra = _strip_zip64(info.extra)
    new.create_system = info.create_system
    new.create_version = info.create_version
    new.extract_version = info.extract_version
    new.external_attr = info.external_attr
    new.internal_attr = info.internal_attr
    new.flag_bits = info.flag_bits & ~(_DATA_DESCRIPTOR | 0x800)
    new.file_size = info.file_size
    return new


def _copy_range(src: IO[bytes], start: int, count: int, dst: IO[bytes]) -> int:
    """Copy ``count`` bytes at ``start`` of ``src`` to ``dst``'s current position; return the
    CRC-32 of the bytes copied, computed while copying (:func:`integrity.copy_range`)."""
    dst.flush()
    out_pos = dst.tell()
    crc = integrity.copy_range(src.fileno(), start, count, dst.fileno(), out_pos)
    dst.seek(out_pos + count)
    return crc


def copy_raw(src: IO[bytes], info: zipfile.ZipInfo, zout: zipfile.ZipFile) -> None:
    """Append ``info``'s stored bytes to ``zout`` unchanged: same CRC, sizes, compression."""
    start = data_offset(src, info)
    new = clone_info(info)
    new.CRC = info.CRC
    new.compress_size = info.compress_size
    new.file_size = info.file_size
    fp = zout.fp
    assert fp is not None
    new.header_offset = fp.tell()
    zip64 = info.file_size > zipfile.ZIP64_LIMIT or info.compress_size > zipfile.ZIP64_LIMIT
    fp.write(local_header(new, zip64, new.header_offset, start))
    crc = _copy_range(src, start, info.compress_size, fp)
    if info.compress_type == zipfile.ZIP_STORED and crc != info.CRC:
        # A deflated member's CRC is of its inflated bytes: verify() inflates the copy.
        raise integrity.damaged(src.name, info.filename)
    # What ZipFile.write() does after writing a member, minus recompressing it.
    zout.filelist.append(new)
    zout.NameToInfo[new.filename] = new
    zout.start_dir = fp.tell()
    zout._didModify = True  # type: ignore[attr-defined]  # private, set by ZipFile.write()


def copy_file_into(zout: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    """Stream a file on disk into ``zout`` as member ``info`` (its own compression)."""
    size = path.stat().st_size
    info.file_size = size
    zip64 = size > zipfile.ZIP64_LIMIT
    with open(path, "rb") as src, zout.open(info, "w", force_zip64=zip64) as dst:
        shutil.copyfileobj(src, dst, CHUNK)


# -- weights without optimizer state -----------------------------------------------------


def drop_optimizer(h5_in: Any, out_path: Path) -> int:
    """Copy an open Keras 3 weights file to ``out_path`` without its top-level optimizer
    group; return how many optimizer variables were left out."""
    import h5py

    dropped = 0
    opt = h5_in.get(f"{OPTIMIZER_GROUP}/vars")
    if isinstance(opt, h5py.Group):
        dropped = len(opt)
    with h5py.File(out_path, "w") as h5_out:
        for key, value in h5_in.attrs.items():
            h5_out.attrs[key] = value
        for key in h5_in:
            if key == OPTIMIZER_GROUP:
                continue
            h5_in.copy(h5_in[key], h5_out, name=key)
    return dropped


# -- weights with a rewritten optimizer state, without h5py ------------------------------


def _slots(request: WriteRequest) -> tuple[Any, ...] | None:
    """The new optimizer variable list asked for (empty: drop), None to copy them as they
    are. Only a file that holds saved optimizer variables is rewritten."""
    if not request.model.optimizer_variables:
        return None
    if request.optimizer_slots is not None:
        return request.optimizer_slots
    return () if request.drop_optimizer_state else None


def _plan_rewrite(path: Path, info: zipfile.ZipInfo, slots: Any) -> Rewrite | None:
    """How to patch the stored weights member, or None when only h5py can rewrite it."""
    from bnfreeze.formats.readers import _hdf5
    from bnfreeze.formats.writers._hdf5_edit import plan_rewrite

    if info.compress_type != zipfile.ZIP_STORED:
        return None
    member = stored_member(path, info)
    with open(path, "rb") as fh:
        try:
            return plan_rewrite(_hdf5.ByteSource(fh.fileno(), member.start, member.size), slots)
        except _hdf5.Unsupported:
            return None


def copy_patched(
    src: IO[bytes], info: zipfile.ZipInfo, zout: zipfile.ZipFile, plan: Rewrite
) -> None:
    """Append ``info`` to ``zout`` as ``plan`` rewrites it: the stored bytes copied by the
    kernel, the patches written over them, the tail appended (:func:`_patch_in_place`);
    CRC-32 worked out, not read."""
    if info.file_size != plan.copy_bytes:
        raise OutputError(f"{WEIGHTS} changed size while it was read; nothing was replaced.")
    start = data_offset(src, info)
    new = clone_info(info)
    new.CRC = _patched_crc(info, plan)  # the local header carries it: worked out first
    new.compress_size = new.file_size = plan.size
    fp = zout.fp
    assert fp is not None
    new.header_offset = fp.tell()
    fp.write(local_header(new, plan.size > zipfile.ZIP64_LIMIT, new.header_offset, start))
    fp.flush()
    body = fp.tell()
    if _copy_range(src, start, info.compress_size, fp) != info.CRC:
        raise integrity.damaged(src.name, info.filename)  # the patches' CRC builds on it
    fp.flush()
    _patch_in_place(fp.fileno(), body, body + info.compress_size, plan)
    fp.seek(body + plan.size)
    zout.filelist.append(new)
    zout.NameToInfo[new.filename] = new
    zout.start_dir = fp.tell()
    zout._didModify = True  # type: ignore[attr-defined]  # rewrite the central directory on close


def _pwrite_all(fd: int, data: bytes, at: int) -> int:
    """Write all of ``data`` at ``at`` (a short write is retried: a full disk then raises
    ENOSPC); return where it ends."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], at + done)
    return at + done


def _patched_crc(w_in: zipfile.ZipInfo, plan: Rewrite) -> int:
    """The CRC-32 of the weights member ``w_in`` once ``plan`` has patched and extended it,
    worked out from ``w_in``'s own CRC-32 (no byte read)."""
    from bnfreeze.formats.writers._hdf5_edit import patched_crc32, tail_crc32

    return tail_crc32(patched_crc32(w_in.CRC, w_in.file_size, plan.patches), plan.tail)


def _patch_in_place(fd: int, start: int, end: int, plan: Rewrite) -> None:
    """Patch the weights member copied raw at ``start`` (its data ends at ``end``, the file
    too) as ``plan`` says, and append its tail."""
    os.ftruncate(fd, end)
    for patch in plan.patches:
        _pwrite_all(fd, patch.new, start + patch.offset)
    at = end
    zeros = bytes(CHUNK)
    for part in plan.tail:
        if isinstance(part, bytes):
            at = _pwrite_all(fd, part, at)
            continue
        left = part
        while left:
            n = min(left, CHUNK)
            at = _pwrite_all(fd, zeros[:n], at)
            left -= n


# -- the writer ----------------------------------------------------------------------------


def _infos(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    return archive.infolist()


class KerasZipWriter:
    """Writes an edited `.keras` archive; see the module docstring."""

    format = ModelFormat.KERAS

    def __init__(self) -> None:
        # write() and verify() of one request serialize the same config: do it once (2 MB of
        # JSON for EfficientNetV2L), and check its flags once. Keyed by the request itself,
        # which is immutable; write() may run in a worker thread while prepare() runs.
        self._lock = threading.Lock()
        self._last: tuple[WriteRequest, bytes] | None = None
        self._checked: WriteRequest | None = None
        self._rewrite: tuple[WriteRequest, Rewrite | None] | None = None

    def _rewrite_for(self, request: WriteRequest, info: zipfile.ZipInfo) -> Rewrite | None:
        """The weights rewrite ``request`` asks for, planned once per request (write() and
        verify() need the same one; it is metadata work, ~0.2 s for EfficientNetV2L)."""
        with self._lock:
            if self._rewrite is not None and self._rewrite[0] is request:
                return self._rewrite[1]
        plan = _plan_rewrite(Path(request.model.path), info, _slots(request) or ())
        with self._lock:
            self._rewrite = (request, plan)
        return plan

    def _config_bytes(self, request: WriteRequest) -> bytes:
        with self._lock:
            if self._last is None or self._last[0] is not request:
                self._last = (request, serialize_config(request.config))
            return self._last[1]

    def prepare(self, request: WriteRequest) -> None:
        """Check the new ``config.json`` in memory (every layer's flag, the compile config),
        so verify() only has to find those exact bytes in the file."""
        if self._checked is not request:
            verify_config_bytes(request, self._config_bytes(request))
            self._checked = request

    def write(self, request: WriteRequest, dest: Path) -> WriteOutcome:
        source = Path(request.model.path)
        config = self._config_bytes(request)
        dropped = 0
        with contextlib.ExitStack() as stack:
            zin = stack.enter_context(zipfile.ZipFile(source))
            raw = stack.enter_context(open(source, "rb"))
            infos = _infos(zin)
            # The entry Keras would read, should a damaged archive hold two of that name.
            weights = zin.getinfo(WEIGHTS) if WEIGHTS in zin.namelist() else None
            rewritten: Path | None = None
            patched: Rewrite | None = None
            slots = _slots(request)
            if slots is not None and weights is not None:
                patched = self._rewrite_for(request, weights)
                dropped = (request.model.optimizer_variables or 0) if not slots else 0
            if slots is not None and weights is not None and patched is None:
                if slots:
                    raise OutputError(
                        f"{source}: its weights file uses an HDF5 layout bnfreeze does not "
                        "rewrite, so the optimizer state cannot be remapped; nothing was written.",
                        hint="Pass --optimizer-state drop (or keep).",
                    )
                rewritten = stack.enter_context(scratch_file(dest.parent, "model.weights.h5"))
                # h5py reads the member's bytes, not its CRC: check them first.
                integrity.check_member(zin, weights, str(source))
                with open_weights(source, weights, dest.parent) as h5_in:
                    dropped = drop_optimizer(h5_in, rewritten)
            # Not "wb": on ext4, truncating a file (even an empty one) makes its close write
            # back every dirty page synchronously (auto_da_alloc), ~0.5 s for 457 MB that
            # write_atomically's write-back thread otherwise overlaps with the copy.
            fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o666)
            out = stack.enter_context(os.fdopen(fd, "r+b"))
            with zipfile.ZipFile(out, "w", allowZip64=True) as zout:
                zout.comment = zin.comment
                for info in infos:
                    if info.filename == CONFIG:
                        zout.writestr(clone_info(info), config)
                    elif rewritten is not None and info is weights:
                        copy_file_into(zout, clone_info(info), rewritten)
                    elif patched is not None and info is weights:
                        copy_patched(raw, info, zout, patched)
                    else:
                        copy_raw(raw, info, zout)
            out.truncate()  # dest is empty when we are called; should it not be
        return WriteOutcome(optimizer_variables_dropped=dropped)

    def upgrade(
        self, written: WriteRequest, request: WriteRequest, dest: Path
    ) -> WriteOutcome | None:
        """Turn ``dest``, written for ``written`` (the optimizer state copied as it was), into
        the file ``request`` asks for when that is the same archive with its weights member
        patched and extended (a remapped or dropped optimizer state): with the weights member
        last, its data is patched in place, the tail appended, its local header's CRC-32 and
        sizes rewritten and the central directory written again. Saves copying the archive a
        second time. None when ``dest`` must be written again instead."""
        slots = _slots(request)
        if written.config is not request.config or _slots(written) is not None or slots is None:
            return None
        with zipfile.ZipFile(Path(request.model.path)) as zin:
            w_in = zin.getinfo(WEIGHTS) if WEIGHTS in zin.namelist() else None
        plan = self._rewrite_for(request, w_in) if w_in is not None else None
        if w_in is None or plan is None or max(plan.size, w_in.file_size) >= zipfile.ZIP64_LIMIT:
            return None
        with open(dest, "r+b") as fh, zipfile.ZipFile(fh, "a") as zout:
            last = zout.infolist()[-1] if zout.infolist() else None
            if last is None or last.filename != WEIGHTS or last.CRC != w_in.CRC:
                return None
            start, fd = data_offset(fh, last), fh.fileno()
            fields = struct.unpack("<III", os.pread(fd, 12, last.header_offset + 14))
            end = start + last.compress_size
            if fields != (last.CRC, last.compress_size, last.file_size) or end != zout.start_dir:
                return None  # zip64 fields, a data descriptor, or something after it
            _patch_in_place(fd, start, end, plan)
            crc = _patched_crc(w_in, plan)
            os.pwrite(fd, struct.pack("<III", crc, plan.size, plan.size), last.header_offset + 14)
            last.CRC, last.compress_size, last.file_size = crc, plan.size, plan.size
            zout.start_dir = start + plan.size
            zout._didModify = True  # type: ignore[attr-defined]  # rewrite the central directory on close
        dropped = (request.model.optimizer_variables or 0) if not slots else 0
        return WriteOutcome(optimizer_variables_dropped=dropped)

    def verify(self, request: WriteRequest, written: Path) -> None:
        self.prepare(request)  # the flags of the config about to be found in the file
        source = Path(request.model.path)
        where = f"the file written for {source}"
        with zipfile.ZipFile(source) as zin, zipfile.ZipFile(written) as zout:
            before, after = zin.infolist(), zout.infolist()
            if [i.filename for i in before] != [i.filename for i in after]:
                raise OutputError(f"{where} does not have the input's members.")
            slots = _slots(request)
            weights_rewritten = slots is not None and WEIGHTS in zin.namelist()
            patched = None
            if weights_rewritten:
                patched = self._rewrite_for(request, zin.getinfo(WEIGHTS))
            for a, b in zip(before, after, strict=True):
                if a.filename == CONFIG or (weights_rewritten and a.filename == WEIGHTS):
                    continue
                if (a.CRC, a.file_size, a.compress_size, a.compress_type) != (
                    b.CRC,
                    b.file_size,
                    b.compress_size,
                    b.compress_type,
                ):
                    raise OutputError(f"{where}: member {a.filename} was not copied exactly.")
                if b.compress_type != zipfile.ZIP_STORED:  # stored ones were checked in the copy
                    integrity.check_member(zout, b, str(source))
            if zout.read(CONFIG) != self._config_bytes(request):
                raise OutputError(f"{where}: config.json does not read back as written.")
            if patched is not None:
                w_in, w_out = zin.getinfo(WEIGHTS), zout.getinfo(WEIGHTS)
                locations = request.model.weights.locations if request.model.weights else None
                check_patched(source, w_in, written, w_out, patched, slots or (), where, locations)
            elif weights_rewritten:
                w_in, w_out = zin.getinfo(WEIGHTS), zout.getinfo(WEIGHTS)
                with (
                    open_weights(source, w_in, written.parent) as h5_in,
                    open_weights(written, w_out, written.parent) as h5_out,
                ):
                    compare_weights(h5_in, h5_out, where)


WRITER = KerasZipWriter()
