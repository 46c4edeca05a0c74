"""``bnfreeze sync-bn`` / :func:`bnfreeze.ops.sync.set_synchronized_file`: turn
``BatchNormalization(synchronized=...)`` on or off in a saved file, config only.

The Keras side (a file saved with ``synchronized=True`` on TensorFlow, rewritten, then loaded
on JAX; a tf_keras ``SyncBatchNormalization`` in a legacy ``.h5`` loaded by Keras 3) is in
``tests/runtime/test_replicas.py`` and :func:`test_tf_keras_sync_batchnorm_converts` below."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import warm
from click.testing import CliRunner
from paths import ROOT, SAMPLES

from bnfreeze.cli import cli
from bnfreeze.errors import EXIT_USAGE
from bnfreeze.model.records import WarningCode
from bnfreeze.ops.inspect import inspect_file
from bnfreeze.ops.sync import set_synchronized_file

SEED = SAMPLES / "seed_bn.keras"


def member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(name)


def synchronized_layers(path: Path) -> dict[str, bool]:
    return {s.layer.path: s.layer.synchronized for s in inspect_file(path).batchnorm}


def codes(path: Path) -> set[WarningCode]:
    return {f.code for f in inspect_file(path).warnings}


def test_on_then_off_changes_only_the_flag_and_keeps_the_weights(tmp_path):
    on, off = tmp_path / "on.keras", tmp_path / "off.keras"
    result = set_synchronized_file(SEED, on, synchronized=True)
    assert result.changed and result.output == str(on)
    assert set(synchronized_layers(on).values()) == {True}
    assert WarningCode.SYNCHRONIZED_BN in codes(on)
    assert WarningCode.SYNCHRONIZED_BN not in codes(SEED)
    assert result.warnings and "only on TensorFlow" in result.warnings[0]

    back = set_synchronized_file(on, off, synchronized=False)
    assert [c.synchronized_after for c in back.changes] == [False] * len(back.changes)
    assert set(synchronized_layers(off).values()) == {False}
    assert WarningCode.SYNCHRONIZED_BN not in codes(off)
    for path in (on, off):
        assert member(path, "model.weights.h5") == member(SEED, "model.weights.h5")
    # Only "synchronized" differs from the input's config.
    seed_config = json.loads(member(SEED, "config.json"))
    off_config = json.loads(member(off, "config.json"))

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "synchronized"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    assert strip(off_config) == strip(seed_config)


def test_layers_select_which_bn_layers(tmp_path):
    names = list(synchronized_layers(SEED))
    out = tmp_path / "one.keras"
    result = set_synchronized_file(SEED, out, synchronized=True, layers=[names[0]])
    assert [c.path for c in result.changes] == [names[0]]
    assert synchronized_layers(out) == {n: n == names[0] for n in names}


def test_cli_writes_prints_and_warns(tmp_path):
    out = tmp_path / "on.keras"
    runner = CliRunner()
    done = runner.invoke(cli, ["sync-bn", str(SEED), "on", "-o", str(out)], catch_exceptions=False)
    assert done.exit_code == 0
    n = len(synchronized_layers(SEED))
    assert done.stdout.splitlines()[-1] == (
        f"{n} BN layer{'s' if n != 1 else ''} changed; wrote {out} (weights as they were)."
    )
    assert "warning: BatchNormalization(synchronized=True) loads only on TensorFlow" in (
        done.stderr
    )
    dry = runner.invoke(cli, ["sync-bn", str(out), "off", "--dry-run"], catch_exceptions=False)
    assert dry.exit_code == 0 and "would change (nothing written)" in dry.stdout
    assert dry.stderr == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["on"], "error: no output file."),
        (["on", "--layers", "no_such_layer", "-o", "OUT"], "error: "),
        (
            ["sideways", "-o", "OUT"],
            "error: invalid value for '{on|off}': 'sideways' is not one of",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "out.keras")) for a in args]
    done = CliRunner().invoke(cli, ["sync-bn", str(SEED), *args], catch_exceptions=False)
    assert done.exit_code == EXIT_USAGE
    assert done.stderr.startswith(message) and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "out.keras").exists()


TF_KERAS_SYNC = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tf_keras
    import keras
    from bnfreeze.ops.inspect import inspect_file
    from bnfreeze.ops.sync import set_synchronized_file
    source, converted = sys.argv[1], sys.argv[2]
    i = tf_keras.Input((3,))
    x = tf_keras.layers.Dense(4, name="dense")(i)
    x = tf_keras.layers.experimental.SyncBatchNormalization(name="sbn")(x)
    m = tf_keras.Model(i, x)
    m.compile("sgd", "mse")
    m.fit(np.random.rand(8, 3) + 5, np.random.rand(8, 4), verbose=0)
    m.save(source)
    before = [f.code.value for f in inspect_file(source).warnings]
    result = set_synchronized_file(source, converted, synchronized=False)
    after = [f.code.value for f in inspect_file(converted).warnings]
    old = tf_keras.models.load_model(source, compile=False)
    new = keras.models.load_model(converted, compile=False)
    sbn = new.get_layer("sbn")
    print(json.dumps({
        "warnings_before": before,
        "warnings_after": after,
        "changes": [[c.class_before, c.class_after] for c in result.changes],
        "class": type(sbn).__name__,
        "synchronized": sbn.synchronized,
        "equal": [bool(np.array_equal(a.numpy(), np.asarray(b.numpy())))
                  for a, b in zip(old.weights, new.weights, strict=True)],
        "paths": [[a.name, b.path] for a, b in zip(old.weights, new.weights)],
    }))
    """
)


@pytest.mark.keras
def test_tf_keras_sync_batchnorm_converts(tmp_path):
    """A tf_keras SyncBatchNormalization in a legacy .h5, which Keras 3 cannot load, becomes a
    BatchNormalization that Keras 3 loads with every weight equal. tf_keras saves, bnfreeze
    converts and Keras 3 loads in one fresh interpreter."""
    pytest.importorskip("tf_keras")
    source, converted = tmp_path / "sync.h5", tmp_path / "converted.h5"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = warm.run(
        [sys.executable, "-c", TF_KERAS_SYNC, str(source), str(converted)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout)
    assert "keras3-incompatible" in loaded["warnings_before"]
    assert "keras3-incompatible" not in loaded["warnings_after"]
    assert loaded["changes"] == [["SyncBatchNormalization", "BatchNormalization"]]
    assert (loaded["class"], loaded["synchronized"]) == ("BatchNormalization", False)
    assert loaded["equal"] == [True] * 6, loaded["paths"]
    assert [p[1] for p in loaded["paths"]] == [p[0].removesuffix(":0") for p in loaded["paths"]]


def test_the_python_api_is_the_same_edit(tmp_path):
    import bnfreeze

    out = tmp_path / "on.keras"
    result = bnfreeze.sync_bn(SEED, synchronized=True, output=out)
    assert result.output == str(out) and set(synchronized_layers(out).values()) == {True}
