"""Crafted HDF5 files for the lean reader (``bnfreeze.formats.readers._hdf5``): each one is a valid
h5py-written file with specific bytes or pointers patched, so nothing binary is committed.

Every builder takes the bytes of a valid file and returns the bytes of the crafted one. The
structures to patch are located with plain offsets worked out here (superblock, object header
and B-tree layouts of the HDF5 format specification), for 8-byte offsets and lengths (what
h5py writes). :data:`CRAFTED` names them; a test failure names the case.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

_CONT = 0x0010
_STAB = 0x0011
_LINK = 0x0006


def _u64(data: bytes | bytearray, at: int) -> int:
    return struct.unpack_from("<Q", data, at)[0]


def root_header(data: bytes | bytearray) -> int:
    """The root group's object header address (superblock versions 0 and 2/3)."""
    version = data[8]
    if version == 0:
        # 24: base, free-space, eof, driver (4 x 8), then the root symbol table entry
        return _u64(data, 24 + 4 * 8 + 8)
    if version in (2, 3):
        return _u64(data, 12 + 3 * 8)
    raise ValueError(f"superblock version {version}")


def v1_messages(data: bytes | bytearray, addr: int) -> list[tuple[int, int, int]]:
    """(offset of the message's 8-byte header, type, size) of every message of a v1 object
    header, continuation chunks included (the continuation messages too)."""
    assert data[addr] == 1, "not a version-1 object header"
    nmsgs, size = struct.unpack_from("<H4xI", data, addr + 2)
    out: list[tuple[int, int, int]] = []
    chunks = [(addr + 16, addr + 16 + size)]
    while chunks and len(out) < nmsgs:
        pos, end = chunks.pop(0)
        while pos + 8 <= end and len(out) < nmsgs:
            mtype, msize = struct.unpack_from("<HH", data, pos)
            out.append((pos, mtype, msize))
            if mtype == _CONT:
                to, length = struct.unpack_from("<QQ", data, pos + 8)
                chunks.append((to, to + length))
            pos += 8 + msize
    return out


def v2_messages(data: bytes | bytearray, addr: int) -> list[tuple[int, int, int, int]]:
    """(offset of the message, its prefix length, type, size) in a v2 header's first chunk."""
    assert data[addr : addr + 4] == b"OHDR"
    flags = data[addr + 5]
    pos = addr + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
    width = 1 << (flags & 0x03)
    size = int.from_bytes(data[pos : pos + width], "little")
    pos += width
    end = pos + size
    prefix = 6 if flags & 0x04 else 4
    out = []
    while pos + prefix <= end:
        mtype, msize = struct.unpack_from("<BH", data, pos)
        out.append((pos, prefix, mtype, msize))
        pos += prefix + msize
    return out


def symbol_table(data: bytes | bytearray, header: int) -> tuple[int, int]:
    """(B-tree, local heap) of an old-style group, from its v1 object header."""
    for pos, mtype, _ in v1_messages(data, header):
        if mtype == _STAB:
            return _u64(data, pos + 8), _u64(data, pos + 16)
    raise ValueError("not an old-style group")


def snod_entries(data: bytes | bytearray, snod: int) -> list[int]:
    """Offsets of a symbol table node's 40-byte entries."""
    assert data[snod : snod + 4] == b"SNOD"
    n = struct.unpack_from("<H", data, snod + 6)[0]
    return [snod + 8 + 40 * i for i in range(n)]


def first_snod(data: bytes | bytearray, btree: int) -> int:
    assert data[btree : btree + 4] == b"TREE" and data[btree + 5] == 0
    return _u64(data, btree + 8 + 16 + 8)  # after the header, siblings and key 0


def _entries(data: bytes | bytearray, btree: int) -> list[int]:
    """Offsets of every symbol table entry below the group B-tree node ``btree``."""
    assert data[btree : btree + 4] == b"TREE"
    level, used = data[btree + 5], struct.unpack_from("<H", data, btree + 6)[0]
    out: list[int] = []
    for i in range(used):
        child = _u64(data, btree + 32 + 16 * i)
        out += _entries(data, child) if level else snod_entries(data, child)
    return out


def _groups(data: bytes | bytearray) -> list[tuple[int, list[int]]]:
    """(header, entry offsets) of every old-style group below the root, breadth first."""
    found, queue, seen = [], [root_header(data)], set()
    while queue:
        header = queue.pop(0)
        if header in seen:
            continue
        seen.add(header)
        btree, _ = symbol_table(data, header)
        if struct.unpack_from("<H", data, btree + 6)[0] == 0:  # an empty group
            continue
        entries = _entries(data, btree)
        found.append((header, entries))
        for entry in entries:
            target = _u64(data, entry + 8)
            if data[target] == 1 and any(t == _STAB for _, t, _ in v1_messages(data, target)):
                queue.append(target)
    return found


def _appended(data: bytearray, extra: bytes) -> bytes:
    """``data`` + ``extra``, with the superblock's end-of-file address moved to the new end
    (else HDF5 refuses every address in ``extra``)."""
    eof_at = 24 + 16 if data[8] == 0 else 12 + 16
    struct.pack_into("<Q", data, eof_at, len(data) + len(extra))
    return bytes(data + extra)


def _cont_v1(to: int, length: int) -> bytes:
    return struct.pack("<HHB3xQQ", _CONT, 16, 0, to, length)


def _as_continuation(data: bytearray, msg: int, to: int, length: int, *, v2: int = 0) -> None:
    """Turn the message at ``msg`` into a continuation to (to, length), keeping its size."""
    if v2:
        data[msg] = _CONT
        struct.pack_into("<QQ", data, msg + v2, to, length)
    else:
        struct.pack_into("<H", data, msg, _CONT)
        struct.pack_into("<QQ", data, msg + 8, to, length)


def _nil_fill(length: int) -> bytes:
    """``length`` bytes of v1 NIL messages (each at most 8 + 65,535 bytes)."""
    out = bytearray()
    while length:
        size = min(length - 8, 0xFFF8)
        if length - (8 + size) and length - (8 + size) < 8:
            size -= 8
        out += struct.pack("<HHB3x", 0, size, 0) + bytes(size)
        length -= 8 + size
    return bytes(out)


def v1_continuation_self_loop(valid: bytes, region: int = 1 << 20) -> bytes:
    """The root header continues into an appended chunk whose first message continues into
    that same chunk (the rest is NIL messages), and claims 65,535 messages: a cycle that makes
    the old reader re-read the 1 MiB chunk thousands of times."""
    data = bytearray(valid)
    at = len(data)
    chunk = _cont_v1(at, region) + _nil_fill(region - 24)
    assert len(chunk) == region
    root = root_header(data)
    _as_continuation(data, v1_messages(data, root)[0][0], at, region)
    struct.pack_into("<H", data, root + 2, 0xFFFF)
    return _appended(data, chunk)


def v1_continuation_fanout(valid: bytes, region: int = 24 * 2730) -> bytes:
    """An appended chunk made only of continuation messages, each back to the whole chunk:
    the old reader kept up to 65,535 copies of it pending (~4 GiB for 64 KiB)."""
    data = bytearray(valid)
    at = len(data)
    chunk = _cont_v1(at, region) * (region // 24)
    root = root_header(data)
    _as_continuation(data, v1_messages(data, root)[0][0], at, region)
    struct.pack_into("<H", data, root + 2, 0xFFFF)
    return _appended(data, chunk)


def v1_continuation_overlapping(valid: bytes, count: int = 40_000) -> bytes:
    """``count`` continuation messages; message i continues at message i+1, to the end: no
    address repeats, but each chunk re-reads the rest (quadratic: ~19 GB for 960 KB)."""
    data = bytearray(valid)
    at = len(data)
    region = 24 * count
    chunk = (
        b"".join(_cont_v1(at + 24 * (i + 1), region - 24 * (i + 1)) for i in range(count - 1))
        + struct.pack("<HHB3x", 0, 16, 0)
        + bytes(16)
    )
    root = root_header(data)
    _as_continuation(data, v1_messages(data, root)[0][0], at, region)
    struct.pack_into("<H", data, root + 2, 0xFFFF)
    return _appended(data, chunk)


def shared_continuation_chunk(valid: bytes, region: int = 4 << 20) -> bytes:
    """Every group's header continues into the same appended 4 MiB chunk of NIL messages:
    each header on its own is bounded, but together they read the chunk once per group."""
    data = bytearray(valid)
    at = len(data)
    chunk = _nil_fill(region)
    for header, _ in _groups(data):
        messages = v1_messages(data, header)
        attrs = [pos for pos, t, size in messages if t == 0x000C and size >= 16]
        pos = attrs[0] if attrs else None
        if pos is None:  # a group without attributes: add the continuation after its last
            continue
        _as_continuation(data, pos, at, region)
    return _appended(data, chunk)


def v2_continuation_fanout(valid: bytes, count: int = 2000) -> bytes:
    """(A libver="latest" file.) The root's first link message becomes a continuation into an
    appended OCHK chunk of ``count`` continuations, each back to that chunk."""
    data = bytearray(valid)
    root = root_header(data)
    messages = v2_messages(data, root)
    pos, prefix, _, _ = next(m for m in messages if m[2] == _LINK and m[3] >= 16)
    at = len(data)
    one = struct.pack("<BHB", _CONT, 16, 0) + bytes(prefix - 4)
    region = 4 + count * (prefix + 16) + 4
    chunk = b"OCHK" + b"".join(one + struct.pack("<QQ", at, region) for _ in range(count))
    chunk += bytes(4)  # the checksum (not verified by the lean reader)
    _as_continuation(data, pos, at, region, v2=prefix)
    return _appended(data, chunk)


def btree_self_loop(valid: bytes) -> bytes:
    """The root group's B-tree node claims level 1 and 32 children, all itself: a cycle with
    fan-out 32 (the old reader stopped only at depth 256, i.e. never)."""
    data = bytearray(valid)
    btree, _ = symbol_table(data, root_header(data))
    data[btree + 5] = 1
    struct.pack_into("<H", data, btree + 6, 32)
    for i in range(32):
        struct.pack_into("<Q", data, btree + 32 + 16 * i, btree)
    return bytes(data)


def group_cycle_fanout(valid: bytes) -> bytes:
    """Every entry of the first group holding two or more datasets is re-pointed at the root
    group: a cycle through hard links, with fan-out, so every walk of the tree (ours and
    h5py's) is exponential."""
    data = bytearray(valid)
    root = root_header(data)
    for _, entries in _groups(data):
        datasets = [e for e in entries if struct.unpack_from("<I", data, e + 16)[0] == 0]
        if len(datasets) >= 2:
            for entry in entries:
                struct.pack_into("<QI", data, entry + 8, root, 0)
            return bytes(data)
    raise ValueError("no group with two datasets")


def local_heap_huge_size(valid: bytes) -> bytes:
    """The root group's local heap claims a data segment of 2**40 bytes."""
    data = bytearray(valid)
    _, heap = symbol_table(data, root_header(data))
    assert data[heap : heap + 4] == b"HEAP"
    struct.pack_into("<Q", data, heap + 8, 1 << 40)
    return bytes(data)


def long_link_name(valid: bytes, heap_size: int = 4 << 20, entries: int = 20_000) -> bytes:
    """The root group's local heap is replaced by an appended 4 MiB one holding one name that
    long, and its B-tree by a symbol table node of 20,000 entries that all use that name:
    finding each name's end scans the heap again (80 GB in all, for a 5 MiB file)."""
    data = bytearray(valid)
    btree, heap = symbol_table(data, root_header(data))
    at = len(data)
    snod = at + heap_size
    target = _u64(data, snod_entries(data, first_snod(data, btree))[0] + 8)
    struct.pack_into("<QQQ", data, heap + 8, heap_size, UNDEFINED_ADDR, at)
    struct.pack_into("<Q", data, btree + 32, snod)
    node = b"SNOD" + struct.pack("<BxH", 1, entries)
    node += struct.pack("<QQI4x16x", 0, target, 0) * entries
    return _appended(data, b"a" * (heap_size - 1) + b"\0" + node)


def group_dag_fanout(valid: bytes, levels: int = 40) -> bytes:
    """(A file with 40+ layers.) The datasets of each layer's ``vars`` group are re-pointed at
    the next layer's ``vars`` group: no cycle, but 4**40 paths through hard links, which
    h5py's walk (and the old reader's, up to 5 million objects) follows one by one."""
    data = bytearray(valid)
    groups = [
        (header, entries)
        for header, entries in _groups(data)
        if len(entries) >= 2
        and all(struct.unpack_from("<I", data, e + 16)[0] == 0 for e in entries)
    ]
    assert len(groups) > levels, f"only {len(groups)} groups of datasets"
    for (_, entries), (next_header, _) in itertools.pairwise(groups[: levels + 1]):
        for entry in entries:
            struct.pack_into("<Q", data, entry + 8, next_header)
    return bytes(data)


UNDEFINED_ADDR = 0xFFFFFFFFFFFFFFFF

#: name -> (builder, keyword arguments for ``_write_keras_like`` to write the valid file)
CRAFTED: dict[str, tuple[Callable[[bytes], bytes], dict]] = {
    "v1-continuation-self-loop": (v1_continuation_self_loop, {}),
    "v1-continuation-fanout": (v1_continuation_fanout, {}),
    "v1-continuation-overlapping": (v1_continuation_overlapping, {}),
    "shared-continuation-chunk": (shared_continuation_chunk, {"layers": 300}),
    "v2-continuation-fanout": (
        v2_continuation_fanout,
        {"libver": "latest", "layers": 3, "inner_count": 4},
    ),
    "btree-self-loop": (btree_self_loop, {}),
    "group-cycle-fanout": (group_cycle_fanout, {}),
    "group-dag-fanout": (group_dag_fanout, {"layers": 45}),
    "local-heap-huge-size": (local_heap_huge_size, {}),
    "long-link-name": (long_link_name, {}),
}
