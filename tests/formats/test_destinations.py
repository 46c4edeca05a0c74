"""Never destroy a file (issue 20, item 7; docs/guarantees.md).

Each decision, tested:

* ``--export`` naming a model the command reads is refused (exit 2), the model untouched;
* ``-o`` or ``--export`` naming a FIFO, a device or a socket is refused (exit 2), the special
  file left as it was: an atomic write renames a new regular file over the name;
* a symbolic link at ``--in-place`` or ``-o`` is followed, as ``cp`` does: the file it points
  to is replaced atomically, the link stays a link.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnfreeze.cli import cli


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", ["inspect", "check", "diff"])
def test_export_onto_the_input_is_refused(samples, tmp_path, command):
    model = tmp_path / "model.svg"  # a model may have any name
    shutil.copy(samples / "seed_bn.keras", model)
    data = model.read_bytes()
    args = {
        "inspect": ["inspect", str(model)],
        "check": ["check", str(model), "--strict"],
        "diff": ["diff", str(samples / "seed_bn.keras"), str(model)],
    }[command]
    result = _run(*args, "--export", str(model))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        f"error: --export {str(model)!r} is the model file being read; refusing to overwrite "
        "it with the report. Nothing was written."
    )
    assert model.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.svg"]


def test_export_through_a_link_to_the_input_is_refused(samples, tmp_path):
    model = tmp_path / "model.html"
    shutil.copy(samples / "seed_bn.keras", model)
    (tmp_path / "report.html").symlink_to(model)
    result = _run("inspect", str(model), "--export", str(tmp_path / "report.html"))
    assert result.exit_code == 2
    assert "is the model file being read" in result.stderr
    assert model.read_bytes() == (samples / "seed_bn.keras").read_bytes()


def _special(kind: str, path: Path) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
        return path
    if kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
        return path
    # A character device of our own (a clone of /dev/null's numbers), never /dev/null
    # itself: a regression would replace it.
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        pytest.skip("creating a device node needs root")
    return path


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
@pytest.mark.parametrize("how", ["-o", "--export"])
def test_a_special_file_is_never_replaced(samples, tmp_path, kind, how):
    target = _special(kind, tmp_path / ("out.keras" if how == "-o" else "out.svg"))
    before = os.stat(target)
    if how == "-o":
        args = ["freeze", str(samples / "seed_bn.keras"), "--bn-inference", "-o", str(target)]
    else:
        args = ["inspect", str(samples / "seed_bn.keras"), "--export", str(target)]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert "not a regular file" in result.stderr
    assert "Nothing was written." in result.stderr
    after = os.stat(target)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode)
    assert after.st_ino == before.st_ino


def test_in_place_through_a_symlink_edits_the_file_it_points_to(samples, tmp_path):
    real = tmp_path / "store" / "model.keras"
    real.parent.mkdir()
    shutil.copy(samples / "seed_bn.keras", real)
    link = tmp_path / "work" / "model.keras"
    link.parent.mkdir()
    link.symlink_to(os.path.relpath(real, link.parent))
    result = _run("freeze", str(link), "--bn-inference", "--in-place")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == real.resolve()
    from bnfreeze.formats.readers import read_model

    config = read_model(real, weights=False).config
    bn = next(x for x in config["config"]["layers"] if x["class_name"] == "BatchNormalization")
    assert bn["config"]["trainable"] is False
    # No temporary file left beside the link or the model.
    assert sorted(p.name for p in link.parent.iterdir()) == ["model.keras"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["model.keras"]


def test_output_through_a_symlink_writes_the_file_it_points_to(samples, tmp_path):
    real = tmp_path / "real.keras"
    real.write_bytes(b"an old output")
    link = tmp_path / "out.keras"
    link.symlink_to(real.name)
    result = _run("freeze", str(samples / "seed_bn.keras"), "--bn-inference", "-o", str(link))
    assert result.exit_code == 0, result.output
    assert link.is_symlink()
    assert real.read_bytes()[:4] == b"PK\x03\x04"


def test_output_that_links_to_the_input_is_refused(samples, tmp_path):
    model = tmp_path / "m.keras"
    shutil.copy(samples / "seed_bn.keras", model)
    (tmp_path / "o.keras").symlink_to(model.name)
    result = _run("freeze", str(model), "--bn-inference", "-o", str(tmp_path / "o.keras"))
    assert result.exit_code == 2
    assert "is the input file" in result.stderr
