"""Untrusted models: no code from a model file runs unless the user says so.

The payload: ``sequential.keras`` with a ``Lambda`` layer inserted whose function, a Python
lambda stored as bytecode in ``config.json`` (exactly as Keras 3 stores one), writes a marker
file when it is called -- and Keras calls it while rebuilding the model. The config route
(inspect, freeze, unfreeze, apply, check, diff) reads JSON and HDF5 metadata only, so it never
creates the marker; the Keras engine (verify, freeze --engine keras) refuses the file and names
``--unsafe``; with ``--unsafe`` the marker appears, which proves the payload is live.
"""

from __future__ import annotations

import base64
import json
import marshal
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import hostile
import pytest
from click.testing import CliRunner
from paths import ROOT

from bnfreeze.cli import cli

MARKER_TEXT = "code from the model file ran"
PLAN = ROOT / "bnfreeze" / "recipes" / "freeze-up-to.toml"


def payload_model(folder: Path, marker: Path, *, legacy: bool = False) -> Path:
    """sequential.keras with a Lambda layer "payload" right after its input (or, with
    ``legacy``, a tf_keras-style .h5 whose model_config marks the lambda the Keras 2 way)."""
    # Self-contained (Keras rebuilds it with its own globals, and cannot restore defaults):
    # the marker's path is a constant in the bytecode.
    fn = eval(f"lambda x: (open({str(marker)!r}, 'w').write({MARKER_TEXT!r}), x)[1]")
    code = base64.encodebytes(marshal.dumps(fn.__code__)).decode("ascii")
    with zipfile.ZipFile(hostile.SAMPLES / "sequential.keras") as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    config = json.loads(members["config.json"])
    if legacy:
        function = {
            "function": code,
            "function_type": "lambda",
            "output_shape": None,
            "arguments": {},
            "module": "__main__",
        }
    else:
        function = {
            "function": {
                "class_name": "__lambda__",
                "config": {"code": code, "defaults": None, "closure": None},
            },
            "arguments": {},
        }
    lambda_layer = {
        "module": "keras.layers",
        "class_name": "Lambda",
        "registered_name": None,
        "config": {"name": "payload", "trainable": True, "dtype": "float32", **function},
        "build_config": {"input_shape": [None, 6]},
    }
    config["config"]["layers"].insert(1, lambda_layer)
    if legacy:
        import h5py

        path = folder / "payload.h5"
        with h5py.File(path, "w") as h5:
            h5.attrs["model_config"] = json.dumps(config)
            h5.attrs["keras_version"] = "2.15.0"
            h5.attrs["backend"] = "tensorflow"
        return path
    members["config.json"] = json.dumps(config).encode()
    path = folder / "payload.keras"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture()
def payload(tmp_path):
    marker = tmp_path / "MARKER"
    return payload_model(tmp_path, marker), marker


def test_payload_is_live_code(payload):
    """Control: the stored bytecode does write the marker when called (here, on purpose)."""
    path, marker = payload
    layer = json.loads(zipfile.ZipFile(path).read("config.json"))["config"]["layers"][1]
    fn_config = layer["config"]["function"]["config"]
    code = marshal.loads(base64.decodebytes(fn_config["code"].encode("ascii")))
    fn = type(test_payload_is_live_code)(code, {"open": open})
    assert fn(7) == 7
    assert marker.read_text() == MARKER_TEXT
    marker.unlink()


def test_config_route_never_runs_it(payload, tmp_path):
    path, marker = payload
    before = path.read_bytes()
    out = tmp_path / "out.keras"
    runner = CliRunner()
    runs = [
        ["inspect", str(path), "--all"],
        ["inspect", str(path), "--json"],
        ["freeze", str(path), "--bn-inference", "-o", str(out)],
        ["unfreeze", str(path), "--keep-bn-inference", "--dry-run"],
        ["apply", str(path), "--plan", str(PLAN), "--set", "block=bn_1", "--dry-run"],
        ["check", str(path), "--expect", "bn-inference"],
        ["diff", str(path), str(hostile.SAMPLES / "sequential.keras")],
    ]
    for args in runs:
        result = runner.invoke(cli, args)
        assert result.exit_code in (0, 1), (args, result.output, result.exception)
        assert not marker.exists(), f"{args[0]} ran code from the model file"
    assert "payload" in runner.invoke(cli, ["inspect", str(path), "--all"]).stdout
    assert out.exists() and path.read_bytes() == before
    # The frozen copy still carries the payload, untouched, and is refused the same way.
    stored = json.loads(zipfile.ZipFile(out).read("config.json"))["config"]["layers"][1]
    assert stored["config"]["function"]["class_name"] == "__lambda__"


def test_config_route_executes_nothing_at_all(payload, tmp_path):
    """Stronger than the marker: in a fresh interpreter, after one warm-up run on a clean
    model, running the config-route commands on the payload raises no audit event for
    unmarshalling, compiling, executing or importing anything, and loads no Keras."""
    path, _ = payload
    clean = tmp_path / "clean.keras"
    clean.write_bytes(hostile.sample_bytes("sequential.keras"))
    script = f"""
import json, sys
from click.testing import CliRunner
from bnfreeze.cli import cli
runs = lambda m: [["inspect", m, "--all"], ["inspect", m, "--json"],
                  ["freeze", m, "--bn-inference", "-o", m + ".out.keras"],
                  ["unfreeze", m, "--keep-bn-inference", "-o", m + ".unfrozen.keras"],
                  ["apply", m, "--plan", {str(PLAN)!r}, "--set", "block=bn_1", "--dry-run"],
                  ["check", m, "--expect", "bn-inference"], ["diff", m, {str(clean)!r}]]
runner = CliRunner()
for args in runs({str(clean)!r}):
    assert runner.invoke(cli, args).exit_code in (0, 1), args
events = []
WATCH = ("marshal.load", "marshal.loads", "exec", "compile", "import", "pickle.find_class",
         "os.system", "subprocess.Popen", "ctypes.dlopen")
def hook(event, args):
    if event in WATCH:
        events.append([event, repr(args)[:200]])
sys.addaudithook(hook)
codes = [runner.invoke(cli, args).exit_code for args in runs({str(path)!r})]
sys.stdout.write(json.dumps({{"codes": codes, "events": events,
                              "keras": [m for m in sys.modules if m.split(".")[0] in
                                        ("keras", "tensorflow", "tf_keras")]}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert all(code in (0, 1) for code in report["codes"]), report
    assert report["events"] == [], report["events"]
    assert report["keras"] == []


@pytest.mark.parametrize("legacy", [False, True], ids=["keras3", "tf_keras-h5"])
def test_verify_refuses_and_names_unsafe(legacy, tmp_path):
    marker = tmp_path / "MARKER"
    path = payload_model(tmp_path, marker, legacy=legacy)
    result = CliRunner().invoke(cli, ["verify", str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr == (
        f"error: {path}: layer payload holds a Python lambda; loading the model would run code "
        "stored in the file, so bnfreeze refuses (Keras safe_mode). If you trust the file, "
        "pass --unsafe.\n"
    )
    assert not marker.exists()


def test_freeze_with_the_keras_engine_refuses_it(payload, tmp_path):
    path, marker = payload
    out = tmp_path / "out.keras"
    result = CliRunner().invoke(
        cli, ["freeze", str(path), "--bn-inference", "--engine", "keras", "-o", str(out)]
    )
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    if "needs the Keras engine" not in result.stderr:  # the engine is installed: it refuses
        assert "--unsafe" in result.stderr
    assert not marker.exists() and not out.exists()


@pytest.mark.keras
def test_unsafe_runs_it(payload):
    """With --unsafe the user vouches for the file, Keras rebuilds the Lambda layer and the
    stored code runs: the proof that the refusals above are what stopped it."""
    path, marker = payload
    result = CliRunner().invoke(cli, ["verify", str(path), "--unsafe"])
    assert marker.exists(), (result.exit_code, result.stderr[-2000:])
    assert marker.read_text() == MARKER_TEXT
