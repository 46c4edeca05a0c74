"""Checks that a written ``model.weights.h5`` is the input's, but for the optimizer state.

Two writes, two checks. A weights file rewritten with h5py (the optimizer group dropped) is
compared value by value with the input (:func:`compare_weights`). A weights member copied
and patched in place (:mod:`bnfreeze.formats.writers._hdf5_edit`) is checked without reading
every value (:func:`check_patched`): its CRC-32 and size, the patched bytes, every dataset at
the same offset with the same first and last bytes, and the new ``/optimizer/vars`` group
read back with the lean HDF5 reader.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import OutputError
from bnfreeze.formats.readers._keras_common import WEIGHTS
from bnfreeze.formats.readers.keras_zip import stored_member
from bnfreeze.formats.writers._hdf5_edit import Rewrite

OPTIMIZER_GROUP = "optimizer"
#: The piece size of a streamed copy or comparison: memory stays flat in the file size.
CHUNK = 1 << 20


# -- weights rewritten with h5py: compared value by value --------------------------------


def _slices(dataset: Any) -> Iterator[Any]:
    """Index expressions that read ``dataset`` in pieces of at most ~:data:`CHUNK` bytes
    along its first axis, so comparing a huge kernel does not hold it in memory twice."""
    shape = dataset.shape
    if not shape or dataset.size * dataset.dtype.itemsize <= CHUNK:
        yield ()
        return
    row = max(1, dataset.size // shape[0] * dataset.dtype.itemsize)
    step = max(1, CHUNK // row)
    for start in range(0, shape[0], step):
        yield slice(start, start + step)


def compare_weights(source: Any, written: Any, where: str) -> None:
    """Raise OutputError unless ``written`` holds every group, dataset and attribute of
    ``source`` except the top-level optimizer group, with bit-identical values."""
    import h5py
    import numpy as np

    def attrs_equal(a: Any, b: Any) -> bool:
        if set(a.keys()) != set(b.keys()):
            return False
        return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)

    def walk(g_src: Any, g_out: Any, name: str) -> None:
        src_keys = [k for k in g_src if not (name == "/" and k == OPTIMIZER_GROUP)]
        if sorted(src_keys) != sorted(g_out.keys()) or not attrs_equal(g_src.attrs, g_out.attrs):
            raise OutputError(f"{where}: weights group {name} differs from the input.")
        for key in src_keys:
            a, b = g_src[key], g_out[key]
            if isinstance(a, h5py.Group):
                walk(a, b, a.name)
                continue
            same = (
                isinstance(b, h5py.Dataset)
                and a.shape == b.shape
                and a.dtype == b.dtype
                and attrs_equal(a.attrs, b.attrs)
                and all(
                    np.asarray(a[part]).tobytes() == np.asarray(b[part]).tobytes()
                    for part in _slices(a)
                )
            )
            if not same:
                raise OutputError(f"{where}: weights dataset {a.name} differs from the input.")

    if OPTIMIZER_GROUP in written:
        raise OutputError(f"{where}: the optimizer state was not dropped.")
    walk(source, written, "/")


# -- weights patched in place: checked without reading every value -----------------------


def check_patched(
    source: Path,
    w_in: zipfile.ZipInfo,
    written: Path,
    w_out: zipfile.ZipInfo,
    plan: Rewrite,
    slots: Any,
    where: str,
    locations: dict[str, Any] | None = None,
) -> None:
    """Raise OutputError unless the written weights member is what ``plan`` describes,
    without reading every value:

    * its CRC-32 and size are the planned ones, and it reads back, at each patched offset,
      the patch (the input held the bytes the patch replaced: the plan was made from it);
    * every dataset of the input (``locations``, the input's index, else indexed here) starts
      at the same offset in the output, with the same first and last 64 bytes;
    * the lean HDF5 reader, walking the output from its superblock, finds ``/optimizer/vars``
      listing exactly ``slots``: each kept slot the very extent (offset, size, type, shape) of
      its source dataset in the input, each new one shaped like its variable and zero.
    """
    from bnfreeze.formats.readers import _hdf5

    _check_crc(w_in, w_out, plan, where)
    m_in, m_out = stored_member(source, w_in), stored_member(written, w_out)
    with open(source, "rb") as f_in, open(written, "rb") as f_out:
        pair = _Pair(f_in.fileno(), f_out.fileno(), m_in.start, m_out.start, where)
        try:
            if not locations:
                before = _hdf5.index_keras_weights(
                    _hdf5.ByteSource(pair.fd_in, m_in.start, m_in.size)
                )
                locations = before.datasets
            out = _hdf5.File(_hdf5.ByteSource(pair.fd_out, m_out.start, m_out.size))
        except _hdf5.Unsupported as exc:
            raise OutputError(f"{where}: {WEIGHTS} does not read back ({exc}).") from None
        pair.check_patches(plan)
        pair.check_datasets_in_place(locations)
        try:
            found = _optimizer_vars(out, len(slots), where)
            for i, slot in enumerate(slots):
                pair.check_slot(out, found[str(i)][0], i, slot, plan, locations)
        except _hdf5.Unsupported as exc:
            raise OutputError(f"{where}: {WEIGHTS} does not read back ({exc}).") from None


def _check_crc(w_in: zipfile.ZipInfo, w_out: zipfile.ZipInfo, plan: Rewrite, where: str) -> None:
    """The written member's CRC-32, size and compression are the planned ones: the CRC-32
    derived from the input's and the patches, without reading the copied bytes."""
    from bnfreeze.formats.writers._hdf5_edit import patched_crc32, tail_crc32

    crc = tail_crc32(patched_crc32(w_in.CRC, w_in.file_size, plan.patches), plan.tail)
    if (w_out.CRC, w_out.file_size, w_out.compress_type) != (crc, plan.size, zipfile.ZIP_STORED):
        raise OutputError(f"{where}: {WEIGHTS} was not written as planned.")


def _optimizer_vars(out: Any, count: int, where: str) -> dict[str, Any]:
    """The links of the output's ``/optimizer/vars`` group, which must be ``0`` to
    ``count - 1``."""
    from bnfreeze.formats.readers import _hdf5

    vars_link = out.children(out.header(out.root))
    if vars_link is None or OPTIMIZER_GROUP not in vars_link:
        raise _hdf5.Unsupported("no optimizer group")
    opt = out.children(out.header(vars_link[OPTIMIZER_GROUP][0]))
    if opt is None or "vars" not in opt:
        raise _hdf5.Unsupported("no optimizer/vars group")
    found: dict[str, Any] = out.children(out.header(opt["vars"][0])) or {}
    if sorted(found, key=str.encode) != sorted((str(i) for i in range(count)), key=str.encode):
        raise OutputError(f"{where}: the optimizer state was not rewritten as planned.")
    return found


@dataclass(frozen=True)
class _Pair:
    """The input's and the output's weights members, open for reading at their offsets."""

    fd_in: int
    fd_out: int
    start_in: int
    start_out: int
    where: str

    @property
    def differs(self) -> str:
        return f"{self.where}: {WEIGHTS} differs from the input"

    @property
    def shift(self) -> int:
        """How far the output's member starts from where the input's did."""
        return self.start_out - self.start_in

    def check_patches(self, plan: Rewrite) -> None:
        for patch in plan.patches:
            if os.pread(self.fd_out, len(patch.new), self.start_out + patch.offset) != patch.new:
                raise OutputError(f"{self.differs} at offset {patch.offset}.")

    def check_datasets_in_place(self, locations: dict[str, Any]) -> None:
        """Every dataset outside the optimizer group starts where it did, same bytes."""
        for path, pending in locations.items():
            if not path.startswith(f"/{OPTIMIZER_GROUP}/"):
                a = pending.info() if pending is not None else None
                if a is None:
                    # Chunked or compressed (h5py writes both on request): its bytes are
                    # the input's, copied under the CRC-32 check (integrity.copy_range).
                    continue
                self.same_bytes(a, (a.offset or 0) + self.shift, path)

    def same_bytes(self, a: Any, b_offset: int, path: str) -> None:
        """The first and last 64 bytes of dataset ``a`` of the input are those at
        ``b_offset`` in the output."""
        if a.inline is not None or not a.nbytes:
            return
        n = min(64, a.nbytes)
        for at in {0, a.nbytes - n}:
            if os.pread(self.fd_in, n, a.offset + at) != os.pread(self.fd_out, n, b_offset + at):
                raise OutputError(f"{self.differs}: dataset {path}.")

    def info_of(self, pending: Any, path: str) -> Any:
        found = pending.info() if pending is not None else None
        if found is None:
            raise OutputError(f"{self.where}: weights dataset {path} cannot be read back.")
        return found

    def check_slot(
        self, out: Any, address: int, i: int, slot: Any, plan: Rewrite, locations: dict[str, Any]
    ) -> None:
        """Slot ``i`` of ``/optimizer/vars`` is the planned dataset: a kept slot its source's,
        a new one shaped like its variable and zero."""
        from bnfreeze.formats.readers import _hdf5

        path = f"/{OPTIMIZER_GROUP}/vars/{i}"
        if address != plan.headers[i]:
            raise OutputError(f"{self.differs}: {path} is not the planned dataset.")
        pending_out = _hdf5.PendingDataset(out, out.header(address))
        if slot.source is not None:
            self.check_kept_slot(pending_out, path, slot, locations)
        else:
            self.check_new_slot(out, address, pending_out, path, slot, locations)

    def check_kept_slot(
        self, pending_out: Any, path: str, slot: Any, locations: dict[str, Any]
    ) -> None:
        if pending_out.info() is None:
            # A kept slot the lean reader cannot locate (chunked, compressed): the same
            # object header as in the input, checked above, bytes under the CRC.
            source_pending = locations.get(slot.source)
            if source_pending is None or (source_pending.extent() != pending_out.extent()):
                raise OutputError(f"{self.differs}: {path} is not {slot.source}.")
            return
        got = self.info_of(pending_out, path)
        a = self.info_of(locations.get(slot.source), slot.source)
        # A compact dataset's values live in its header: no offset to compare.
        moved = a.inline is None and (a.offset or 0) + self.shift != (got.offset or 0)
        if moved or (a.nbytes, a.typecode, a.shape, a.inline) != (
            got.nbytes,
            got.typecode,
            got.shape,
            got.inline,
        ):
            raise OutputError(f"{self.differs}: {path} is not {slot.source}.")
        self.same_bytes(a, got.offset or 0, path)

    def check_new_slot(
        self,
        out: Any,
        address: int,
        pending_out: Any,
        path: str,
        slot: Any,
        locations: dict[str, Any],
    ) -> None:
        from bnfreeze.formats.readers import _hdf5

        like_pending = locations.get(slot.like)
        like_extent = like_pending.extent() if like_pending is not None else None
        if like_extent is None or like_extent != pending_out.extent():
            raise OutputError(f"{self.differs}: {path} is not shaped like {slot.like}.")
        # Any datatype (an opaque float8 too): its raw bytes, where the layout says.
        at, nbytes, raw = _hdf5.raw_layout(out, out.header(address))
        if raw is None:
            raw = os.pread(self.fd_out, min(nbytes, CHUNK), at or 0)
        if raw.count(0) != len(raw):
            raise OutputError(f"{self.differs}: the new {path} is not zero.")
