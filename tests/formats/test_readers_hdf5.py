"""The lean pure-Python HDF5 reader must agree with h5py, or step aside.

``bnfreeze.formats.readers._hdf5`` indexes ``model.weights.h5`` without importing h5py. For
every file it either returns exactly what the h5py path returns (same layer paths, same dataset
lists in the same order, same optimizer variable count, same values) or raises ``Unsupported``
so the h5py path runs. These tests build weights files in the layouts h5py can write (old- and
new-style groups, big groups with multi-level B-trees, compact/contiguous/chunked/compressed
datasets, fixed and variable-length string attributes, soft links) and compare the two readers.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from paths import ROOT

from bnfreeze.errors import ModelFormatError
from bnfreeze.formats.readers import _hdf5, read_model, read_values
from bnfreeze.formats.readers._keras_common import Member, MemberFile, index_member, index_weights

SAMPLE_KERAS = ["seed_bn.keras", "guide_pattern.keras", "bn_under_frozen.keras", "sequential.keras"]


def _lean(path: Path) -> _hdf5.KerasIndex:
    with open(path, "rb") as fh:
        return _hdf5.index_keras_weights(_hdf5.ByteSource(fh.fileno(), 0, path.stat().st_size))


def _reference(path: Path):
    index, count = index_weights(str(path), str(path))
    return index.variables, count


def _write_keras_like(
    path: Path,
    *,
    libver: str = "earliest",
    track_order: bool = False,
    layers: int = 5,
    fixed_names: bool = False,
    compact: bool = False,
    chunked: bool = False,
    compression: str | None = None,
    soft_link: bool = False,
    optimizer: int = 0,
    wrapper: bool = False,
    inner_count: int = 12,
) -> None:
    """A file shaped like Keras 3's model.weights.h5: layers/<key>/vars/<i> + a name attr."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w", libver=libver, track_order=track_order) as f:
        top = f.create_group("layers")
        for i in range(layers):
            group = top.create_group(f"batch_normalization_{i}" if i else "batch_normalization")
            v = group.create_group("vars")
            name = f"bn_{i}"
            if fixed_names:
                v.attrs["name"] = np.bytes_(name)
            else:
                v.attrs["name"] = name
            for j, value in enumerate((1.0, 0.0, 0.0, 1.0)):
                data = np.full((4 + i,), value, "float32") if i % 2 else rng.normal(size=4 + i)
                kwargs = {}
                if compact:
                    kwargs["compact"] = True
                if chunked or compression:
                    kwargs["chunks"] = True
                if compression:
                    kwargs["compression"] = compression
                if compact:
                    space = h5py.h5s.create_simple(data.shape)
                    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                    plist.set_layout(h5py.h5d.COMPACT)
                    dsid = h5py.h5d.create(
                        v.id, str(j).encode(), h5py.h5t.IEEE_F32LE, space, dcpl=plist
                    )
                    dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, data.astype("float32"))
                else:
                    v.create_dataset(str(j), data=data.astype("float32"), **kwargs)
        if wrapper:
            w = top.create_group("bidirectional")
            w.create_group("vars").attrs["name"] = "bidi"
            for inner in ("forward_layer", "backward_layer"):
                g = w.create_group(inner)
                gv = g.create_group("vars")
                gv.attrs["name"] = inner[:3]
                gv.create_dataset("0", data=np.ones(3, "float32"))
                cell = g.create_group("cell")
                cell.create_group("vars").create_dataset("0", data=np.zeros(2, "float32"))
        nested = top.create_group("functional")
        nested.create_group("vars").attrs["name"] = "backbone"
        inner = nested.create_group("layers").create_group("dense")
        inner_vars = inner.create_group("vars")
        inner_vars.attrs["name"] = "inner_dense"
        for j in range(inner_count):  # more than 10: natural order "2" < "10"
            inner_vars.create_dataset(str(j), data=np.arange(3, dtype="float64") + j)
        if soft_link:
            inner_vars["alias"] = h5py.SoftLink("/layers/functional/layers/dense/vars/0")
        if optimizer:
            ov = f.create_group("optimizer").create_group("vars")
            ov.attrs["name"] = "adam"
            for j in range(optimizer):
                ov.create_dataset(str(j), data=np.int64(j))
        f.create_group("vars").attrs["name"] = "model"


LAYOUTS = {
    "default": {},
    "many-layers-multilevel-btree": {"layers": 300, "optimizer": 70},
    "libver-latest-compact-links": {"libver": "latest", "layers": 3, "inner_count": 4},
    "libver-latest-dense-links": {"libver": "latest", "layers": 40},
    "track-order": {"track_order": True},
    "fixed-length-names": {"fixed_names": True},
    "compact-datasets": {"compact": True},
    "chunked-datasets": {"chunked": True},
    "compressed-datasets": {"compression": "gzip"},
    "soft-link": {"soft_link": True},
    "wrapper-layers": {"wrapper": True},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lean_index_matches_h5py_or_steps_aside(tmp_path, layout):
    path = tmp_path / "model.weights.h5"
    _write_keras_like(path, **LAYOUTS[layout])
    expected = _reference(path)
    try:
        found = _lean(path)
    except _hdf5.Unsupported:
        # Allowed only for layouts Keras does not write (h5py's defaults are libver
        # "earliest", no soft links, no creation-order tracking).
        assert layout in {"libver-latest-dense-links", "soft-link", "track-order"}, layout
        return
    assert (found.variables, found.optimizer_variables) == expected
    assert list(found.variables) == list(expected[0])  # same order, too


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_index_member_equals_h5py_and_values_equal_numpy(tmp_path, layout):
    path = tmp_path / "model.weights.h5"
    _write_keras_like(path, **LAYOUTS[layout])
    index, count = index_member(Member(str(path), 0, path.stat().st_size), str(path))
    variables, expected_count = _reference(path)
    assert index.variables == variables and count == expected_count
    names = [d for ds in index.variables.values() for d in ds]
    if index.locations:
        with open(path, "rb") as fh:
            fd = fh.fileno()
            values = _hdf5.read_datasets(index.locations, names, lambda a, n: os.pread(fd, n, a))
    else:
        values = {}
    with h5py.File(path, "r") as f:
        for name, value in values.items():
            np.testing.assert_array_equal(np.asarray(value), f[name][()].ravel())
    if layout in {"default", "compact-datasets", "many-layers-multilevel-btree"}:
        assert index.locations and len(values) == len(names)  # the lean path did the work


def test_keras_layout_in_a_stored_zip_member(tmp_path):
    """The weights member of a .keras archive is read in place, at its offset."""
    weights = tmp_path / "w.h5"
    _write_keras_like(weights, layers=3, optimizer=4)
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr("metadata.json", "{}")
        z.writestr("padding/" + "x" * 300, b"\0" * 1000)  # pushes the member to an odd offset
        z.write(weights, "model.weights.h5")
    from bnfreeze.formats.readers.keras_zip import stored_member

    with zipfile.ZipFile(archive) as z:
        member = stored_member(archive, z.getinfo("model.weights.h5"))
    assert member.size == weights.stat().st_size
    with open(archive, "rb") as fh:
        fh.seek(member.start)
        assert fh.read(8) == _hdf5.SIGNATURE
        found = _hdf5.index_keras_weights(_hdf5.ByteSource(fh.fileno(), member.start, member.size))
    assert (found.variables, found.optimizer_variables) == _reference(weights)


def test_member_file_is_a_bounded_seekable_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)))
    with open(path, "rb") as fh:
        f = MemberFile(fh.fileno(), Member(str(path), 10, 20))
        assert f.read(5) == bytes(range(10, 15))
        assert f.seek(-3, io.SEEK_END) == 17 and f.read() == bytes(range(27, 30))
        assert f.seek(18) == 18 and f.read(10) == bytes(range(28, 30)) and f.read(1) == b""
        with pytest.raises(OSError):
            f.seek(-1)


@pytest.mark.parametrize("sample", SAMPLE_KERAS)
def test_samples_use_the_lean_reader_and_agree_with_h5py(samples, sample):
    model = read_model(samples / sample)
    assert model.weights is not None and model.weights.locations  # lean path taken
    with zipfile.ZipFile(samples / sample) as z:
        reference, count = index_weights(io.BytesIO(z.read("model.weights.h5")), sample)
    assert model.weights.variables == reference.variables
    assert model.optimizer_variables == count
    names = [d for ds in model.weights.variables.values() for d in ds]
    values = read_values(model, names)
    assert set(values) == set(names)
    with zipfile.ZipFile(samples / sample) as z:
        raw = io.BytesIO(z.read("model.weights.h5"))
    with h5py.File(raw) as f:
        for name, value in values.items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(f[name][()]).ravel())


@pytest.mark.parametrize("cut", [0, 8, 100, 700, 2000, 5000, -1000, -8])
def test_truncated_weights_give_the_same_result_as_h5py(tmp_path, cut):
    """A damaged weights file: the lean reader steps aside and h5py decides."""
    path = tmp_path / "model.weights.h5"
    _write_keras_like(path, layers=4)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    member = Member(str(path), 0, path.stat().st_size)

    def outcome(fn):
        try:
            index, count = fn()
            return ("ok", index.variables, count)
        except ModelFormatError as exc:  # anything else is a bug: it propagates
            return ("error", str(exc))

    lean_first = outcome(lambda: index_member(member, "m"))
    with open(path, "rb") as fh:
        h5py_only = outcome(lambda: index_weights(MemberFile(fh.fileno(), member), "m"))
    assert lean_first == h5py_only
    assert lean_first[0] == "error", "a truncated weights file was read as whole"


def test_metadata_reads_are_bounded(tmp_path):
    """Sizes and offsets read from the file are checked before any read."""
    source = _hdf5.ByteSource(os.open(os.devnull, os.O_RDONLY), 0, 10)
    with pytest.raises(_hdf5.Unsupported):
        source.read(5, 6)
    with pytest.raises(_hdf5.Unsupported):
        source.read(-1, 2)


@pytest.mark.parametrize(
    "array",
    [
        np.ones(5, "float32"),
        np.zeros(3, "float32"),
        np.array([], "float32"),
        np.float32(1),
        np.array([1, 1 + 1e-7], "float32"),
        np.array([1 - 6e-8] * 3, "float32"),
        np.array([np.nan], "float32"),
        np.array([1e-8, -1e-8], "float32"),
        np.array([-0.0], "float32"),
        np.ones((2, 2), "float32"),
        np.array([np.inf], "float32"),
        np.random.default_rng(0).normal(size=10).astype("float32"),
    ],
)
def test_untrained_check_without_numpy_agrees_with_numpy(array):
    """diagnostics._is_constant takes the lean reader's tuples (and h5py's arrays) and must
    give numpy's verdict: np.all(|x - expected| <= atol) on float64, non-empty."""
    from bnfreeze.model.diagnostics import _UNTRAINED_ATOL, _is_constant

    def numpy_verdict(expected):
        if expected is None:
            return numpy_verdict(0.0) or numpy_verdict(1.0)
        a = np.asarray(array, dtype="float64")
        return bool(a.size) and bool(np.all(np.abs(a - expected) <= _UNTRAINED_ATOL))

    flat = tuple(np.asarray(array, "float32").ravel().tolist())
    for expected in (0.0, 1.0, None):
        assert _is_constant(array, expected) == numpy_verdict(expected)
        assert _is_constant(flat, expected) == numpy_verdict(expected)


# -- crafted files: cycles and bloated claims (issue 6) ---------------------------------------
# Each case is a valid h5py-written file with pointers patched (tests/support/hdf5_crafted.py says
# how). Before the reader's caps, the continuation cases each allocated gigabytes (MemoryError
# under a 3 GiB limit), long-link-name and group-dag-fanout ran for minutes, and h5py itself
# also never finished group-dag-fanout and took 6 s and 2 GB on v1-continuation-overlapping.

#: What the lean reader must do with each: "malformed" (refused as damaged, h5py never runs)
#: or "h5py" (plain Unsupported: h5py decides, quickly).
CRAFTED_OUTCOME = {
    "v1-continuation-self-loop": "malformed",
    "v1-continuation-fanout": "malformed",
    "v1-continuation-overlapping": "malformed",
    "shared-continuation-chunk": "malformed",
    "v2-continuation-fanout": "malformed",
    "btree-self-loop": "malformed",
    "group-cycle-fanout": "malformed",
    "group-dag-fanout": "malformed",
    "local-heap-huge-size": "h5py",
    "long-link-name": "h5py",
}
CPU_BOUND = 2.0  # seconds of CPU for one crafted file (typical: 0.05 s)
MEMORY_BOUND = 64 * 2**20  # bytes of Python allocations while the lean reader runs


def _crafted(tmp_path: Path, case: str) -> Path:
    import hdf5_crafted

    build, kwargs = hdf5_crafted.CRAFTED[case]
    valid = tmp_path / "valid.h5"
    _write_keras_like(valid, **kwargs)
    path = tmp_path / f"{case}.h5"
    path.write_bytes(build(valid.read_bytes()))
    return path


def test_every_crafted_case_has_an_expected_outcome():
    import hdf5_crafted

    assert set(CRAFTED_OUTCOME) == set(hdf5_crafted.CRAFTED)


@pytest.mark.parametrize("case", list(CRAFTED_OUTCOME))
def test_crafted_file_is_refused_within_cpu_and_memory_bounds(tmp_path, case):
    import time
    import tracemalloc

    path = _crafted(tmp_path, case)
    # CPU and memory are measured in two runs: tracemalloc multiplies the CPU time of an
    # allocation-heavy walk several times (group-dag-fanout: 0.14 s plain, 0.9-2.3 s traced).
    started = time.process_time()
    with pytest.raises(_hdf5.Unsupported) as caught:
        _lean(path)
    spent = time.process_time() - started
    assert spent < CPU_BOUND, f"{case}: {spent:.2f} s of CPU"
    tracemalloc.start()
    try:
        with pytest.raises(_hdf5.Unsupported):
            _lean(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"{case}: {peak / 2**20:.0f} MiB allocated"
    malformed = isinstance(caught.value, _hdf5.Malformed)
    assert malformed == (CRAFTED_OUTCOME[case] == "malformed"), f"{case}: {caught.value!r}"


@pytest.mark.parametrize("case", list(CRAFTED_OUTCOME))
def test_crafted_file_through_index_member_ends_quickly(tmp_path, case):
    """The whole route (lean reader, then h5py when it steps aside): a one-line
    ModelFormatError for the refused ones, h5py's own answer for the others, in bounded CPU."""
    import time

    path = _crafted(tmp_path, case)
    started = time.process_time()
    try:
        index_member(Member(str(path), 0, path.stat().st_size), path.name)
        outcome = "ok"
    except ModelFormatError as exc:
        outcome = str(exc)
        assert "\n" not in outcome
    spent = time.process_time() - started
    assert spent < CPU_BOUND, f"{case}: {spent:.2f} s of CPU"
    if CRAFTED_OUTCOME[case] == "malformed":
        assert "is a damaged HDF5 file" in outcome, f"{case}: {outcome}"
    else:
        assert "is a damaged HDF5 file" not in outcome, f"{case}: {outcome}"


#: Cases whose builders find their targets in any old-style Keras weights file.
GENERIC_CRAFTED = [
    "v1-continuation-self-loop",
    "v1-continuation-fanout",
    "v1-continuation-overlapping",
    "btree-self-loop",
    "group-cycle-fanout",
]


@pytest.mark.parametrize("case", GENERIC_CRAFTED)
def test_crafted_weights_in_a_keras_archive_exit_2_with_one_line(tmp_path, case):
    """seed_bn.keras with its model.weights.h5 crafted: inspect, check and freeze end with
    exit 2 and one 'error:' line, quickly, leave no output, and leave the input alone."""
    import time

    import hdf5_crafted
    import hostile
    from click.testing import CliRunner

    from bnfreeze.cli import cli

    with zipfile.ZipFile(hostile.SAMPLES / "seed_bn.keras") as z:
        weights = z.read("model.weights.h5")
    build, _ = hdf5_crafted.CRAFTED[case]
    path = tmp_path / f"{case}.keras"
    path.write_bytes(hostile.rezip("seed_bn.keras", {"model.weights.h5": build(weights)}))
    before = path.read_bytes()
    out = tmp_path / "out.keras"
    runner = CliRunner()
    for args in (
        ["inspect", str(path)],
        ["check", str(path), "--expect", "bn-inference"],
        ["freeze", str(path), "--bn-inference", "-o", str(out)],
    ):
        started = time.process_time()
        result = runner.invoke(cli, args)
        spent = time.process_time() - started
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (case, args[0], result.exit_code, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, args[0], lines)
        assert "damaged HDF5" in lines[0], (case, args[0], lines)
        assert spent < CPU_BOUND, f"{args[0]} on {case}: {spent:.2f} s of CPU"
        assert not out.exists()
    assert path.read_bytes() == before


def test_read_budget_leaves_room_for_valid_files(tmp_path):
    """Valid files read well under the budget (about 1.5 times their size), so the cap never
    turns a real model away."""
    path = tmp_path / "model.weights.h5"
    _write_keras_like(path, layers=300, optimizer=70)
    with open(path, "rb") as fh:
        h5 = _hdf5.File(_hdf5.ByteSource(fh.fileno(), 0, path.stat().st_size))
        walker = _hdf5._Walker(h5)
        walker.index_layers(walker.node("/", (h5.root, None)), "", {}, 0)
    assert 0 < h5._spent <= 2 * path.stat().st_size


@pytest.mark.parametrize("depth", [300, 1500])
def test_layers_nested_deeper_than_the_cap_go_to_h5py_and_end_cleanly(tmp_path, depth):
    """Nesting is legal HDF5, so past the lean reader's cap (256) h5py decides: it reads 300
    levels, and at 1,500 its recursion ends in a one-line ModelFormatError, not a crash."""
    import time

    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("layers").create_group("a")
        for i in range(depth):
            group.create_group("vars").attrs["name"] = f"l{i}"
            group = group.create_group("layers").create_group("a")
        group.create_group("vars").create_dataset("0", data=np.ones(2, "float32"))
    with pytest.raises(_hdf5.Unsupported) as caught:
        _lean(path)
    assert not isinstance(caught.value, _hdf5.Malformed)
    started = time.process_time()
    try:
        index, _ = index_member(Member(str(path), 0, path.stat().st_size), "m")
        assert depth == 300 and len(index.variables) == depth + 1
    except ModelFormatError as exc:
        assert depth == 1500 and "\n" not in str(exc)
    assert time.process_time() - started < CPU_BOUND


def test_readme_quotes_the_readers_caps():
    import re

    import hdf5_crafted

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"^## Guarantees\n(.*?)(?=^## )", readme, flags=re.M | re.S)
    assert found
    text = " ".join(found.group(1).split())
    for phrase in (
        f"at most {_hdf5._READ_FACTOR} times its size plus {_hdf5._READ_SLACK >> 20} MiB",
        f"{_hdf5._MAX_CONTINUATIONS:,} continuation chunks in one object header",
        f"{_hdf5._MAX_ALIASES:,} objects reached again through hard links",
        f"groups nested {_hdf5._MAX_DEPTH} deep",
        f"a name over {_hdf5._MAX_NAME >> 10} KiB",
        f"on {len(hdf5_crafted.CRAFTED)} crafted files",
        f"within {CPU_BOUND:g} CPU seconds and {MEMORY_BOUND >> 20} MiB",
    ):
        assert phrase in text, phrase
