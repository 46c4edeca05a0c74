"""A corpus of hostile and broken model files, generated from the samples (nothing binary is
committed), and the checks every command must pass on each of them.

Every case has a ``name`` that is enough to rebuild it exactly: ``truncate:seed_bn.keras@1234``
is the sample cut to its first 1234 bytes, ``flip:seed_bn.keras@1234.5`` is the sample with bit
5 of byte 1234 flipped, ``zip:config-missing`` is a hand-built archive. :func:`build` turns a
name back into the file, so a failure message is a reproduction recipe::

    cd tests/support
    python -c "from hostile import build; build('flip:seed_bn.keras@1234.5', '/tmp/x')"

The counts are deterministic (fixed offsets, fixed seeds): the README's "Guarantees" section
quotes them, and ``tests/test_guarantees_doc.py`` checks it quotes what this module generates.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paths import SAMPLES

#: The samples mutated byte by byte: small, and between them every format and layout.
MUTATED_SAMPLES = ("seed_bn.keras", "sequential.keras", "bn_under_frozen.keras", "nested_legacy.h5")
TRUNCATIONS_PER_SAMPLE = 24
FLIPS_PER_SAMPLE = 24

# -- building blocks ------------------------------------------------------------------------


def sample_bytes(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def _members(name: str) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(SAMPLES / name) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def rezip(
    base: str = "seed_bn.keras",
    replace: dict[str, bytes | None] | None = None,
    compress: dict[str, int] | None = None,
) -> bytes:
    """``base`` with members replaced (``None`` removes one), stored like Keras stores them
    unless ``compress`` says otherwise."""
    replace = replace or {}
    compress = compress or {}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info, data in _members(base):
            if info.filename in replace:
                new = replace.pop(info.filename)
                if new is None:
                    continue
                data = new
            z.writestr(info.filename, data, compress_type=compress.get(info.filename, 0))
        for name, data in replace.items():
            if data is not None:
                z.writestr(name, data, compress_type=compress.get(name, 0))
    return out.getvalue()


def seed_config() -> dict:
    with zipfile.ZipFile(SAMPLES / "seed_bn.keras") as z:
        return json.loads(z.read("config.json"))


def with_config(edit: Callable[[dict], object]) -> bytes:
    """seed_bn.keras with its config.json replaced by ``edit(config)`` (or the edited config
    when ``edit`` returns None)."""
    config = seed_config()
    result = edit(config)
    return rezip(replace={"config.json": json.dumps(config if result is None else result).encode()})


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_objects(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def nested_layers_config(depth: int) -> dict:
    """A model whose only layer is a model whose only layer is ... ``depth`` levels deep."""
    leaf = {"class_name": "Dense", "config": {"name": "d", "trainable": True}}
    for i in range(depth):
        leaf = {"class_name": "Functional", "config": {"name": f"m{i}", "layers": [leaf]}}
    return {"class_name": "Functional", "config": {"name": "top", "layers": [leaf]}}


def lying_size_zip(member: str = "config.json", claimed: int = 2**40) -> bytes:
    """An archive whose central directory claims ``member`` is ``claimed`` bytes."""
    data = bytearray(rezip())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo(member)
    name = member.encode()
    # Central directory entry: signature, ..., uncompressed size at +24, name at +46.
    at = data.find(b"PK\x01\x02" + b"\x00" * 0)
    while at >= 0:
        if data[at + 46 : at + 46 + len(name)] == name:
            break
        at = data.find(b"PK\x01\x02", at + 4)
    assert at >= 0 and info.compress_size
    claimed32 = min(claimed, 0xFFFFFFFE)
    data[at + 24 : at + 28] = claimed32.to_bytes(4, "little")
    return bytes(data)


def deflate_bomb(size: int) -> tuple[bytes, int]:
    """Raw deflate of ``size`` zero bytes (a multiple of 1 MiB), about 1000:1, and its CRC.

    Each MiB is compressed with a full flush, so after the first every MiB compresses to the
    same bytes: the stream is built by repetition, without compressing ``size`` bytes."""
    chunk = bytes(1 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    n = size >> 20
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(chunk, crc)
    return first + again * (n - 1) + comp.flush(), crc


def bomb_zip(member: str, size: int) -> bytes:
    """seed_bn.keras with ``member`` replaced by ``size`` zero bytes, deflated (a zip bomb)."""
    raw, crc = deflate_bomb(size)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info, data in _members("seed_bn.keras"):
            if info.filename != member:
                z.writestr(info.filename, data)
        # Write the member by hand: zipfile would inflate nothing, but it would compress
        # ``size`` bytes itself, which is the slow part we have already done once.
        zi = zipfile.ZipInfo(member, (2024, 1, 1, 0, 0, 0))
        zi.compress_type = zipfile.ZIP_DEFLATED
        zi.file_size, zi.compress_size, zi.CRC = size, len(raw), crc
        fp = z.fp
        zi.header_offset = fp.tell()
        fp.write(zi.FileHeader(size > zipfile.ZIP64_LIMIT))
        fp.write(raw)
        z.filelist.append(zi)
        z.NameToInfo[member] = zi
        z.start_dir = fp.tell()
        z._didModify = True
    return out.getvalue()


# -- HDF5 files, made with h5py (no Keras) ---------------------------------------------------


def _h5_bytes(fill: Callable[[object], None]) -> bytes:
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        fill(h5)
    return buf.getvalue()


def h5_without_model_config() -> bytes:
    return _h5_bytes(lambda h5: h5.create_dataset("x", data=[1.0, 2.0]))


def h5_weights_only_keras3() -> bytes:
    """What Keras 3 ``save_weights('x.weights.h5')`` writes: layers/, vars/, no model_config."""

    def fill(h5):
        h5.create_group("layers/dense/vars").create_dataset("0", data=[[1.0]])
        h5.create_group("vars")
        h5.create_group("optimizer/vars")

    return _h5_bytes(fill)


def h5_weights_only_legacy() -> bytes:
    """What Keras 2 ``save_weights('x.h5')`` writes: a ``layer_names`` root attribute."""

    def fill(h5):
        h5.attrs["layer_names"] = [b"dense"]
        h5.create_group("dense").attrs["weight_names"] = [b"dense/kernel:0"]

    return _h5_bytes(fill)


def h5_with_model_config(value: object) -> bytes:
    def fill(h5):
        h5.attrs["model_config"] = value

    return _h5_bytes(fill)


# -- the corpus ----------------------------------------------------------------------------


def truncation_offsets(sample: str) -> list[int]:
    """Where to cut ``sample``: every structure boundary that matters, then evenly spread."""
    data = sample_bytes(sample)
    size = len(data)
    wanted = {1, 4, 8, 16, 30, 64, 512, 2048, size - 1, size - 22, size - 100}
    if sample.endswith(".keras"):
        for info, _ in _members(sample):
            wanted |= {info.header_offset + 30, info.header_offset + 30 + len(info.filename) + 8}
        wanted.add(data.rfind(b"PK\x01\x02"))
    rng = random.Random(f"truncate:{sample}")
    candidates = sorted(o for o in wanted if 0 < o < size)
    while len(candidates) < TRUNCATIONS_PER_SAMPLE:
        o = rng.randrange(1, size)
        if o not in candidates:
            candidates.append(o)
    return sorted(candidates[:TRUNCATIONS_PER_SAMPLE])


def flip_positions(sample: str) -> list[tuple[int, int]]:
    """(byte offset, bit) pairs to flip: mostly in the metadata that parsers trust (zip
    headers, config.json, HDF5 superblock and object headers), some anywhere."""
    data = sample_bytes(sample)
    rng = random.Random(f"flip:{sample}")
    hot: list[tuple[int, int]] = []
    if sample.endswith(".keras"):
        for info, _ in _members(sample):
            start = info.header_offset
            hot.append((start, start + 30 + len(info.filename)))
            if info.filename == "model.weights.h5":
                body = start + 30 + len(info.filename)
                hot.append((body, body + 2048))
        central = data.rfind(b"PK\x01\x02")
        first_central = data.find(b"PK\x01\x02")
        hot.append((first_central, len(data)))
        assert central >= first_central
    else:
        hot.append((0, 4096))
    out: list[tuple[int, int]] = []
    while len(out) < FLIPS_PER_SAMPLE:
        if len(out) % 4 == 3:
            offset = rng.randrange(len(data))
        else:
            lo, hi = hot[rng.randrange(len(hot))]
            offset = rng.randrange(lo, min(hi, len(data)))
        pair = (offset, rng.randrange(8))
        if pair not in out:
            out.append(pair)
    return out


def _wrong_shapes() -> dict[str, Callable[[], bytes]]:
    def layer0(edit: Callable[[dict], None]) -> Callable[[], bytes]:
        def make() -> bytes:
            def change(config: dict) -> None:
                edit(config["config"]["layers"][1])

            return with_config(change)

        return make

    return {
        "zip:config-missing": lambda: rezip(replace={"config.json": None}),
        "zip:config-empty": lambda: rezip(replace={"config.json": b""}),
        "zip:config-invalid-json": lambda: rezip(replace={"config.json": b'{"class_name": "Fu'}),
        "zip:config-not-utf8": lambda: rezip(replace={"config.json": b'{"a": "\xff\xfe"}'}),
        "zip:config-nan": lambda: rezip(replace={"config.json": b"NaN"}),
        "zip:config-list": lambda: with_config(lambda c: [c]),
        "zip:config-string": lambda: with_config(lambda c: "Functional"),
        "zip:config-null": lambda: rezip(replace={"config.json": b"null"}),
        "zip:no-class-name": lambda: with_config(lambda c: c.pop("class_name")),
        "zip:class-name-not-string": lambda: with_config(lambda c: c.update(class_name=[1])),
        "zip:inner-config-list": lambda: with_config(lambda c: c.update(config=[c["config"]])),
        "zip:layers-dict": lambda: with_config(
            lambda c: c["config"].update(layers={"a": c["config"]["layers"][0]})
        ),
        "zip:layers-string": lambda: with_config(lambda c: c["config"].update(layers="x")),
        "zip:layer-list": layer0(lambda layer: layer.update(config=[layer["config"]])),
        "zip:layer-not-object": lambda: with_config(
            lambda c: c["config"]["layers"].__setitem__(1, ["BatchNormalization"])
        ),
        "zip:layer-no-class-name": layer0(lambda layer: layer.pop("class_name")),
        "zip:layer-no-name": layer0(lambda layer: layer["config"].pop("name")),
        "zip:layer-name-number": layer0(lambda layer: layer["config"].update(name=7)),
        "zip:trainable-string": layer0(lambda layer: layer["config"].update(trainable="false")),
        "zip:model-trainable-string": lambda: with_config(
            lambda c: c["config"].update(trainable="no")
        ),
        "zip:trainable-number": layer0(lambda layer: layer["config"].update(trainable=0)),
        "zip:inbound-nodes-garbage": layer0(lambda layer: layer.update(inbound_nodes={"x": 1})),
        "zip:inbound-kwargs-list": layer0(
            lambda layer: layer.update(inbound_nodes=[{"args": 5, "kwargs": [1, 2]}])
        ),
        "zip:duplicate-layer-names": lambda: with_config(
            lambda c: c["config"]["layers"].append(c["config"]["layers"][1])
        ),
        "zip:wrapper-layer-list": layer0(lambda layer: layer["config"].update(layer=[1])),
        "zip:compile-config-list": lambda: with_config(lambda c: c.update(compile_config=[1])),
        "zip:metadata-invalid": lambda: rezip(replace={"metadata.json": b"{"}),
        "zip:metadata-list": lambda: rezip(replace={"metadata.json": b"[1, 2]"}),
        "zip:weights-missing": lambda: rezip(replace={"model.weights.h5": None}),
        "zip:weights-empty": lambda: rezip(replace={"model.weights.h5": b""}),
        "zip:weights-garbage": lambda: rezip(
            replace={"model.weights.h5": b"\x89HDF\r\n\x1a\n" * 9}
        ),
        "zip:weights-text": lambda: rezip(replace={"model.weights.h5": b"not hdf5"}),
        "zip:weights-deflated": lambda: rezip(compress={"model.weights.h5": zipfile.ZIP_DEFLATED}),
        "zip:config-deflated": lambda: rezip(compress={"config.json": zipfile.ZIP_DEFLATED}),
        "zip:nested-json-10000": lambda: rezip(replace={"config.json": nested(10_000)}),
        "zip:nested-json-10000-objects": lambda: rezip(
            replace={"config.json": nested_objects(10_000)}
        ),
        "zip:nested-json-in-layer-990": lambda: _with_raw_value(nested(990)),
        "zip:nested-json-in-layer-600": lambda: _with_raw_value(nested_objects(600)),
        "zip:nested-models-200": lambda: rezip(
            replace={"config.json": json.dumps(nested_layers_config(200)).encode()}
        ),
        "zip:config-claims-1TiB": lambda: lying_size_zip("config.json"),
        "zip:config-huge": lambda: rezip(
            replace={"config.json": b" " * (65 << 20) + b"{}"},
            compress={"config.json": zipfile.ZIP_DEFLATED},
        ),
        "zip:config-bomb": lambda: bomb_zip("config.json", 60 << 20),
        "zip:weights-bomb-1GiB": lambda: bomb_zip("model.weights.h5", 1 << 30),
        "zip:empty-archive": lambda: _empty_zip(),
        "zip:saved-model": lambda: _zip_of({"saved_model.pb": b"\x08\x01"}),
        "zip:encrypted-flag": lambda: _encrypted_flag(),
        "file:empty": lambda: b"",
        "file:text": lambda: b"hello, not a model\n",
        "file:zip-magic-only": lambda: b"PK\x03\x04",
        "file:zip-magic-garbage": lambda: b"PK\x03\x04" + bytes(range(256)) * 4,
        "file:hdf5-magic-only": lambda: b"\x89HDF\r\n\x1a\n",
        "file:hdf5-magic-garbage": lambda: b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4,
        "h5:no-model-config": h5_without_model_config,
        "h5:weights-only-keras3": h5_weights_only_keras3,
        "h5:weights-only-legacy": h5_weights_only_legacy,
        "h5:model-config-number": lambda: h5_with_model_config(42),
        "h5:model-config-invalid-json": lambda: h5_with_model_config("{not json"),
        "h5:model-config-list": lambda: h5_with_model_config("[1, 2, 3]"),
        "h5:model-config-nested-10000": lambda: h5_with_model_config(nested(10_000).decode()),
        "h5:model-config-no-layers": lambda: h5_with_model_config(
            json.dumps({"class_name": "Sequential", "config": {"name": "s", "layers": 3}})
        ),
    }


def _with_raw_value(raw: bytes) -> bytes:
    """seed_bn.keras whose BN layer's config has an ``extra`` key holding ``raw`` JSON text
    (spliced in as text: too deep for ``json`` to build)."""

    def change(config: dict) -> None:
        config["config"]["layers"][1]["config"]["extra"] = "@EXTRA@"

    text = json.dumps(with_config_dict(change)).encode()
    return rezip(replace={"config.json": text.replace(b'"@EXTRA@"', raw)})


def with_config_dict(edit: Callable[[dict], None]) -> dict:
    config = seed_config()
    edit(config)
    return config


def _zip_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def _empty_zip() -> bytes:
    out = io.BytesIO()
    zipfile.ZipFile(out, "w").close()
    return out.getvalue()


def _encrypted_flag() -> bytes:
    """seed_bn.keras with the "encrypted" flag set on every member (local and central)."""
    data = bytearray(rezip())
    for sig, at_flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        while at >= 0:
            data[at + at_flags] |= 0x01
            at = data.find(sig, at + 4)
    return bytes(data)


SHAPES = _wrong_shapes()

#: Cases that are not one file of bytes; built by :func:`build` in the folder.
SPECIAL = (
    "fs:directory-empty",
    "fs:directory-with-config-dir",
    "fs:directory-broken-config",
    "fs:symlink-loop",
    "fs:dangling-symlink",
    "fs:fifo",
    "fs:missing",
)


def corpus_names() -> list[str]:
    """Every case of the generated corpus, in a fixed order."""
    names: list[str] = []
    for sample in MUTATED_SAMPLES:
        names += [f"truncate:{sample}@{o}" for o in truncation_offsets(sample)]
        names += [f"flip:{sample}@{o}.{b}" for o, b in flip_positions(sample)]
    names += list(SHAPES)
    names += list(SPECIAL)
    return names


def _suffix(name: str) -> str:
    if name.startswith(("truncate:", "flip:")):
        return Path(name.split(":", 1)[1].split("@", 1)[0]).suffix
    if name.startswith("h5:"):
        return ".h5"
    return ".keras"


@functools.cache
def shape_bytes(name: str) -> bytes:
    return SHAPES[name]()


def build(name: str, folder: str | os.PathLike[str]) -> Path:
    """Create case ``name`` in ``folder`` and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slug = name.replace(":", "_").replace("@", "_").replace("/", "_")
    path = folder / f"{slug}{_suffix(name)}"
    kind, _, rest = name.partition(":")
    if kind == "truncate":
        sample, offset = rest.split("@")
        path.write_bytes(sample_bytes(sample)[: int(offset)])
    elif kind == "flip":
        sample, where = rest.split("@")
        offset, bit = (int(x) for x in where.split("."))
        data = bytearray(sample_bytes(sample))
        data[offset] ^= 1 << bit
        path.write_bytes(bytes(data))
    elif kind == "mutate":  # hypothesis: "mutate:sample@op,op,..." (see apply_ops)
        sample, ops = rest.split("@")
        path.write_bytes(apply_ops(sample_bytes(sample), ops))
    elif name in SHAPES:
        path.write_bytes(shape_bytes(name))
    elif kind == "fs":
        path = folder / slug
        _build_special(rest, path)
    else:
        raise KeyError(f"no such corpus case: {name}")
    return path


def _build_special(what: str, path: Path) -> None:
    if what == "directory-empty":
        path.mkdir()
    elif what == "directory-with-config-dir":
        (path / "config.json").mkdir(parents=True)
    elif what == "directory-broken-config":
        path.mkdir()
        (path / "config.json").write_bytes(b'{"class_name": ')
    elif what == "symlink-loop":
        os.symlink(path.name + "_b", path)
        os.symlink(path.name, path.with_name(path.name + "_b"))
    elif what == "dangling-symlink":
        os.symlink(path.name + "_nowhere", path)
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "missing":
        pass
    else:
        raise KeyError(what)


# -- hypothesis mutations, as names ----------------------------------------------------------


def apply_ops(data: bytes, ops: str) -> bytes:
    """Apply ``ops`` (comma-separated ``f<offset>.<bit>`` flip, ``s<offset>=<byte>`` set,
    ``t<offset>`` truncate, ``d<offset>+<n>`` delete, ``i<offset>+<n>`` insert n zero bytes) in
    order. Offsets are taken modulo the current length, so every op applies."""
    buf = bytearray(data)
    for op in ops.split(","):
        if not buf:
            break
        kind, arg = op[0], op[1:]
        if kind == "f":
            o, b = arg.split(".")
            buf[int(o) % len(buf)] ^= 1 << int(b)
        elif kind == "s":
            o, v = arg.split("=")
            buf[int(o) % len(buf)] = int(v)
        elif kind == "t":
            del buf[int(arg) % len(buf) :]
        elif kind == "d":
            o, n = (int(x) for x in arg.split("+"))
            o %= len(buf)
            del buf[o : o + n]
        elif kind == "i":
            o, n = (int(x) for x in arg.split("+"))
            buf[o % len(buf) : o % len(buf)] = bytes(n)
    return bytes(buf)


# -- what must hold ------------------------------------------------------------------------


def fingerprint(path: Path) -> object:
    """The bytes (hashed) of a file, or of every file below a folder, or what a link points to:
    equal before and after means the input was not touched."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if not path.exists():
        return None
    if path.is_dir():
        return sorted((str(p.relative_to(path)), fingerprint(p)) for p in path.rglob("*"))
    if not path.is_file():
        return ("special", path.stat().st_mode)
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Outcome:
    command: str
    exit_code: int
    stdout: str
    stderr: str


def problems(case: str, outcome: Outcome, *, output: Path | None = None) -> list[str]:
    """What is wrong with how a command ended on a hostile input (empty: nothing)."""
    found: list[str] = []
    allowed = (0, 1, 2) if outcome.command == "check" else (0, 2)
    where = f"{outcome.command} on {case}"
    if outcome.exit_code not in allowed:
        found.append(f"{where}: exit code {outcome.exit_code}, not one of {allowed}")
    if "Traceback" in outcome.stderr or "Traceback" in outcome.stdout:
        found.append(f"{where}: a traceback reached the user")
    if outcome.exit_code == 2:
        lines = outcome.stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("error: "):
            found.append(f"{where}: exit 2 without exactly one 'error: ...' line: {lines!r}")
        if output is not None and output.exists():
            found.append(f"{where}: failed but left the output file {output.name}")
    if output is not None and output.parent.is_dir():
        stray = [p.name for p in output.parent.iterdir() if p.name.endswith(".bnfreeze-tmp")]
        if stray:
            found.append(f"{where}: left temporary files {stray}")
    return found


# -- a large model, synthesized without Keras ------------------------------------------------


def large_keras(
    path: str | os.PathLike[str],
    *,
    inputs: int = 1024,
    hidden: int = 8192,
    optimizer: bool = True,
    seed: int = 0,
) -> Path:
    """sequential.keras scaled up: Dense(inputs -> hidden) holds ``inputs * hidden`` random
    float32s (32 MiB by default, incompressible), written with h5py in Keras 3's layout.

    With ``optimizer`` it is compiled (Adam) and carries saved optimizer variables, so
    ``freeze --bn-inference`` drops them: the weights file is rewritten and compared dataset
    by dataset, the slowest write bnfreeze does.
    """
    import h5py
    import numpy as np

    config = json.loads(zipfile.ZipFile(SAMPLES / "sequential.keras").read("config.json"))
    layers = config["config"]["layers"]
    layers[0]["config"]["batch_shape"] = [None, inputs]
    layers[1]["config"]["units"] = hidden
    layers[1]["build_config"] = {"input_shape": [None, inputs]}
    layers[2]["build_config"] = {"input_shape": [None, hidden]}
    layers[4]["build_config"] = {"input_shape": [None, hidden]}
    config["build_config"] = {"input_shape": [None, inputs]}
    if optimizer:
        guide = json.loads(zipfile.ZipFile(SAMPLES / "guide_pattern.keras").read("config.json"))
        config["compile_config"] = guide["compile_config"]
    rng = np.random.default_rng(seed)
    shapes = {
        "dense": [(inputs, hidden), (hidden,)],
        "batch_normalization": [(hidden,)] * 4,
        "activation": [],
        "dense_1": [(hidden, 8), (8,)],
        "batch_normalization_1": [(8,)] * 4,
        "dense_2": [(8, 1), (1,)],
    }
    names = {
        "dense": "dense_1",
        "batch_normalization": "bn_1",
        "activation": "relu_1",
        "dense_1": "dense_2",
        "batch_normalization_1": "bn_2",
        "dense_2": "out",
    }
    weights = io.BytesIO()
    with h5py.File(weights, "w") as h5:
        for group, variables in shapes.items():
            vars_group = h5.create_group(f"layers/{group}/vars")
            vars_group.attrs["name"] = names[group]
            for i, shape in enumerate(variables):
                vars_group.create_dataset(str(i), data=rng.standard_normal(shape, "float32"))
        h5.create_group("vars").attrs["name"] = "sequential_bn"
        if optimizer:
            opt = h5.create_group("optimizer/vars")
            opt.attrs["name"] = "adam"
            opt.create_dataset("0", data=np.int64(1))
            opt.create_dataset("1", data=np.float32(1e-3))
            for i in range(2, 6):
                opt.create_dataset(str(i), data=rng.standard_normal((8,), "float32"))
    path = Path(path)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "metadata.json", zipfile.ZipFile(SAMPLES / "sequential.keras").read("metadata.json")
        )
        z.writestr("config.json", json.dumps(config))
        z.writestr("model.weights.h5", weights.getvalue())
    return path


def weights_digest(path: str | os.PathLike[str]) -> dict[str, str]:
    """A BLAKE2b digest of every dataset under ``layers/`` of a ``.keras`` file's weights:
    equal digests mean the model's weights were carried over exactly."""
    import h5py

    with (
        zipfile.ZipFile(path) as z,
        z.open("model.weights.h5") as fh,
        h5py.File(io.BytesIO(fh.read()), "r") as h5,
    ):
        found: dict[str, str] = {}

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                found[name] = hashlib.blake2b(obj[()].tobytes(), digest_size=16).hexdigest()

        h5["layers"].visititems(visit)
        return found


def trained_large_keras(
    path: str | os.PathLike[str], *, inputs: int = 1024, hidden: int = 2048, seed: int = 0
) -> Path:
    """:func:`large_keras` with the optimizer state Keras 3 saves after training it with Adam:
    iteration, learning rate, then a (momentum, velocity) pair shaped like each trainable
    variable, in ``trainable_variables`` order (README, "Saved optimizer state"; ``bn_2`` is
    frozen in sequential.keras, so it has none). bnfreeze remaps it when BN layers are frozen,
    the weights rewrite path with the most to check."""
    import h5py
    import numpy as np

    path = Path(path)
    large_keras(path, inputs=inputs, hidden=hidden, optimizer=True, seed=seed)
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    weights = io.BytesIO(members["model.weights.h5"])
    rng = np.random.default_rng(seed + 100)
    trainable = [
        ("dense", 2),
        ("batch_normalization", 2),
        ("dense_1", 2),
        ("dense_2", 2),
    ]
    with h5py.File(weights, "r+") as h5:
        del h5["optimizer/vars"]
        opt = h5.create_group("optimizer/vars")
        opt.attrs["name"] = "adam"
        opt.create_dataset("0", data=np.int64(7))
        opt.create_dataset("1", data=np.float32(1e-3))
        i = 2
        for group, count in trainable:
            for k in range(count):
                shape = h5[f"layers/{group}/vars/{k}"].shape
                for _ in ("momentum", "velocity"):
                    opt.create_dataset(str(i), data=rng.standard_normal(shape, "float32"))
                    i += 1
    members["model.weights.h5"] = weights.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def optimizer_digest(path: str | os.PathLike[str]) -> list[str]:
    """BLAKE2b digests of a ``.keras`` file's saved optimizer variables, in order."""
    import h5py

    with (
        zipfile.ZipFile(path) as z,
        z.open("model.weights.h5") as fh,
        h5py.File(io.BytesIO(fh.read()), "r") as h5,
    ):
        group = h5.get("optimizer/vars")
        if group is None:
            return []
        return [
            hashlib.blake2b(group[str(i)][()].tobytes(), digest_size=16).hexdigest()
            for i in range(len(group))
        ]
