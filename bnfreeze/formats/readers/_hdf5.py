"""A small, read-only HDF5 metadata reader in pure Python, for Keras weights files.

Why: ``import h5py`` (and with it numpy) costs ~0.2 s, and walking ~1,000 layer groups
through h5py costs more; ``inspect`` only needs group names, one string attribute per layer and
the bytes of a few small BN datasets. This module reads exactly the subset of the HDF5 format
(https://support.hdfgroup.org/documentation/hdf5/latest/_f_m_t4.html) that h5py writes by
default, which is what Keras writes:

* superblock versions 0-3; object headers versions 1 and 2 with continuation chunks;
* "old-style" groups (symbol table, v1 B-tree, local heap) and "compact" new-style groups
  (link messages);
* compact attributes (attribute message versions 1-3) of fixed or variable-length string type,
  variable-length strings in global heap collections;
* datasets with contiguous or compact layout and no filters, of integer or floating-point
  type.

Anything else -- dense link or attribute storage, shared messages, chunked or filtered data, soft
or external links, a truncated file -- raises :class:`Unsupported`. Callers then use h5py, which
either reads the file the slow way or raises its own error, so behaviour never depends on which
reader ran. Nothing here trusts a size or offset from the file without a bounds check.

The file is untrusted, so every walk is bounded by the file itself, not only by the bounds
check of each read (a crafted file can point a structure back at itself, or many structures
at one big block):

* all metadata read from one file, together, is at most :data:`_READ_FACTOR` times its size
  (plus :data:`_READ_SLACK`), and one object header's chunks at most the file's size;
* a continuation chunk, B-tree node or symbol table node is read once per file: a second
  visit is a cycle (or a structure shared between objects, which HDF5 never writes);
* B-tree levels strictly decrease from a node to its children; at most
  :data:`_MAX_CONTINUATIONS` continuation messages per object header;
* a group that contains itself through hard links is a cycle; at most :data:`_MAX_ALIASES`
  objects reached again through another path (a tree of hard links that doubles at each
  level would otherwise be walked exponentially);
* groups nest at most :data:`_MAX_DEPTH` deep, link names are at most :data:`_MAX_NAME` bytes.

A violation of the first four is :class:`Malformed` (a subclass of :class:`Unsupported`):
callers report the file as damaged instead of handing it to h5py, whose walk of the same links
would be just as long. The others (legal but never written by Keras) are plain
:class:`Unsupported`, for h5py to decide.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

SIGNATURE = b"\x89HDF\r\n\x1a\n"
UNDEFINED = 0xFFFFFFFFFFFFFFFF

# Object header message types used here.
_MSG_DATASPACE = 0x0001
_MSG_LINK_INFO = 0x0002
_MSG_DATATYPE = 0x0003
_MSG_LINK = 0x0006
_MSG_EXTERNAL_FILES = 0x0007
_MSG_LAYOUT = 0x0008
_MSG_FILTERS = 0x000B
_MSG_ATTRIBUTE = 0x000C
_MSG_CONTINUATION = 0x0010
_MSG_SYMBOL_TABLE = 0x0011
_MSG_ATTRIBUTE_INFO = 0x0015

_MAX_DEPTH = 256  # B-tree levels / group nesting (recursion guard)
_MSG_V1 = struct.Struct("<HHB")  # a version-1 header message: type, size, flags (+3 reserved)
_MAX_CHILDREN = 1_000_000
_READ_FACTOR = 4  # metadata bytes read per file, at most this many times the file's size...
_READ_SLACK = 16 * 2**20  # ...plus this (fixed-size reads of small files over-read a little)
_MAX_CONTINUATIONS = 4096  # continuation messages in one object header (h5py writes a few)
_MAX_ALIASES = 10_000  # objects reached again through another hard link (Keras writes none)
_MAX_NAME = 65_536  # bytes in one link name (Keras's are layer names and numbers)


class Unsupported(Exception):
    """The file uses an HDF5 feature this reader does not implement, or is damaged."""


class OutsideReference(Exception):
    """The file points at another file (an external link, external raw storage, a virtual
    dataset): refused, never handed to h5py, which would open that file
    (:mod:`bnfreeze.formats.readers.self_contained`)."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{what} at {where}")
        self.where, self.what = where, what


class Malformed(Unsupported):
    """The file's structure is cyclic or claims far more than the file holds: damaged or
    crafted. Not worth handing to h5py (its walk of the same links would not end sooner)."""


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset's raw bytes are, and how to decode them."""

    offset: int | None  # absolute offset in the source; None for compact (inline) data
    nbytes: int
    typecode: str  # an ``array`` typecode: "f", "d", "e" (struct only), "b", "q", ...
    big_endian: bool
    count: int  # number of elements
    inline: bytes | None = None
    shape: tuple[int, ...] | None = None  # the dataspace's dimensions; () for a scalar
    #: Keras's ``bfloat16``: a 2-byte opaque type tagged by the dataset's ``dtype``
    #: attribute, read as ``H`` and decoded to floats (the top half of a float32).
    bfloat16: bool = False


@dataclass
class _Header:
    messages: list[tuple[int, int, bytes]]  # (type, flags, data)


#: A link to an object: its object header address and, for an old-style group whose parent
#: cached it (symbol table entry cache type 1), its (B-tree, local heap) addresses.
Link = tuple[int, "tuple[int, int] | None"]


class ByteSource:
    """Random access to a byte range of an open file (a zip member or a whole file).

    Metadata reads are small and clustered (HDF5 allocates object headers, B-tree nodes and
    heaps in 2 KiB blocks), so reads go through a cache of aligned pages: a few thousand
    ``pread`` calls instead of tens of thousands for a 1,000-layer model.
    """

    PAGE = 8192
    MAX_PAGES = 2048  # 16 MiB, then the cache starts over

    def __init__(self, fd: int, start: int, size: int) -> None:
        self.fd = fd
        self.start = start
        self.size = size
        self._pages: dict[int, bytes] = {}

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise Unsupported(f"read past the end ({offset}+{n} > {self.size})")
        page, at = divmod(offset, self.PAGE)
        if at + n <= self.PAGE:  # within one page: the common case
            data = self._pages.get(page)
            if data is None:
                data = self._page(page)
            chunk = data[at : at + n]
        elif n > 4 * self.PAGE:
            chunk = os.pread(self.fd, n, self.start + offset)
        else:
            last = (offset + n - 1) // self.PAGE
            data = b"".join(self._pages.get(p) or self._page(p) for p in range(page, last + 1))
            chunk = data[at : at + n]
        if len(chunk) != n:
            raise Unsupported("short read")
        return chunk

    def _page(self, page: int) -> bytes:
        if len(self._pages) >= self.MAX_PAGES:
            self._pages.clear()
        at = page * self.PAGE
        data = os.pread(self.fd, min(self.PAGE, self.size - at), self.start + at)
        self._pages[page] = data
        return data


class File:
    """An HDF5 file opened for metadata reads. Paths are absolute HDF5 paths ("/a/b")."""

    def __init__(self, source: ByteSource) -> None:
        self.src = source
        self._gheap: dict[int, dict[int, bytes]] = {}
        self._spent = 0  # metadata bytes read so far
        self._budget = _READ_FACTOR * source.size + _READ_SLACK
        self._headers: dict[int, _Header] = {}
        self._chunk_owner: dict[int, int] = {}  # continuation chunk -> its object header
        self._tables: dict[tuple[int, int], dict[str, Link]] = {}
        self._heaps: dict[int, bytes] = {}
        self._nodes_seen: set[int] = set()  # B-tree and symbol table nodes read
        head = source.read(0, min(source.size, 128))
        if not head.startswith(SIGNATURE):
            raise Unsupported("no HDF5 signature at offset 0")
        version = head[8] if len(head) > 8 else -1
        if version in (0, 1):
            self.O, self.L = head[13], head[14]
            self._check_sizes()
            pos = 24 if version == 0 else 28
            base, _, eof, _ = self._addrs(head, pos, 4)
            entry = pos + 4 * self.O
            root = self._u(head, entry + self.O, self.O)
        elif version in (2, 3):
            self.O, self.L = head[9], head[10]
            self._check_sizes()
            base, _, eof, root = self._addrs(head, 12, 4)
        else:
            raise Unsupported(f"superblock version {version}")
        if base != 0:
            raise Unsupported("a base address other than 0")
        if eof == UNDEFINED or eof > source.size:
            raise Unsupported("truncated file")  # h5py refuses it too, with its own message
        self.end = eof  # HDF5 refuses any address past the end-of-file address
        self.root = root

    # -- primitives ---------------------------------------------------------------------------

    def _check_sizes(self) -> None:
        if self.O not in (2, 4, 8) or self.L not in (2, 4, 8):
            raise Unsupported("unusual offset/length sizes")
        o = {2: "H", 4: "I", 8: "Q"}[self.O]
        # A symbol table entry: link name offset, object header address, cache type, and a
        # 16-byte scratch-pad that holds a child group's B-tree and heap when cache type is 1.
        self._entry = struct.Struct(f"<{o}{o}I4x{o}{o}{16 - 2 * self.O}x")
        # A group B-tree node's (child address, next key) pair, after the first key.
        self._btree_child = struct.Struct(f"<{o}{self.L}x")
        self._heap = struct.Struct(f"<4s4x{'QIH'[(8, 4, 2).index(self.L)]}{self.L}x{o}")

    @staticmethod
    def _u(buf: bytes, pos: int, size: int) -> int:
        if pos + size > len(buf):
            raise Unsupported("truncated structure")
        value = int.from_bytes(buf[pos : pos + size], "little")
        if value == (1 << (8 * size)) - 1:
            return UNDEFINED
        return value

    def _addrs(self, buf: bytes, pos: int, n: int) -> list[int]:
        return [self._u(buf, pos + i * self.O, self.O) for i in range(n)]

    def _charge(self, n: int) -> None:
        self._spent += n
        if self._spent > self._budget:
            raise Malformed(
                f"metadata reads exceed {_READ_FACTOR} times the file's size (cyclic or "
                "shared structures)"
            )

    def _read(self, addr: int, n: int) -> bytes:
        if addr == UNDEFINED:
            raise Unsupported("undefined address")
        if n < 0 or addr + n > self.end:
            raise Unsupported(f"read past the end-of-file address ({addr}+{n} > {self.end})")
        self._charge(n)
        return self.src.read(addr, n)

    def _read_upto(self, addr: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``addr`` (fewer near the end of the file)."""
        if addr == UNDEFINED or addr >= self.end:
            raise Unsupported("address out of range")
        n = min(n, self.end - addr)
        self._charge(n)
        return self.src.read(addr, n)

    # -- object headers -----------------------------------------------------------------------

    def header(self, addr: int) -> _Header:
        cached = self._headers.get(addr)
        if cached is not None:
            return cached
        buf = self._read_upto(addr, 512)
        messages: list[tuple[int, int, bytes]] = []
        if buf.startswith(b"OHDR"):
            self._header_v2(addr, buf, messages)
        elif buf[:1] == b"\x01":
            self._header_v1(addr, buf, messages)
        else:
            raise Unsupported("unknown object header version")
        header = self._headers[addr] = _Header(messages)
        return header

    def _continuation(self, owner: int, data: bytes, total: list[int]) -> tuple[int, int]:
        """A continuation message's (address, length), checked before the chunk is read: each
        chunk belongs to one object header and is read once, an object header has at most
        :data:`_MAX_CONTINUATIONS` chunks, together no larger than the file."""
        caddr = self._u(data, 0, self.O)
        clen = self._u(data, self.O, self.L)
        if caddr in self._chunk_owner:  # each header is parsed once: a cycle, or shared
            raise Malformed("an object header's continuation chunk is read twice (a cycle)")
        self._chunk_owner[caddr] = owner
        total[1] += 1
        if total[1] > _MAX_CONTINUATIONS:
            raise Unsupported(f"more than {_MAX_CONTINUATIONS} continuation chunks")
        total[0] += clen
        if total[0] > self.end:
            raise Malformed("an object header's chunks add up to more than the file")
        return caddr, clen

    def _header_v1(self, addr: int, buf: bytes, out: list[tuple[int, int, bytes]]) -> None:
        if len(buf) < 16:
            raise Unsupported("truncated object header")
        nmsgs, size = struct.unpack_from("<H4xI", buf, 2)
        if 16 + size > len(buf):
            buf = self._read(addr, 16 + size)
        chunks = [(buf, 16, 16 + size)]
        total = [16 + size, 0]  # bytes in this header's chunks, continuation messages
        seen = 0
        for chunk, pos, end in chunks:  # continuation chunks are appended while iterating
            while pos + 8 <= end and seen < nmsgs:
                mtype, msize, mflags = _MSG_V1.unpack_from(chunk, pos)
                pos += 8
                if pos + msize > end:
                    raise Unsupported("message overruns its header")
                data = chunk[pos : pos + msize]
                pos += msize
                seen += 1
                if mtype == _MSG_CONTINUATION:
                    caddr, clen = self._continuation(addr, data, total)
                    chunks.append((self._read(caddr, clen), 0, clen))
                else:
                    out.append((mtype, mflags, data))

    def _header_v2(self, addr: int, buf: bytes, out: list[tuple[int, int, bytes]]) -> None:
        if len(buf) < 7 or buf[4] != 2:
            raise Unsupported("object header v2 with an unknown version")
        flags = buf[5]
        pos = 6
        if flags & 0x20:
            pos += 16
        if flags & 0x10:
            pos += 4
        width = 1 << (flags & 0x03)
        size = self._u(buf, pos, width)
        pos += width
        end = pos + size
        if end + 4 > len(buf):
            buf = self._read(addr, end + 4)
        prefix = 6 if flags & 0x04 else 4  # a creation-order field follows each message's flags
        chunks = [(buf, pos, end)]
        total = [end + 4, 0]  # bytes in this header's chunks, continuation messages
        for chunk, pos, end in chunks:  # continuation chunks are appended while iterating
            while pos + prefix <= end:
                mtype, msize, mflags = struct.unpack_from("<BHB", chunk, pos)
                pos += prefix
                if pos + msize > end:
                    raise Unsupported("message overruns its header")
                data = chunk[pos : pos + msize]
                pos += msize
                if mtype == _MSG_CONTINUATION:
                    caddr, clen = self._continuation(addr, data, total)
                    cbuf = self._read(caddr, clen)
                    if not cbuf.startswith(b"OCHK"):
                        raise Unsupported("bad continuation chunk")
                    chunks.append((cbuf, 4, clen - 4))
                else:
                    out.append((mtype, mflags, data))

    # -- groups ---------------------------------------------------------------------------------

    def children(self, header: _Header) -> dict[str, Link] | None:
        """A group's links by name, or None if the object is not a group."""
        links: dict[str, Link] | None = None
        for mtype, mflags, data in header.messages:
            if mtype == _MSG_SYMBOL_TABLE:
                if mflags & 0x02:
                    raise Unsupported("shared symbol table message")
                btree = self._u(data, 0, self.O)
                heap = self._u(data, self.O, self.O)
                return self._symbol_table(btree, heap)
            if mtype == _MSG_LINK_INFO:
                if data[:1] != b"\x00":
                    raise Unsupported("link info version")
                pos = 2 + (8 if data[1] & 0x01 else 0)
                if self._u(data, pos, self.O) != UNDEFINED:
                    raise Unsupported("dense link storage")
                links = links if links is not None else {}
            elif mtype == _MSG_LINK:
                if links is None:
                    links = {}
                name, target = self._link(data)
                links[name] = (target, None)
        if links is None:
            return None
        return dict(sorted(links.items(), key=lambda kv: kv[0].encode("utf-8")))

    def _link(self, data: bytes) -> tuple[str, int]:
        if data[:1] != b"\x01" or len(data) < 2:
            raise Unsupported("link message version")
        flags = data[1]
        pos = 2
        link_type = 0
        if flags & 0x08:
            link_type = data[pos]
            pos += 1
        if flags & 0x04:
            pos += 8
        if flags & 0x10:
            pos += 1
        width = 1 << (flags & 0x03)
        length = self._u(data, pos, width)
        pos += width
        if pos + length > len(data):
            raise Unsupported("truncated link message")
        name = data[pos : pos + length].decode("utf-8", "replace")
        if link_type == 64:  # the walker adds the group's path
            raise OutsideReference(name, "an external link")
        if link_type != 0:
            raise Unsupported("soft or user-defined link")
        return name, self._u(data, pos + length, self.O)

    def _symbol_table(self, btree: int, heap: int) -> dict[str, Link]:
        """A group's links (the same dict each time it is asked for: callers do not change
        it), from its B-tree and local heap."""
        cached = self._tables.get((btree, heap))
        if cached is not None:
            return cached
        heap_data = self._heaps.get(heap)
        if heap_data is None:
            signature, heap_size, data_at = self._heap.unpack(self._read(heap, self._heap.size))
            if signature != b"HEAP":
                raise Unsupported("bad local heap")
            heap_data = self._heaps[heap] = self._read(data_at, heap_size)
        out: dict[str, Link] = {}
        self._btree(btree, heap_data, out, None)
        table = self._tables[(btree, heap)] = dict(
            sorted(out.items(), key=lambda kv: kv[0].encode("utf-8"))
        )
        return table

    def _visit(self, addr: int, what: str) -> None:
        if addr in self._nodes_seen:
            raise Malformed(f"a {what} is reached twice (a cycle)")
        self._nodes_seen.add(addr)

    def _btree(
        self, addr: int, heap: bytes, out: dict[str, Link], level_wanted: int | None
    ) -> None:
        self._visit(addr, "group B-tree node")
        node = self._read_upto(addr, 1024)  # one read covers a node with 32 entries
        if not node.startswith(b"TREE") or len(node) < 8 or node[4] != 0:
            raise Unsupported("bad group B-tree node")
        level = node[5]
        if level_wanted is not None and level != level_wanted:
            raise Malformed("a group B-tree node's level is not one below its parent's")
        used = struct.unpack_from("<H", node, 6)[0]
        # Keys and children alternate: key 0, child 0, ..., key n; skip key 0.
        start = 8 + 2 * self.O + self.L
        size = used * (self.L + self.O)
        body = node[start : start + size]
        if len(body) != size:
            body = self._read(addr + start, size)
        for (child,) in self._btree_child.iter_unpack(body):
            if level > 0:
                self._btree(child, heap, out, level - 1)
            else:
                self._snod(child, heap, out)

    def _snod(self, addr: int, heap: bytes, out: dict[str, Link]) -> None:
        self._visit(addr, "symbol table node")
        node = self._read_upto(addr, 8 + 8 * self._entry.size)  # 8 entries: h5py's default
        if not node.startswith(b"SNOD") or len(node) < 8:
            raise Unsupported("bad symbol table node")
        n = struct.unpack_from("<H", node, 6)[0]
        size = n * self._entry.size
        body = node[8 : 8 + size]
        if len(body) != size:
            body = self._read(addr + 8, size)
        find = heap.find
        for name_at, target, cache_type, btree, local_heap in self._entry.iter_unpack(body):
            end = find(b"\x00", name_at, name_at + _MAX_NAME)
            if name_at >= len(heap) or end < 0:
                raise Unsupported("bad link name offset, or a name over 64 KiB")
            self._charge(end - name_at)
            stab = (btree, local_heap) if cache_type == 1 else None
            out[heap[name_at:end].decode("utf-8")] = (target, stab)
        if len(out) > _MAX_CHILDREN:
            raise Unsupported("too many links")

    # -- attributes -----------------------------------------------------------------------------

    def attribute(self, header: _Header, wanted: str) -> Any:
        """The value of a scalar string or numeric attribute, or None if there is none."""
        for mtype, mflags, data in header.messages:
            if mtype == _MSG_ATTRIBUTE_INFO:
                pos = 2 + (2 if len(data) > 1 and data[1] & 0x01 else 0)
                if self._u(data, pos, self.O) != UNDEFINED:
                    raise Unsupported("dense attribute storage")
            if mtype != _MSG_ATTRIBUTE:
                continue
            if mflags & 0x02:
                raise Unsupported("shared attribute message")
            name, value = self._attribute(data, wanted)
            if name == wanted:
                return value
        return None

    def _attribute(self, data: bytes, wanted: str) -> tuple[str, Any]:
        version = data[0]
        if version == 1:
            nsize, tsize, ssize = struct.unpack_from("<HHH", data, 2)
            pad = lambda n: (n + 7) & ~7  # noqa: E731
            pos = 8
            name = data[pos : pos + nsize].rstrip(b"\x00").decode("utf-8", "replace")
            pos += pad(nsize)
            tpos, pos = pos, pos + pad(tsize)
            spos, pos = pos, pos + pad(ssize)
        elif version in (2, 3):
            if data[1] & 0x03:
                raise Unsupported("shared attribute datatype or dataspace")
            nsize, tsize, ssize = struct.unpack_from("<HHH", data, 2)
            pos = 8 + (1 if version == 3 else 0)
            name = data[pos : pos + nsize].rstrip(b"\x00").decode("utf-8", "replace")
            pos += nsize
            tpos, pos = pos, pos + tsize
            spos, pos = pos, pos + ssize
        else:
            raise Unsupported("attribute message version")
        if name != wanted:
            return name, None
        dims = self._dataspace(data[spos : spos + ssize])
        if dims is None:
            return name, None  # a null dataspace: h5py gives an Empty, not a str
        if dims:
            return name, NotScalar  # a non-scalar attribute: never a layer name
        return name, self._scalar(data[tpos : tpos + tsize], data[pos:])

    def _scalar(self, dtype: bytes, raw: bytes) -> Any:
        cls = dtype[0] & 0x0F
        size = struct.unpack_from("<I", dtype, 4)[0]
        if cls == 3:  # fixed-length string: h5py returns bytes
            if len(raw) < size:
                raise Unsupported("truncated attribute")
            return raw[:size].split(b"\x00", 1)[0]
        if cls == 9 and (dtype[1] & 0x0F) == 1:  # variable-length string: h5py returns str
            if len(raw) < 4 + self.O + 4:
                raise Unsupported("truncated attribute")
            length = struct.unpack_from("<I", raw, 0)[0]
            collection = self._u(raw, 4, self.O)
            index = struct.unpack_from("<I", raw, 4 + self.O)[0]
            if collection == 0 and length == 0:
                return ""
            blob = self._global_heap(collection).get(index)
            if blob is None or len(blob) < length:
                raise Unsupported("dangling global heap reference")
            return blob[:length].decode("utf-8", "surrogateescape")
        return NotScalar  # numbers and anything else: not a layer name

    def _global_heap(self, addr: int) -> dict[int, bytes]:
        cached = self._gheap.get(addr)
        if cached is not None:
            return cached
        head = self._read(addr, 8 + self.L)
        if not head.startswith(b"GCOL"):
            raise Unsupported("bad global heap collection")
        size = self._u(head, 8, self.L)
        buf = self._read(addr, size)
        objects: dict[int, bytes] = {}
        pos = 8 + self.L
        while pos + 8 + self.L <= size:
            index, _ = struct.unpack_from("<HH", buf, pos)
            osize = self._u(buf, pos + 8, self.L)
            pos += 8 + self.L
            if index == 0:
                break
            if pos + osize > size:
                raise Unsupported("global heap object overruns its collection")
            objects[index] = buf[pos : pos + osize]
            pos += (osize + 7) & ~7
        self._gheap[addr] = objects
        return objects

    # -- datasets -------------------------------------------------------------------------------

    def _dataspace(self, data: bytes) -> tuple[int, ...] | None:
        """Dimensions; () for a scalar, None for a null dataspace."""
        version, rank = data[0], data[1]
        if version == 1:
            pos = 8
        elif version == 2:
            if data[3] == 2:
                return None
            pos = 4
        else:
            raise Unsupported("dataspace version")
        return tuple(self._u(data, pos + i * self.L, self.L) for i in range(rank))

    @staticmethod
    def is_dataset(header: _Header) -> bool:
        return any(mtype == _MSG_LAYOUT for mtype, _, _ in header.messages)

    def dataset(self, header: _Header) -> DatasetInfo | None:
        """Where a dataset's bytes are and how to decode them; None when this reader cannot
        read its values (chunked, compressed, not a number...). Call on datasets only."""
        try:
            return self._dataset(header)
        except Unsupported:
            return None

    def _dataset(self, header: _Header) -> DatasetInfo:
        dims = dtype = layout = None
        for mtype, mflags, data in header.messages:
            if mtype == _MSG_LAYOUT:
                layout = data
            elif mtype == _MSG_DATASPACE:
                if mflags & 0x02:
                    raise Unsupported("shared dataspace")
                dims = self._dataspace(data)
            elif mtype == _MSG_DATATYPE:
                if mflags & 0x02:
                    raise Unsupported("shared (committed) datatype")
                dtype = data
            elif mtype == _MSG_FILTERS:
                raise Unsupported("filtered (compressed) dataset")
        if layout is None or dtype is None:
            raise Unsupported("dataset without a layout or datatype")
        count = 0
        if dims is not None:
            count = 1
            for d in dims:
                count *= d
        bfloat16 = False
        if dtype[0] & 0x0F == 5 and struct.unpack_from("<I", dtype, 4)[0] == 2:
            # Opaque: Keras writes bfloat16 so, with a "dtype" attribute that says it.
            tag = self.attribute(header, "dtype")
            if tag not in ("bfloat16", b"bfloat16"):
                raise Unsupported("an opaque datatype other than Keras's bfloat16")
            typecode, big, bfloat16 = "H", False, True
        else:
            typecode, big = _typecode(dtype)
        itemsize = struct.calcsize(typecode)
        if layout[0] not in (3, 4):
            raise Unsupported("old data layout version")
        if layout[1] == 0:  # compact
            size = struct.unpack_from("<H", layout, 2)[0]
            inline = layout[4 : 4 + size]
            if len(inline) < count * itemsize:
                raise Unsupported("truncated compact dataset")
            return DatasetInfo(None, count * itemsize, typecode, big, count, inline, dims, bfloat16)
        if layout[1] == 1:  # contiguous
            addr = self._u(layout, 2, self.O)
            nbytes = self._u(layout, 2 + self.O, self.L)
            if addr == UNDEFINED or nbytes < count * itemsize or addr + nbytes > self.end:
                raise Unsupported("unallocated or out-of-range dataset")
            return DatasetInfo(
                self.src.start + addr, count * itemsize, typecode, big, count, None, dims, bfloat16
            )
        raise Unsupported("chunked or virtual dataset")


class _NotScalar:
    """An attribute that exists but is not a scalar string (h5py would give an array)."""

    def __repr__(self) -> str:
        return "NotScalar"


NotScalar = _NotScalar()


def _typecode(dtype: bytes) -> tuple[str, bool]:
    cls = dtype[0] & 0x0F
    big = bool(dtype[1] & 0x01)
    size = struct.unpack_from("<I", dtype, 4)[0]
    if cls == 1:  # floating point
        if dtype[1] & 0x40:
            raise Unsupported("VAX float order")
        code = {2: "e", 4: "f", 8: "d"}.get(size)
    elif cls == 0:  # fixed point
        signed = bool(dtype[1] & 0x08)
        code = {1: "b", 2: "h", 4: "i", 8: "q"}.get(size)
        if code and not signed:
            code = code.upper()
    else:
        code = None
    if code is None:
        raise Unsupported("a datatype other than integer or float")
    return code, big


def decode(info: DatasetInfo, raw: bytes) -> tuple[float | int, ...]:
    """A dataset's bytes as a flat tuple of numbers, in C order."""
    order = ">" if info.big_endian else "<"
    values = struct.unpack(f"{order}{info.count}{info.typecode}", raw[: info.nbytes])
    if info.bfloat16:  # the high 16 bits of a float32
        wide = struct.pack(f"<{info.count}I", *(v << 16 for v in values))
        return struct.unpack(f"<{info.count}f", wide)
    return values


# -- the Keras layout --------------------------------------------------------------------------

# Groups below a layer's weights group that hold a wrapped layer, not the layer's own state.
INNER_LAYER_GROUPS = ("layer", "forward_layer", "backward_layer")
#: Root groups that are not a subclassed model's attribute layers.
ROOT_GROUPS = ("layers", "vars", "optimizer")


class PendingDataset:
    """A dataset found by the index; where its bytes are is worked out on first use."""

    __slots__ = ("_done", "_h5", "_header", "_info")

    def __init__(self, h5: File, header: _Header) -> None:
        self._h5 = h5
        self._header = header
        self._info: DatasetInfo | None = None
        self._done = False

    def info(self) -> DatasetInfo | None:
        if not self._done:
            self._info = self._h5.dataset(self._header)
            self._done = True
        return self._info

    def extent(self) -> tuple[tuple[int, ...] | None, int, int] | None:
        """(shape, element size in bytes, HDF5 datatype class) from the dataset's dataspace
        and datatype messages, whatever its layout, filters or type (a chunked, compressed
        or opaque ``bfloat16`` dataset too); None when they cannot be read."""
        return dataset_extent(self._h5, self._header)


def raw_layout(h5: File, header: _Header) -> tuple[int | None, int, bytes | None]:
    """(absolute offset or None, size, inline bytes or None) of a contiguous or compact
    dataset's raw data, whatever its datatype. Raises :class:`Unsupported` otherwise."""
    for mtype, _, data in header.messages:
        if mtype == _MSG_LAYOUT and len(data) >= 4 and data[0] in (3, 4):
            if data[1] == 0:
                size = struct.unpack_from("<H", data, 2)[0]
                return None, size, data[4 : 4 + size]
            if data[1] == 1:
                addr, size = h5._u(data, 2, h5.O), h5._u(data, 2 + h5.O, h5.L)
                if addr == UNDEFINED or addr + size > h5.end:
                    raise Unsupported("unallocated or out-of-range dataset")
                return h5.src.start + addr, size, None
    raise Unsupported("not a contiguous or compact dataset")


def dataset_extent(h5: File, header: _Header) -> tuple[tuple[int, ...] | None, int, int] | None:
    """See :meth:`PendingDataset.extent`."""
    dims: tuple[int, ...] | None = ()
    found_space = size = cls = None
    try:
        for mtype, mflags, data in header.messages:
            if mtype == _MSG_DATASPACE and not mflags & 0x02:
                dims, found_space = h5._dataspace(data), True
            elif mtype == _MSG_DATATYPE and not mflags & 0x02 and len(data) >= 8:
                cls, size = data[0] & 0x0F, struct.unpack_from("<I", data, 4)[0]
    except (Unsupported, IndexError, struct.error):
        return None
    if found_space is None or size is None or cls is None:
        return None
    return dims, size, cls


@dataclass
class KerasIndex:
    variables: dict[str, tuple[str, ...]]
    optimizer_variables: int | None
    datasets: dict[str, PendingDataset]
    #: The layer name Keras recorded (``vars`` attribute ``name``) of each group *inside* a
    #: layer's group that holds a sublayer (``.../fused_mb_conv_block/bn1``), by HDF5 path.
    names: dict[str, str]


class _Node:
    __slots__ = ("_header", "addr", "children", "is_dataset", "path")

    def __init__(
        self,
        path: str,
        addr: int,
        header: _Header | None,
        children: dict[str, Link] | None,
        is_dataset: bool,
    ) -> None:
        self.path = path
        self.addr = addr
        self._header = header
        self.children = children
        self.is_dataset = is_dataset


class _Walker:
    """The same traversal as ``_keras_common``'s h5py version, over :class:`File`."""

    def __init__(self, h5: File) -> None:
        self.h5 = h5
        self.datasets: dict[str, PendingDataset] = {}
        self._nodes: dict[str, _Node] = {}
        self._count = 0
        self._paths: dict[int, str] = {}  # object header address -> the first path to it
        self._aliases = 0
        self._walked: set[str] = set()
        self._from_cache: set[str] = set()  # groups listed from their parent's cache
        self.names: dict[str, str] = {}

    def node(self, path: str, link: Link) -> _Node:
        cached = self._nodes.get(path)
        if cached is not None:
            return cached
        self._count += 1
        if self._count > 5_000_000:
            raise Unsupported("too many objects")
        addr, stab = link
        first = self._paths.setdefault(addr, path)
        if first != path:
            self._alias(path, addr)
        if stab is not None:
            # An old-style group whose parent cached its symbol table: no need to read its
            # header unless its attributes are wanted.
            node = _Node(path, addr, None, self.h5._symbol_table(*stab), False)
            self._from_cache.add(path)
        else:
            header = self.h5.header(addr)
            try:
                children = self.h5.children(header)
            except OutsideReference as exc:
                raise OutsideReference(_join(path, exc.where), exc.what) from None
            is_dataset = False
            if children is None:
                if not self.h5.is_dataset(header):
                    raise Unsupported("an object that is neither a group nor a dataset")
                is_dataset = True
                _refuse_outside_storage(header, path)
                self.datasets[path] = PendingDataset(self.h5, header)
            node = _Node(path, addr, header, children, is_dataset)
        self._nodes[path] = node
        return node

    def walk_all(self, group: _Node, depth: int = 0) -> None:
        """Visit every object below ``group`` (each dataset's header is checked by
        :meth:`node`), so a file that points outside itself anywhere is refused, not only
        where the index looks. Objects already visited cost nothing more."""
        if depth > _MAX_DEPTH:
            raise Unsupported("groups nested too deeply")
        for key, link in (group.children or {}).items():
            child = self.node(_join(group.path, key), link)
            if child.children is not None and child.path not in self._walked:
                self._walked.add(child.path)
                if child.path in self._from_cache:
                    # Listed from the symbol table its parent cached: its own header must
                    # say the same (HDF5 turns a group that gets an external link into a
                    # new-style one and the parent's cache goes stale).
                    try:
                        own = self.h5.children(self.header(child))
                    except OutsideReference as exc:
                        raise OutsideReference(_join(child.path, exc.where), exc.what) from None
                    if own is not child.children:
                        raise Unsupported(f"a stale symbol table cache at {child.path}")
                self.walk_all(child, depth + 1)

    def _alias(self, path: str, addr: int) -> None:
        """``path`` leads to an object already reached by another path (a hard link): fine
        once in a while, but not when the group is its own ancestor, or so often that walking
        the paths (what h5py would do too) never ends."""
        self._aliases += 1
        if self._aliases > _MAX_ALIASES:
            raise Malformed(f"more than {_MAX_ALIASES} objects reached again through hard links")
        parent = path.rpartition("/")[0] or "/"
        while True:
            node = self._nodes.get(parent)
            if node is not None and node.addr == addr:
                raise Malformed(f"the group {parent!r} contains itself (a cycle of hard links)")
            if parent == "/":
                return
            parent = parent.rpartition("/")[0] or "/"

    def header(self, node: _Node) -> _Header:
        if node._header is None:
            node._header = self.h5.header(node.addr)
        return node._header

    def get(self, group: _Node, key: str) -> _Node | None:
        if group.children is None or key not in group.children:
            return None
        return self.node(_join(group.path, key), group.children[key])

    def group_name(self, group: _Node, fallback: str) -> str:
        vars_group = self.get(group, "vars")
        name = None
        if vars_group is not None:
            name = self.h5.attribute(self.header(vars_group), "name")
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return name if isinstance(name, str) and name else fallback

    def own_datasets(self, group: _Node, skip: tuple[str, ...]) -> list[str]:
        found: list[str] = []

        def visit(g: _Node, depth: int) -> None:
            if depth > _MAX_DEPTH:
                raise Unsupported("groups nested too deeply")
            if g.children is None:
                raise Unsupported("iterating a dataset")
            for key in sorted(g.children, key=_natural):
                if key in skip and g is group:
                    continue
                child = self.node(_join(g.path, key), g.children[key])
                if child.is_dataset:
                    found.append(child.path)
                else:
                    if key != "vars":
                        name = self.group_name(child, "")
                        if name:
                            self.names[child.path] = name
                    visit(child, depth + 1)

        visit(group, 0)
        return found

    def index_layers(
        self, group: _Node, prefix: str, out: dict[str, tuple[str, ...]], depth: int
    ) -> None:
        layers = self.get(group, "layers")
        if layers is None:
            return
        if layers.children is None:
            raise Unsupported("'layers' is not a group")
        for key, link in layers.children.items():
            child = self.node(_join(layers.path, key), link)
            self.index_layer(child, prefix + self.group_name(child, key), out, depth + 1)

    def index_layer(
        self, group: _Node, path: str, out: dict[str, tuple[str, ...]], depth: int
    ) -> None:
        if depth > _MAX_DEPTH:
            raise Unsupported("layers nested too deeply")
        out[path] = tuple(self.own_datasets(group, ("layers", *INNER_LAYER_GROUPS)))
        self.index_layers(group, path + "/", out, depth)
        for inner in INNER_LAYER_GROUPS:
            sub = self.get(group, inner)
            if sub is not None:
                self.index_layer(sub, f"{path}/{self.group_name(sub, inner)}", out, depth + 1)


def _refuse_outside_storage(header: _Header, path: str) -> None:
    """Raise :class:`OutsideReference` for a dataset whose values live in other files."""
    for mtype, _, data in header.messages:
        if mtype == _MSG_EXTERNAL_FILES:
            raise OutsideReference(path, "external raw storage")
        if mtype == _MSG_LAYOUT and len(data) > 1 and data[0] in (3, 4) and data[1] == 3:
            raise OutsideReference(path, "a virtual dataset")


def _join(parent: str, key: str) -> str:
    return f"{parent}/{key}" if parent != "/" else f"/{key}"


def _natural(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)


def index_keras_weights(source: ByteSource) -> KerasIndex:
    """Index a Keras 3 ``model.weights.h5``: each layer path's variable datasets, the number of
    saved optimizer variables, and where every visited dataset's bytes are (the optimizer's
    ``/optimizer/vars/<i>`` included, so their shapes can be checked against the variables
    they follow)."""
    h5 = File(source)
    walker = _Walker(h5)
    root = walker.node("/", (h5.root, None))
    if root.children is None:
        raise Unsupported("the root object is not a group")
    variables: dict[str, tuple[str, ...]] = {}
    walker.index_layers(root, "", variables, 0)
    # A subclassed model's sublayers are saved under their attribute names at the root.
    for key in sorted(root.children, key=_natural):
        if key not in ROOT_GROUPS:
            child = walker.get(root, key)
            if child is not None and not child.is_dataset:
                walker.index_layer(child, walker.group_name(child, key), variables, 1)
    walker.walk_all(root)  # nothing anywhere in the file points outside it
    optimizer = walker.get(root, "optimizer")
    opt_vars = walker.get(optimizer, "vars") if optimizer is not None else None
    count = None
    if opt_vars is not None and opt_vars.children is not None:
        count = len(opt_vars.children) or None  # an empty group (bnfreeze's drop) holds none
        for key, link in opt_vars.children.items():
            walker.node(_join(opt_vars.path, key), link)
    return KerasIndex(variables, count, walker.datasets, walker.names)


class Numbers(Sequence):
    """A dataset's values: a flat, read-only sequence of numbers in C order, decoded from its
    bytes on first use. ``count(x)`` of a value stored exactly compares bytes, at C speed."""

    __slots__ = ("_info", "_raw", "_values")

    def __init__(self, info: DatasetInfo, raw: bytes) -> None:
        self._info, self._raw = info, raw[: info.nbytes]
        self._values: tuple[float | int, ...] | None = None

    def _decoded(self) -> tuple[float | int, ...]:
        if self._values is None:
            self._values = decode(self._info, self._raw)
        return self._values

    def __len__(self) -> int:
        return self._info.count

    def __getitem__(self, index: Any) -> Any:
        return self._decoded()[index]

    def __iter__(self) -> Iterator[float | int]:
        return iter(self._decoded())

    def count(self, value: Any) -> int:
        fmt = (">" if self._info.big_endian else "<") + self._info.typecode
        try:
            packed = struct.pack(fmt, value)
            exact = struct.unpack(fmt, packed)[0] == value
        except (struct.error, OverflowError, TypeError):
            exact = False
        if exact and not self._info.bfloat16 and self._raw == packed * self._info.count:
            return self._info.count
        return self._decoded().count(value)

    def tolist(self) -> list[float | int]:
        return list(self._decoded())

    def __repr__(self) -> str:
        return f"Numbers({self._info.count} x {self._info.typecode})"


def read_datasets(
    datasets: dict[str, PendingDataset], names: list[str], pread: Callable[[int, int], bytes]
) -> dict[str, Numbers]:
    """The named datasets' values; names not in ``datasets`` or not readable are left out."""
    out: dict[str, Numbers] = {}
    for name in names:
        pending = datasets.get(name)
        info = pending.info() if pending is not None else None
        if info is None:
            continue
        raw = info.inline if info.inline is not None else pread(info.offset or 0, info.nbytes)
        if len(raw) < info.nbytes:
            continue
        out[name] = Numbers(info, raw)
    return out
