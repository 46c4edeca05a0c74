"""An edit that sets BN flags on a file with FrozenStatsBatchNormalization layers converts the
selected ones back to Keras's BatchNormalization first; a file without them is not read twice
to find out (``config_may_hold``)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import bnfreeze
from bnfreeze.formats.readers.keras_zip import config_may_hold
from bnfreeze.ops.frozen_stats import BnClass, convert_file

NAME = b"FrozenStatsBatchNormalization"


def _classes(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        text = archive.read("config.json").decode()
    found: list[str] = []

    def visit(node: object) -> None:
        if isinstance(node, dict):
            if "class_name" in node and "config" in node:
                found.append(str(node.get("registered_name") or node["class_name"]))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(json.loads(text))
    return found


def _converted(samples: Path, tmp_path: Path) -> Path:
    out = tmp_path / "frozen_stats.keras"
    convert_file(str(samples / "sequential.keras"), str(out), BnClass.FROZEN_STATS)
    assert any("FrozenStats" in c for c in _classes(out))
    return out


def _escaped(src: Path, out: Path) -> Path:
    """``src`` with the class name written with a JSON escape (\\u0046 for F), as any JSON
    writer may: the same config once parsed."""
    with zipfile.ZipFile(src) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    text = members["config.json"].decode().replace("FrozenStats", "\\u0046rozenStats")
    assert NAME.decode() not in text
    members["config.json"] = text.encode()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out


def test_config_may_hold(samples, tmp_path):
    assert not config_may_hold(samples / "sequential.keras", NAME)
    converted = _converted(samples, tmp_path)
    assert config_may_hold(converted, NAME)
    assert config_may_hold(_escaped(converted, tmp_path / "escaped.keras"), NAME)
    assert config_may_hold(samples / "does-not-exist.keras", NAME)  # the caller reads it
    fifo = tmp_path / "fifo.keras"
    os.mkfifo(fifo)
    assert config_may_hold(fifo, NAME)  # without opening it: that would block


def test_bn_inference_converts_them_back(samples, tmp_path):
    src = _converted(samples, tmp_path)
    out = tmp_path / "out.keras"
    bnfreeze.freeze(src, bn_inference=True, output=out)
    assert not any("FrozenStats" in c for c in _classes(out))
    assert "BatchNormalization" in _classes(out)


def test_a_class_name_written_with_an_escape_is_converted_back_too(samples, tmp_path):
    src = _escaped(_converted(samples, tmp_path), tmp_path / "escaped.keras")
    out = tmp_path / "out.keras"
    bnfreeze.unfreeze(src, output=out)
    assert not any("FrozenStats" in c for c in _classes(out))
    assert "BatchNormalization" in _classes(out)
