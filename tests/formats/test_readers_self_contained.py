"""Read nothing outside the input (issue 20, item 5; docs/guarantees.md).

HDF5 external raw storage, external links and virtual datasets make HDF5 open other files by
itself, in C, where ``sys.addaudithook`` sees nothing. The proof here is the kernel's: an
inotify watch on the folder that holds the outside files records every open or read of
them, whoever makes it. Each case first checks that the watch does see an open (so a silent
watch means "not opened", not "not watching"), then runs a command and asserts exit 2, the
refusal message and no event.
"""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnfreeze.cli import cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")

IN_ACCESS, IN_OPEN = 0x001, 0x020
KINDS = ("external-storage", "external-link", "virtual-dataset")
WHAT = {
    "external-storage": "external raw storage",
    "external-link": "an external link",
    "virtual-dataset": "a virtual dataset",
}


class Watch:
    """Every open or read of a file in ``folder``, from the kernel (inotify)."""

    def __init__(self, folder: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0:
            pytest.skip("inotify is not available")
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN | IN_ACCESS)
        if wd < 0:
            pytest.skip("inotify_add_watch failed")

    def events(self) -> list[str]:
        found: list[str] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            pos = 0
            while pos + 16 <= len(buf):
                _, mask, _, size = struct.unpack_from("iIII", buf, pos)
                name = buf[pos + 16 : pos + 16 + size].rstrip(b"\0").decode()
                found.append(f"{name}:{mask:#x}")
                pos += 16 + size

    def close(self) -> None:
        os.close(self.fd)


def _outside(folder: Path) -> Path:
    import h5py
    import numpy as np

    folder.mkdir()
    (folder / "secret.bin").write_bytes(bytes(range(64)))
    with h5py.File(folder / "target.h5", "w") as h5:
        h5["x"] = np.arange(8, dtype="f4")
    return folder


def _point_outside(h5: object, kind: str, outside: Path, name: str = "extra") -> None:
    import h5py

    assert isinstance(h5, h5py.Group)
    if kind == "external-storage":
        h5.create_dataset(name, shape=(8,), dtype="f4", external=[(outside / "secret.bin", 0, 32)])
    elif kind == "external-link":
        h5[name] = h5py.ExternalLink(str(outside / "target.h5"), "/x")
    else:
        layout = h5py.VirtualLayout(shape=(8,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(outside / "target.h5"), "x", shape=(8,))
        h5.create_virtual_dataset(name, layout)


def _keras(samples: Path, kind: str, outside: Path, dest: Path, *, deflate: bool) -> Path:
    """seed_bn.keras whose weights hold one object pointing outside (deeper than the index
    looks: under a layer's vars group). ``deflate`` compresses the weights member, so h5py
    reads it instead of the pure-Python reader."""
    import h5py

    with zipfile.ZipFile(samples / "seed_bn.keras") as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    weights = dest.with_suffix(".h5")
    weights.write_bytes(members["model.weights.h5"])
    with h5py.File(weights, "r+") as h5:
        group = next(g for g in h5["layers"].values() if len(g["vars"]) == 4)
        _point_outside(group["vars"], kind, outside)
    members["model.weights.h5"] = weights.read_bytes()
    weights.unlink()
    with zipfile.ZipFile(dest, "w") as z:
        for name, data in members.items():
            method = zipfile.ZIP_DEFLATED if deflate and name.endswith(".h5") else 0
            z.writestr(name, data, compress_type=method)
    return dest


def _legacy(samples: Path, kind: str, outside: Path, dest: Path) -> Path:
    import h5py

    shutil.copy(samples / "nested_legacy.h5", dest)
    with h5py.File(dest, "r+") as h5:
        _point_outside(h5["model_weights"], kind, outside)
    return dest


def _folder(samples: Path, kind: str, outside: Path, dest: Path) -> Path:
    keras = _keras(samples, kind, outside, dest.with_suffix(".keras"), deflate=False)
    with zipfile.ZipFile(keras) as z:
        z.extractall(dest)
    keras.unlink()
    return dest


FORMATS = ("keras", "keras-deflated", "keras-folder", "h5")


def _build(samples: Path, fmt: str, kind: str, outside: Path, tmp: Path) -> Path:
    if fmt == "h5":
        return _legacy(samples, kind, outside, tmp / "model.h5")
    if fmt == "keras-folder":
        return _folder(samples, kind, outside, tmp / "model")
    return _keras(samples, kind, outside, tmp / "model.keras", deflate=fmt == "keras-deflated")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_no_outside_file_is_opened(samples, tmp_path, fmt, kind):
    outside = _outside(tmp_path / "outside")
    model = _build(samples, fmt, kind, outside, tmp_path)
    other = tmp_path / "plain.keras"
    shutil.copy(samples / "seed_bn.keras", other)
    if fmt == "h5":
        shutil.copy(samples / "nested_legacy.h5", other.with_suffix(".h5"))
        other = other.with_suffix(".h5")
    watch = Watch(outside)
    try:
        (outside / "secret.bin").read_bytes()
        assert watch.events(), "the inotify watch sees nothing: the test would prove nothing"
        runs = {
            "inspect": ["inspect", str(model)],
            "inspect --json": ["inspect", str(model), "--json"],
            "check": ["check", str(model), "--strict"],
            "diff": ["diff", str(other), str(model)],
            "freeze": ["freeze", str(model), "--bn-inference", "-o", str(tmp_path / "o.keras")],
        }
        for label, args in runs.items():
            result = CliRunner().invoke(cli, args, catch_exceptions=False)
            assert result.exit_code == 2, (label, result.output)
            assert "refers to data outside the file" in result.stderr, (label, result.stderr)
            assert f"({WHAT[kind]} at /" in result.stderr, (label, result.stderr)
            assert "nothing outside it was read" in result.stderr
            assert watch.events() == [], f"{label} opened a file outside the input"
    finally:
        watch.close()
    assert not (tmp_path / "o.keras").exists()


def test_the_lean_reader_refuses_before_h5py(samples, tmp_path):
    """The stored `.keras` route never imports h5py to find out: the pure-Python reader sees
    the external link in the link message itself."""
    import subprocess

    outside = _outside(tmp_path / "outside")
    model = _keras(samples, "external-link", outside, tmp_path / "m.keras", deflate=False)
    code = (
        "import sys\n"
        "from bnfreeze.errors import ModelFormatError\n"
        "from bnfreeze.formats.readers import read_model\n"
        "try:\n"
        f"    read_model({str(model)!r})\n"
        "except ModelFormatError as exc:\n"
        "    print(exc)\n"
        "print('h5py' in sys.modules)\n"
    )
    import bnfreeze

    env = {**os.environ, "PYTHONPATH": str(Path(bnfreeze.__file__).resolve().parent.parent)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    assert "an external link at /layers/" in out[0]
    assert out[1] == "False"


def test_self_contained_files_are_read(samples):
    """Every sample, of every format, is self-contained: the check refuses nothing Keras
    writes."""
    from bnfreeze.formats.readers import read_model

    for name in ("seed_bn.keras", "sequential.keras", "guide_pattern.keras", "nested_legacy.h5"):
        assert read_model(samples / name).weights is not None


def test_memory_file_helper_sees_soft_links_as_inside(tmp_path):
    """A soft link points inside the file: not a refusal."""
    import h5py
    import numpy as np

    from bnfreeze.formats.readers.self_contained import outside_reference

    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        h5["a"] = np.zeros(3)
        h5["b"] = h5py.SoftLink("/a")
        assert outside_reference(h5) is None
