"""Unusual legitimate files (issue 20, item 4): every command reads them, none refuses them.

* ``BatchNormalization(dtype="bfloat16")``: Keras stores its variables (and their optimizer
  slots) as a 2-byte HDF5 *opaque* type with a ``dtype`` attribute ``"bfloat16"``;
* the weights of a compiled ``.keras`` file written with chunked, gzip-compressed or compact
  HDF5 datasets (h5py writes each on request): the optimizer state is remapped or dropped;
* a legacy ``.h5`` that starts with an HDF5 user block, and a ``.keras`` with bytes before the
  zip archive: Keras loads both (``test_keras_loads_prefixed_files``), and so does bnfreeze.

Files are crafted with h5py and zipfile; only the last test needs Keras.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import bnfreeze
from bnfreeze.cli import cli

#: The bnfreeze under test (its subprocesses import the same one).
ROOT = Path(bnfreeze.__file__).resolve().parent.parent


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _rewrite_weights(
    src: Path, dest: Path, dataset_kwargs, *, opaque_bf16: bool = False, bn_as: str | None = None
) -> Path:
    """``src`` with its weights file re-created dataset by dataset: ``dataset_kwargs(array)``
    gives h5py ``create_dataset`` keywords; ``opaque_bf16`` stores every float32 vector of a
    BN layer (and its optimizer slots) the way Keras stores ``bfloat16``; ``bn_as`` stores the
    BN layers' variables as that numpy dtype, or ``"opaque1"``: 1-byte opaque values with no
    tag, as h5py stores ml_dtypes' float8 types."""
    import h5py
    import numpy as np

    with zipfile.ZipFile(src) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    out = io.BytesIO()
    with (
        h5py.File(io.BytesIO(members["model.weights.h5"]), "r") as h_in,
        h5py.File(out, "w") as h_out,
    ):

        def copy(g_in, g_out):
            for k, v in g_in.attrs.items():
                g_out.attrs[k] = v
            for key in g_in:
                obj = g_in[key]
                if isinstance(obj, h5py.Group):
                    copy(obj, g_out.create_group(key))
                    continue
                value = obj[()]
                bn = "batch_normalization" in obj.name or (
                    opaque_bf16 and obj.name.startswith("/optimizer/") and value.ndim == 1
                )
                if opaque_bf16 and bn and value.dtype == np.float32:
                    # float32 -> bfloat16 by truncation: the high 16 bits.
                    high = (value.view("<u4") >> 16).astype("<u2")
                    raw = np.frombuffer(high.tobytes(), dtype=h5py.opaque_dtype("V2"))
                    ds = g_out.create_dataset(key, data=raw)
                    ds.attrs["dtype"] = "bfloat16"
                    continue
                if bn_as is not None and "batch_normalization" in obj.name:
                    if bn_as == "opaque1":
                        raw = (value.view("<u4") >> 24).astype("u1")  # any byte pattern
                        raw = np.frombuffer(raw.tobytes(), dtype=h5py.opaque_dtype("V1"))
                        g_out.create_dataset(key, data=raw)
                    else:
                        g_out.create_dataset(key, data=value.astype(bn_as))
                    continue
                if value.ndim == 0:
                    g_out.create_dataset(key, data=value)
                else:
                    _create(g_out, key, value, dataset_kwargs(value))

        copy(h_in, h_out)
    members["model.weights.h5"] = out.getvalue()
    with zipfile.ZipFile(dest, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dest


def _create(group, key: str, value, kwargs) -> None:
    import h5py
    import numpy as np

    if kwargs.get("layout") == "compact":
        space = h5py.h5s.create_simple(value.shape)
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_layout(h5py.h5d.COMPACT)
        ds = h5py.h5d.create(group.id, key.encode(), h5py.h5t.py_create(value.dtype), space, plist)
        ds.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(value))
        return
    group.create_dataset(key, data=value, **kwargs)


LAYOUTS = {
    "chunked": lambda a: {"chunks": True},
    "gzip": lambda a: {"chunks": True, "compression": "gzip"},
    "compact": lambda a: {"layout": "compact"} if a.nbytes < 16_000 else {},
    "contiguous": lambda a: {},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from hostile import trained_large_keras

    return trained_large_keras(tmp_path_factory.mktemp("u") / "t.keras", inputs=16, hidden=32)


@pytest.fixture(scope="module")
def remapped_reference(trained, tmp_path_factory) -> list[str]:
    """The optimizer state bnfreeze remaps for the plain (contiguous) file."""
    from hostile import optimizer_digest

    out = tmp_path_factory.mktemp("ref") / "ref.keras"
    assert _run("freeze", str(trained), "--bn-inference", "-o", str(out)).exit_code == 0
    return optimizer_digest(out)


@pytest.mark.parametrize("layout", ["chunked", "gzip", "compact"])
@pytest.mark.parametrize("command", ["freeze", "unfreeze"])
def test_compiled_files_with_any_dataset_layout_are_remapped(
    trained, remapped_reference, tmp_path, layout, command
):
    """On main, freeze refused all three (remap and drop, except compact + drop)."""
    from hostile import optimizer_digest, weights_digest

    model = _rewrite_weights(trained, tmp_path / f"{layout}.keras", LAYOUTS[layout])
    plain = _rewrite_weights(trained, tmp_path / "plain.keras", LAYOUTS["contiguous"])
    for state in ("remap", "drop"):
        out = tmp_path / f"out-{state}.keras"
        ref = tmp_path / f"ref-{state}.keras"
        args = ["--optimizer-state", state]
        if command == "freeze":
            args = ["--bn-inference", *args]
        result = _run(command, str(model), *args, "-o", str(out))
        assert result.exit_code == 0, (state, result.output)
        assert _run(command, str(plain), *args, "-o", str(ref)).exit_code == 0
        assert weights_digest(out) == weights_digest(model)
        # The same optimizer state, value for value, as for the same file written plainly.
        assert optimizer_digest(out) == optimizer_digest(ref)
        if state == "drop":
            assert optimizer_digest(out) == []
        else:
            assert len(optimizer_digest(out)) > 2
    if command == "freeze":
        out = tmp_path / "out-remap.keras"
        assert optimizer_digest(out) == remapped_reference


@pytest.fixture(scope="module")
def bf16(trained, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bf16")
    return _rewrite_weights(trained, folder / "bf16.keras", LAYOUTS["contiguous"], opaque_bf16=True)


def test_bfloat16_in_every_command(bf16, trained, tmp_path):
    """On main each of these ended in exit 3 (internal error: could not convert b'\\x80?')."""
    runs = [
        ["inspect", str(bf16)],
        ["inspect", str(bf16), "--json"],
        ["check", str(bf16), "--strict"],
        ["diff", str(trained), str(bf16)],
        ["freeze", str(bf16), "--bn-inference", "-o", str(tmp_path / "f.keras")],
        [
            "freeze",
            str(bf16),
            "--bn-inference",
            "--optimizer-state",
            "drop",
            "-o",
            str(tmp_path / "d.keras"),
        ],
        ["unfreeze", str(bf16), "-o", str(tmp_path / "u.keras")],
    ]
    for args in runs:
        result = _run(*args)
        assert result.exit_code in (0, 1), (args, result.output)
        assert "internal error" not in result.stderr
    report = json.loads(_run("inspect", str(bf16), "--json").stdout)
    bn = [r for r in report["layers"] if r["class_name"] == "BatchNormalization"]
    assert bn and [r["in_fit"]["normalizes_with"] for r in bn] == ["batch", "moving"]


@pytest.mark.parametrize("dtype", ["float16", "float64", "opaque1"])
def test_other_dtypes_in_every_command(trained, tmp_path, dtype):
    """float16 and float64 variables are read as numbers; an opaque type bnfreeze cannot
    decode (float8 as h5py stores it) is an unknown value, never a crash. unfreeze writes
    zero optimizer slots shaped and typed like them."""
    from hostile import optimizer_digest

    model = _rewrite_weights(trained, tmp_path / "m.keras", LAYOUTS["contiguous"], bn_as=dtype)
    runs = [
        ["inspect", str(model), "--json"],
        ["check", str(model), "--strict"],
        ["diff", str(trained), str(model)],
        ["freeze", str(model), "--bn-inference", "-o", str(tmp_path / "f.keras")],
        ["unfreeze", str(model), "-o", str(tmp_path / "u.keras")],
    ]
    for args in runs:
        result = _run(*args)
        assert result.exit_code in (0, 1), (args, result.output)
        assert "internal error" not in result.stderr
    assert len(optimizer_digest(tmp_path / "u.keras")) > len(optimizer_digest(model))


def test_bfloat16_values_are_decoded(bf16):
    """The lean reader decodes the opaque bytes to the floats Keras saved (bfloat16 keeps
    the high half of a float32)."""
    import h5py
    import numpy as np

    from bnfreeze.formats.readers import read_model, read_values

    model = read_model(bf16)
    name = "/layers/batch_normalization/vars/3"
    values = read_values(model, [name])[name]
    with zipfile.ZipFile(bf16) as z, h5py.File(io.BytesIO(z.read("model.weights.h5"))) as h5:
        raw = np.frombuffer(h5[name][()].tobytes(), "<u2").astype("<u4") << 16
    assert list(np.asarray(values, "f4")) == list(raw.view("<f4"))


def test_bfloat16_through_h5py(bf16, tmp_path):
    """The h5py fallback (a deflated weights member) decodes bfloat16 the same way."""
    import numpy as np

    from bnfreeze.formats.readers import read_model, read_values

    with zipfile.ZipFile(bf16) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    deflated = tmp_path / "deflated.keras"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    name = "/layers/batch_normalization/vars/3"
    lean = read_values(read_model(bf16), [name])[name]
    slow = read_values(read_model(deflated), [name])[name]
    assert list(np.asarray(lean, "f4")) == list(np.asarray(slow, "f4"))


def _user_block(samples: Path, dest: Path) -> Path:
    import h5py

    with (
        h5py.File(samples / "nested_legacy.h5") as a,
        h5py.File(dest, "w", userblock_size=512) as b,
    ):
        for k, v in a.attrs.items():
            b.attrs[k] = v
        for k in a:
            a.copy(a[k], b, name=k)
    with open(dest, "r+b") as fh:
        fh.write(b"a user block, as h5jam writes")
    return dest


def _prefixed(samples: Path, dest: Path) -> Path:
    data = (samples / "seed_bn.keras").read_bytes()
    dest.write_bytes(b"#!/bin/sh\necho a prefix before the archive\nexit 0\n" + data)
    return dest


def test_user_block_and_prefixed_zip_are_read(samples, tmp_path):
    """On main both were refused as "not a Keras model file". The output is the model without
    the leading bytes (a plain .h5 / .keras)."""
    for model, suffix in (
        (_user_block(samples, tmp_path / "ub.h5"), ".h5"),
        (_prefixed(samples, tmp_path / "prefixed.keras"), ".keras"),
    ):
        assert _run("inspect", str(model)).exit_code == 0
        out = tmp_path / f"out{suffix}"
        result = _run("freeze", str(model), "--bn-inference", "-o", str(out))
        assert result.exit_code == 0, result.output
        report = json.loads(_run("inspect", str(out), "--json").stdout)
        bn = [r for r in report["layers"] if r["class_name"] == "BatchNormalization"]
        assert bn and all(r["in_fit"]["normalizes_with"] == "moving" for r in bn)


@pytest.mark.keras
def test_keras_loads_prefixed_files_and_bnfreeze_outputs(samples, tmp_path):
    """Measured: Keras 3 loads a legacy .h5 with a user block and a .keras with bytes before
    the archive, and bnfreeze's outputs of both, with every BN frozen."""
    models = [
        _user_block(samples, tmp_path / "ub.h5"),
        _prefixed(samples, tmp_path / "prefixed.keras"),
    ]
    outs = []
    for model in models:
        out = tmp_path / f"out{model.suffix}"
        assert _run("freeze", str(model), "--bn-inference", "-o", str(out)).exit_code == 0
        outs.append(out)
    code = (
        "import sys, keras\n"
        "for p in sys.argv[1:]:\n"
        "    m = keras.models.load_model(p, compile=False)\n"
        "    BN = keras.layers.BatchNormalization\n"
        "    bn = [x for x in m._flatten_layers() if isinstance(x, BN)]\n"
        "    print(p.rsplit('/', 1)[-1], len(bn), sum(not x.trainable for x in bn))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    lines = subprocess.run(
        [sys.executable, "-c", code, *map(str, models + outs)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.splitlines()
    counts = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in lines}
    assert counts["ub.h5"][0] == 3 and counts["out.h5"] == (3, 3)
    assert counts["prefixed.keras"][0] == 1 and counts["out.keras"] == (1, 1)
