"""bnfreeze.formats.writers._hdf5_edit: the optimizer group rewritten by appending and patching,
read back by h5py (the library Keras loads with) and by bnfreeze's lean reader."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest

from bnfreeze.formats.readers import _hdf5
from bnfreeze.formats.writers import OptimizerSlot
from bnfreeze.formats.writers._hdf5_edit import (
    Patch,
    patched_crc32,
    plan_rewrite,
    tail_crc32,
)


@pytest.mark.parametrize("seed", range(5))
def test_the_crc_of_a_patched_copy_is_derived_without_reading_it(seed):
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(rng.randrange(1, 50_000)))
    patches = []
    for offset in sorted(rng.sample(range(len(data)), min(3, len(data)))):
        n = min(rng.randrange(1, 17), len(data) - offset)
        if patches and offset < patches[-1].offset + len(patches[-1].new):
            continue
        new = rng.randbytes(n)
        patches.append(Patch(offset, bytes(data[offset : offset + n]), new))
    crc = patched_crc32(zlib.crc32(data), len(data), patches)
    for p in patches:
        data[p.offset : p.offset + len(p.new)] = p.new
    assert crc == zlib.crc32(data)
    tail = (b"abc", 5000, b"xyz" * 3, 1 << 21)
    expect = zlib.crc32(bytes(data) + b"abc" + bytes(5000) + b"xyz" * 3 + bytes(1 << 21))
    assert tail_crc32(crc, tail) == expect


def _weights(path: Path, slots: int, libver: str = "earliest") -> list[bytes]:
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    values = []
    with h5py.File(path, "w", libver=libver) as h5:
        layer = h5.create_group("layers/dense/vars")
        layer.attrs["name"] = "dense"
        layer.create_dataset("0", data=rng.standard_normal((3, 4), "float32"))
        layer.create_dataset("1", data=np.float32([1.5]))  # tiny: contiguous all the same
        h5.create_group("vars")
        opt = h5.create_group("optimizer/vars")
        opt.attrs["name"] = "adam"
        for i in range(slots):
            value = rng.standard_normal((3, 4), "float32") if i > 1 else np.float32(i)
            opt.create_dataset(str(i), data=value)
            values.append(np.asarray(value).tobytes())
    return values


def _apply(path: Path, slots: list[OptimizerSlot]) -> Path:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        plan = plan_rewrite(_hdf5.ByteSource(fh.fileno(), 0, size), slots)
        data = bytearray(fh.read())
    for p in plan.patches:
        assert data[p.offset : p.offset + len(p.old)] == p.old
        data[p.offset : p.offset + len(p.new)] = p.new
    for part in plan.tail:
        data += part if isinstance(part, bytes) else bytes(part)
    assert len(data) == plan.size
    crc = tail_crc32(patched_crc32(zlib.crc32(path.read_bytes()), size, plan.patches), plan.tail)
    assert crc == zlib.crc32(data)
    out = path.with_name("out.h5")
    out.write_bytes(data)
    return out


@pytest.mark.parametrize("count", [0, 3, 7, 300, 1200])
def test_h5py_and_the_lean_reader_read_the_rewritten_group(tmp_path, count):
    """Up to 1,200 links: symbol table nodes hold 8, a B-tree node 32 children, so the
    larger counts need two and three B-tree levels."""
    import h5py
    import numpy as np

    src = tmp_path / "w.h5"
    saved = _weights(src, 1500)
    rng = random.Random(count)
    sources = [rng.randrange(1500) for _ in range(count)]
    slots = [
        OptimizerSlot(None, "/layers/dense/vars/0")
        if s % 5 == 0
        else OptimizerSlot(f"/optimizer/vars/{s}", "")
        for s in sources
    ]
    out = _apply(src, slots)
    with h5py.File(out, "r") as h5, h5py.File(src, "r") as before:
        group = h5["optimizer/vars"]
        assert len(group) == count and dict(group.attrs) == {"name": "adam"}
        for i, slot in enumerate(slots):
            value = group[str(i)][()]
            if slot.source is None:
                assert value.shape == (3, 4) and value.dtype == np.float32 and not value.any()
            else:
                assert np.asarray(value).tobytes() == saved[int(slot.source.rsplit("/", 1)[1])]
        for name in ("layers/dense/vars/0", "layers/dense/vars/1"):
            assert h5[name][()].tobytes() == before[name][()].tobytes()
    with open(out, "rb") as fh:
        index = _hdf5.index_keras_weights(_hdf5.ByteSource(fh.fileno(), 0, os.path.getsize(out)))
    assert index.optimizer_variables == (count or None)
    assert index.variables == {"dense": ("/layers/dense/vars/0", "/layers/dense/vars/1")}


def test_a_layout_h5py_does_not_write_by_default_is_refused(tmp_path):
    src = tmp_path / "w.h5"
    _weights(src, 4, libver="latest")
    with open(src, "rb") as fh, pytest.raises(_hdf5.Unsupported):
        plan_rewrite(
            _hdf5.ByteSource(fh.fileno(), 0, src.stat().st_size),
            [OptimizerSlot("/optimizer/vars/0", "")],
        )


def test_a_slot_that_names_no_dataset_is_refused(tmp_path):
    src = tmp_path / "w.h5"
    _weights(src, 4)
    with open(src, "rb") as fh, pytest.raises(_hdf5.Unsupported, match="no /optimizer/vars/9"):
        plan_rewrite(
            _hdf5.ByteSource(fh.fileno(), 0, src.stat().st_size),
            [OptimizerSlot("/optimizer/vars/9", "")],
        )
