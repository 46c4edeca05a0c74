"""Rewrite the optimizer variables of a Keras 3 ``model.weights.h5`` without h5py, by
appending to the file and patching a few addresses: every other byte stays where it was.

Keras saves the optimizer's variables as the datasets ``/optimizer/vars/0..N-1`` of an
old-style group (README, "Saved optimizer state"). A new list of those datasets, each either
an existing dataset (kept by its object header address, its bytes untouched) or a new
zero-filled dataset shaped like a model variable, is written as:

* appended after the current end of the file: the zero-filled datasets (their raw bytes and an
  object header that copies the model variable's messages with a new data address), then a
  new local heap, symbol table nodes and v1 B-tree for the group ``/optimizer/vars``;
* patched in place (:class:`Patch`, 16 or 8 bytes each): the symbol table message of that
  group's object header, the copy of it cached in its parent's symbol table entry, and the
  superblock's end-of-file address.

Datasets that are no longer listed keep their bytes in the file, unreferenced (HDF5 never
reads them). Nothing is ever moved, so every address in the file stays valid; the caller copies
the input's bytes (the kernel does it) and writes only the patches and the tail.

Only what h5py writes by default is handled (superblock version 0, an old-style
``/optimizer/vars`` group, object header version 1, contiguous or compact datasets);
anything else raises :class:`~bnfreeze.formats.readers._hdf5.Unsupported`.

The zip member's CRC-32 is worked out without reading the copied bytes
(:func:`patched_crc32`): CRC-32 is affine over GF(2), so the CRC of the patched copy is the
input's CRC combined with the CRC of each patch's XOR difference, shifted past the bytes that
follow it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from bnfreeze.formats.readers import _hdf5
from bnfreeze.formats.readers._hdf5 import UNDEFINED, Unsupported
from bnfreeze.formats.writers import OptimizerSlot

_SUPERBLOCK_EOF = 40  # superblock version 0: signature, 16 bytes of fields, base, free space
_FREE_NULL = 1  # HDF5's "no free block" in a local heap's free list (H5HL_FREE_NULL)
_MSG_LAYOUT = 0x0008
_MSG_CONTINUATION = 0x0010
_MSG_SYMBOL_TABLE = 0x0011
_MSG_NIL = 0x0000


Slot = OptimizerSlot


@dataclass(frozen=True)
class Patch:
    offset: int  # in the HDF5 file (the zip member), not the archive
    old: bytes
    new: bytes


@dataclass(frozen=True)
class Rewrite:
    """What to write: the input's first ``copy_bytes`` bytes with ``patches`` applied, then
    ``tail`` (bytes, or an int: that many zero bytes). ``size`` is the new file's size."""

    copy_bytes: int
    patches: tuple[Patch, ...]
    tail: tuple[bytes | int, ...]
    size: int
    #: where each new ``/optimizer/vars/<i>`` dataset's header is (for checks)
    headers: tuple[int, ...]


def _align(n: int) -> int:
    return (n + 7) & ~7


def _resolve(h5: _hdf5.File, path: str) -> _hdf5.Link:
    """The link (object header address, cached symbol table) of an absolute path."""
    link: _hdf5.Link = (h5.root, None)
    for part in path.strip("/").split("/"):
        addr, stab = link
        children = h5._symbol_table(*stab) if stab is not None else h5.children(h5.header(addr))
        if children is None or part not in children:
            raise Unsupported(f"no {path} in the weights file")
        link = children[part]
    return link


def _v1_messages(h5: _hdf5.File, addr: int) -> Iterator[tuple[int, int, int]]:
    """(type, data address, data size) of each message of a version-1 object header."""
    head = h5._read(addr, 16)
    if head[0] != 1:
        raise Unsupported("an object header other than version 1")
    nmsgs, size = struct.unpack_from("<H4xI", head, 2)
    chunks = [(addr + 16, size)]
    seen = 0
    for start, length in chunks:
        buf = h5._read(start, length)
        pos = 0
        while pos + 8 <= length and seen < nmsgs:
            mtype, msize = struct.unpack_from("<HH", buf, pos)
            if pos + 8 + msize > length:
                raise Unsupported("message overruns its header")
            seen += 1
            if mtype == _MSG_CONTINUATION:
                chunks.append((h5._u(buf, pos + 8, h5.O), h5._u(buf, pos + 8 + h5.O, h5.L)))
                if len(chunks) > 64:
                    raise Unsupported("too many continuation chunks")
            yield mtype, start + pos + 8, msize
            pos += 8 + msize


def _entry_position(h5: _hdf5.File, btree: int, heap: int, name: str) -> int:
    """Where the symbol table entry named ``name`` is, in a group's symbol table nodes."""
    signature, heap_size, data_at = h5._heap.unpack(h5._read(heap, h5._heap.size))
    if signature != b"HEAP":
        raise Unsupported("bad local heap")
    names = h5._read(data_at, heap_size)
    want = name.encode() + b"\x00"
    entry = h5._entry.size
    stack, visited = [btree], 0
    while stack:
        addr = stack.pop()
        visited += 1
        if visited > 100_000:
            raise Unsupported("too many B-tree nodes")
        node = h5._read(addr, 8)
        if node[:4] != b"TREE" or node[4] != 0:
            raise Unsupported("bad group B-tree node")
        level, used = node[5], struct.unpack_from("<H", node, 6)[0]
        start = 8 + 2 * h5.O + h5.L
        body = h5._read(addr + start, used * (h5.L + h5.O))
        for (child,) in h5._btree_child.iter_unpack(body):
            if level > 0:
                stack.append(child)
                continue
            snod = h5._read(child, 8)
            if snod[:4] != b"SNOD":
                raise Unsupported("bad symbol table node")
            n = struct.unpack_from("<H", snod, 6)[0]
            entries = h5._read(child + 8, n * entry)
            for i in range(n):
                at = h5._u(entries, i * entry, h5.O)
                if names[at : at + len(want)] == want:
                    return child + 8 + i * entry
    raise Unsupported(f"no entry {name!r} in its group")


def _stab_message(h5: _hdf5.File, addr: int) -> int:
    """Where the data of a group's symbol table message is (B-tree address, heap address)."""
    for mtype, at, size in _v1_messages(h5, addr):
        if mtype == _MSG_SYMBOL_TABLE and size >= 2 * h5.O:
            return at
    raise Unsupported("the group has no symbol table message (a new-style group)")


def _object_header(messages: Sequence[tuple[int, int, bytes]]) -> bytes:
    """A version-1 object header holding ``messages`` (type, flags, data)."""
    body = bytearray()
    for mtype, flags, data in messages:
        padded = _align(len(data))
        body += struct.pack("<HHB3x", mtype, padded, flags) + data + bytes(padded - len(data))
    return struct.pack("<BBHII4x", 1, 0, len(messages), 1, len(body)) + bytes(body)


class _Tail:
    """The bytes appended after the input's end, with the address of what is added."""

    def __init__(self, start: int) -> None:
        self.start = self.end = start
        self.parts: list[bytes | int] = []

    def add(self, data: bytes | int) -> int:
        at = self.end
        n = data if isinstance(data, int) else len(data)
        pad = _align(n) - n
        self.parts.append(
            data if not pad else (data + bytes(pad) if isinstance(data, bytes) else n + pad)
        )
        self.end += n + pad
        return at


_MSG_FILTERS = 0x000B
_MSG_FILL_VALUE = 0x0005
#: HDF5 datatype classes whose elements are plain bytes: fixed point, floating point,
#: bitfield, opaque (Keras's bfloat16), compound, enum, array. A zero of those is all zero bytes.
_PLAIN_CLASSES = (0, 1, 4, 5, 6, 8, 10)


def _zero_dataset(h5: _hdf5.File, tail: _Tail, like: str) -> int:
    """Append a zero-filled dataset with the dataspace and datatype of the dataset at
    ``like``; return the address of its object header.

    The new dataset is contiguous (or compact, when ``like`` is), uncompressed: a chunked or
    compressed ``like`` (h5py writes both on request) gives the same values in the layout
    Keras writes, and HDF5 reads either the same way."""
    addr, _ = _resolve(h5, like)
    header = h5.header(addr)
    extent = _hdf5.dataset_extent(h5, header)
    if extent is None:
        raise Unsupported(f"{like}: no dataspace or datatype")
    dims, itemsize, cls = extent
    if dims is None:
        raise Unsupported(f"{like}: a null dataspace")
    if cls not in _PLAIN_CLASSES:
        raise Unsupported(f"{like}: a datatype whose zero is not zero bytes")
    nbytes = itemsize
    for d in dims:
        nbytes *= d
    info = h5.dataset(header)
    compact = info is not None and info.inline is not None
    messages: list[tuple[int, int, bytes]] = []
    for mtype, flags, data in header.messages:
        if flags & 0x02:
            raise Unsupported("shared object header messages")
        if mtype in (_MSG_NIL, _MSG_FILTERS):
            continue  # the zeros are stored as they are
        if mtype == _MSG_FILL_VALUE and len(data) >= 2 and data[0] in (2, 3):
            # Chunked datasets allocate incrementally; contiguous ones may not (late, 2).
            alloc = data[1] & 0x03 if data[0] == 3 else data[1]
            if alloc == 3:
                data = bytes([data[0], (data[1] & ~0x03) | 2 if data[0] == 3 else 2]) + data[2:]
        if mtype == _MSG_LAYOUT:
            if compact:  # the zeros live in the message
                data = bytes([3, 0]) + struct.pack("<H", nbytes) + bytes(nbytes)
            else:
                at = tail.add(nbytes) if nbytes else UNDEFINED
                o, n = h5.O, h5.L
                data = bytes([3, 1]) + at.to_bytes(o, "little") + nbytes.to_bytes(n, "little")
        messages.append((mtype, flags, data))
    return tail.add(_object_header(messages))


def _group_structures(
    h5: _hdf5.File, tail: _Tail, headers: Sequence[int], leaf_k: int, internal_k: int
) -> tuple[int, int]:
    """Append the local heap, symbol table nodes and B-tree of a group whose links are
    "0".."n-1" -> ``headers``; return (B-tree address, local heap address)."""
    o, n = h5.O, h5.L
    names = sorted((str(i) for i in range(len(headers))), key=str.encode)
    data = bytearray(8)  # offset 0: the empty string
    offsets: dict[str, int] = {}
    for name in names:
        offsets[name] = len(data)
        raw = name.encode() + b"\x00"
        data += raw + bytes(_align(len(raw)) - len(raw))
    heap_header = b"HEAP" + bytes(4) + len(data).to_bytes(n, "little")
    heap_header += _FREE_NULL.to_bytes(n, "little")
    heap_at = tail.end
    heap_header += (heap_at + len(heap_header) + o).to_bytes(o, "little")
    tail.add(heap_header + bytes(data))
    entry_size = 40  # 8-byte addresses: name, header, cache type, scratch-pad
    cap = 2 * leaf_k
    # Level 0: symbol table nodes, each full but the last.
    children: list[tuple[int, int]] = []  # (address, heap offset of its last name)
    for first in range(0, len(names), cap):
        chunk = names[first : first + cap]
        body = bytearray(b"SNOD" + bytes([1, 0]) + struct.pack("<H", len(chunk)))
        for name in chunk:
            body += struct.pack("<QQI4x16x", offsets[name], headers[int(name)], 0)
        body += bytes(8 + cap * entry_size - len(body))
        children.append((tail.add(bytes(body)), offsets[chunk[-1]]))
    level = 0
    fanout = 2 * internal_k
    node_size = 8 + 2 * o + (fanout + 1) * n + fanout * o
    while True:
        groups = [children[i : i + fanout] for i in range(0, len(children), fanout)] or [[]]
        addresses = [tail.end + i * node_size for i in range(len(groups))]
        parents: list[tuple[int, int]] = []
        for i, group in enumerate(groups):
            left = addresses[i - 1] if i else UNDEFINED
            right = addresses[i + 1] if i + 1 < len(groups) else UNDEFINED
            body = bytearray(b"TREE" + bytes([0, level]) + struct.pack("<H", len(group)))
            body += left.to_bytes(o, "little") + right.to_bytes(o, "little")
            body += (0).to_bytes(n, "little")  # key 0: the empty string
            for child, last in group:
                body += child.to_bytes(o, "little") + last.to_bytes(n, "little")
            body += bytes(node_size - len(body))
            at = tail.add(bytes(body))
            assert at == addresses[i]
            parents.append((at, group[-1][1] if group else 0))
        if len(parents) == 1:
            return parents[0][0], heap_at
        children, level = parents, level + 1


def plan_rewrite(source: _hdf5.ByteSource, slots: Sequence[Slot]) -> Rewrite:
    """How to turn the weights file at ``source`` into one whose ``/optimizer/vars`` lists
    ``slots``, in order; see the module docstring."""
    h5 = _hdf5.File(source)
    head = source.read(0, 24)
    if head[8] != 0 or h5.O != 8 or h5.L != 8:
        raise Unsupported("a superblock other than version 0 with 8-byte addresses")
    leaf_k, internal_k = struct.unpack_from("<HH", head, 16)
    if not leaf_k or not internal_k:
        raise Unsupported("bad B-tree sizes in the superblock")
    eof = h5.end
    opt_addr, opt_stab = _resolve(h5, "/optimizer")
    if opt_stab is None:
        opt_stab = _read_stab(h5, _stab_message(h5, opt_addr))
    vars_addr, vars_stab = _resolve(h5, "/optimizer/vars")
    entry_at = _entry_position(h5, *opt_stab, "vars")
    stab_at = _stab_message(h5, vars_addr)
    tail = _Tail(_align(eof))
    headers: list[int] = []
    for slot in slots:
        if slot.source is not None:
            addr, stab = _resolve(h5, slot.source)
            if stab is not None or not h5.is_dataset(h5.header(addr)):
                raise Unsupported(f"{slot.source} is not a dataset")
            headers.append(addr)
        else:
            headers.append(_zero_dataset(h5, tail, slot.like))
    btree, heap = _group_structures(h5, tail, headers, leaf_k, internal_k)
    new_stab = btree.to_bytes(8, "little") + heap.to_bytes(8, "little")
    patches = [Patch(stab_at, source.read(stab_at, 16), new_stab)]
    cache_type = struct.unpack_from("<I", source.read(entry_at + 16, 4))[0]
    if cache_type == 1 or vars_stab is not None:
        patches.append(Patch(entry_at + 24, source.read(entry_at + 24, 16), new_stab))
    size = tail.end
    patches.append(
        Patch(_SUPERBLOCK_EOF, source.read(_SUPERBLOCK_EOF, 8), size.to_bytes(8, "little"))
    )
    parts = tail.parts
    if tail.start != eof:
        parts = [tail.start - eof, *parts]
    return Rewrite(
        eof, tuple(sorted(patches, key=lambda p: p.offset)), tuple(parts), size, tuple(headers)
    )


def _read_stab(h5: _hdf5.File, at: int) -> tuple[int, int]:
    raw = h5._read(at, 16)
    return h5._u(raw, 0, 8), h5._u(raw, 8, 8)


# -- CRC-32 of a patched copy -------------------------------------------------------------

_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (reflected), as zlib's multmodp."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def _shift(crc: int, nbytes: int) -> int:
    """The linear part of a CRC register after ``nbytes`` more zero bytes."""
    p, k = 1 << 31, 3
    while nbytes:
        if nbytes & 1:
            p = _multmodp(_X2N[k & 31], p)
        nbytes >>= 1
        k += 1
    return _multmodp(p, crc)


def patched_crc32(crc: int, length: int, patches: Sequence[Patch]) -> int:
    """The CRC-32 of ``length`` bytes whose CRC-32 is ``crc`` once ``patches`` are applied
    (each patch's ``old`` must be the bytes it replaces)."""
    for patch in patches:
        delta = bytes(a ^ b for a, b in zip(patch.old, patch.new, strict=True))
        linear = zlib.crc32(delta) ^ zlib.crc32(bytes(len(delta)))
        crc ^= _shift(linear, length - patch.offset - len(delta))
    return crc


def tail_crc32(crc: int, tail: Sequence[bytes | int]) -> int:
    """Continue ``crc`` over ``tail`` (bytes, or runs of zero bytes)."""
    zeros = bytes(1 << 20)
    for part in tail:
        if isinstance(part, bytes):
            crc = zlib.crc32(part, crc)
            continue
        left = part
        while left:
            n = min(left, len(zeros))
            crc = zlib.crc32(zeros[:n] if n < len(zeros) else zeros, crc)
            left -= n
    return crc
