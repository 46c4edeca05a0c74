"""FrozenStatsBatchNormalization, measured: in one real ``fit()`` step every converted BN layer
takes the inference branch (recorded at ``BatchNormalization.call`` itself, the code Keras
runs), its moving statistics stay bit-identical and its gamma and beta move; ``inspect`` and
``verify`` say the same. On a keras.applications backbone and on a custom block, in a saved
``.keras`` reloaded in a fresh process, and in memory.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import pytest
import warm
from click.testing import CliRunner

from bnfreeze.cli import cli

pytestmark = pytest.mark.keras

ROOT = Path(__file__).resolve().parents[2]

#: argv: "build" FOLDER (save the models, convert in memory and train) or "train" FILE...
SCRIPT = r"""
import json, sys
import numpy as np
mode = sys.argv[1]
import bnfreeze  # registers FrozenStatsBatchNormalization once Keras is imported
import keras
from keras.src.backend.common.symbolic_scope import in_symbolic_scope

calls = {}
original = keras.layers.BatchNormalization.call


def recorded(self, inputs, training=None, mask=None):
    if not in_symbolic_scope():
        calls.setdefault(self.path if hasattr(self, "path") else self.name, []).append(
            bool(training) and bool(self.trainable)
        )
    return original(self, inputs, training=training, mask=mask)


keras.layers.BatchNormalization.call = recorded


@keras.saving.register_keras_serializable(package="bnstats_test")
class Block(keras.layers.Layer):
    # A custom layer holding a BN as an attribute: its config does not list the BN.
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, padding="same")
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))


def backbone():
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.35
    )
    inp = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inp))
    return keras.Model(inp, keras.layers.Dense(2)(x), name="mobilenet_head")


def custom_block(with_custom_layer):
    inner_in = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="block_conv")(inner_in)
    h = keras.layers.BatchNormalization(name="block_bn")(h)
    block = keras.Model(inner_in, keras.layers.ReLU()(h), name="block")
    inp = keras.Input((8, 8, 3))
    h = block(inp)
    if with_custom_layer:
        h = Block(name="custom")(h)
    h = keras.layers.BatchNormalization(name="top_bn")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(2)(h), name="custom_block")


def bn_layers(model):
    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            out.append(layer)
    return out


def train(model):
    keras.utils.set_random_seed(0)
    shape = model.inputs[0].shape[1:]
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, (4, *shape)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    bns = bn_layers(model)
    before = [[np.array(v.numpy()) for v in layer.weights] for layer in bns]
    calls.clear()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    report = {}
    for layer, old in zip(bns, before):
        gamma, beta, mean, var = (np.array(v.numpy()) for v in (layer.gamma, layer.beta,
                                                                  layer.moving_mean,
                                                                  layer.moving_variance))
        report[layer.path] = {
            "class": type(layer).__qualname__,
            "batch_branch_calls": sum(calls.get(layer.path, [])),
            "calls": len(calls.get(layer.path, [])),
            "stats_identical": mean.tobytes() == old[2].tobytes()
            and var.tobytes() == old[3].tobytes(),
            "gamma_beta_moved": gamma.tobytes() != old[0].tobytes()
            and beta.tobytes() != old[1].tobytes(),
        }
    return report


def calibrated(model):
    # Moving statistics that match the data, as a trained backbone has: with the initial ones
    # (0, 1) and inputs of mean 5, MobileNetV2's ReLU6 saturate and gamma/beta get an exactly
    # zero gradient whatever the mode.
    shape = model.inputs[0].shape[1:]
    x = np.random.default_rng(1).normal(5.0, 2.0, (8, *shape)).astype("float32")
    bnfreeze.recalibrate(model, x, batch_size=4)
    return model


out = {"backend": keras.backend.backend()}
if mode == "build":
    folder = sys.argv[2]
    keras.utils.set_random_seed(1)
    calibrated(backbone()).save(f"{folder}/backbone.keras")
    calibrated(custom_block(False)).save(f"{folder}/block.keras")
    for name, model in (("backbone", backbone()), ("block", custom_block(True))):
        calibrated(model)
        result = bnfreeze.freeze(model, bn_frozen_stats=True)
        out[name] = {"changes": len(result.changes), "steps": train(model)}
        inspected = bnfreeze.inspect(model)
        out[name]["inspect"] = sorted(
            {(s.in_fit.normalizes_with.value, s.in_fit.trains_weights) for s in inspected.batchnorm}
        )
else:
    for path in sys.argv[2:]:
        model = keras.models.load_model(path)
        out[path] = train(model)
print("RESULT" + json.dumps(out))
"""


def _run(*args: str, backend: str = "tensorflow") -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = warm.run(
        [sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _all_frozen_stats(report: dict) -> None:
    assert report
    for path, layer in report.items():
        assert layer["class"] == "FrozenStatsBatchNormalization", path
        assert layer["calls"] >= 1, path  # the step ran this layer's call
        assert layer["batch_branch_calls"] == 0, path  # every call: the inference branch
        assert layer["stats_identical"] is True, path
        assert layer["gamma_beta_moved"] is True, path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("frozen_stats")
    return folder, _run("build", str(folder))


def test_in_memory_every_bn_takes_the_inference_branch_and_gamma_beta_train(built):
    _, out = built
    assert out["backend"] == "tensorflow"
    assert out["backbone"]["changes"] == 52  # MobileNetV2: 52 BN layers
    assert out["block"]["changes"] == 3  # in a nested Functional, a custom layer, top level
    for name in ("backbone", "block"):
        _all_frozen_stats(out[name]["steps"])
        assert out[name]["inspect"] == [["moving", True]]
    assert len(out["backbone"]["steps"]) == 52 and len(out["block"]["steps"]) == 3


def test_saved_file_reloaded_in_a_fresh_process(built):
    folder, _ = built
    outputs = []
    for name in ("backbone", "block"):
        src, out = folder / f"{name}.keras", folder / f"{name}_frozen_stats.keras"
        result = CliRunner().invoke(
            cli, ["freeze", str(src), "--bn-frozen-stats", "-o", str(out)], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        assert "needs-bnfreeze" not in result.stderr  # the code is not shown, the words are
        # Warnings wrap to the terminal's width: compare the words.
        assert "keras.models.load_model loads this model only after `import bnfreeze`" in (
            " ".join(result.stderr.split())
        )
        with zipfile.ZipFile(src) as a, zipfile.ZipFile(out) as b:
            assert a.read("model.weights.h5") == b.read("model.weights.h5")
            assert a.read("metadata.json") == b.read("metadata.json")
        inspected = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
        bns = [x for x in json.loads(inspected.stdout)["layers"] if x["is_batchnorm"]]
        assert {x["class_name"] for x in bns} == {"FrozenStatsBatchNormalization"}
        assert {(x["in_fit"]["normalizes_with"], x["in_fit"]["trains_weights"]) for x in bns} == {
            ("moving", True)
        }
        outputs.append(str(out))
    measured = _run("train", *outputs)
    for path in outputs:
        _all_frozen_stats(measured[path])
    assert len(measured[outputs[0]]) == 52 and len(measured[outputs[1]]) == 2


def test_verify_agrees(built):
    folder, _ = built
    out = folder / "block_verify.keras"
    CliRunner().invoke(
        cli, ["freeze", str(folder / "block.keras"), "--bn-frozen-stats", "-o", str(out)]
    )
    result = CliRunner().invoke(
        cli, ["verify", str(out), "--expect", "bn-frozen-stats", "--json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    summary = document["summary"]
    assert (summary["agree"], summary["expectations_hold"]) == (True, True)
    assert (summary["bn_inference"], summary["bn_training"], summary["bn_stats_moved"]) == (2, 0, 0)
    bns = [x for x in document["layers"] if x["is_batchnorm"]]
    assert len(bns) == 2
    for x in bns:
        assert (x["normalizes_with"], x["branch_recorded"], x["gamma_beta"]) == (
            "moving",
            True,
            "moved",
        )


def test_plain_keras_without_bnfreeze_fails_with_its_own_error(built):
    folder, _ = built
    out = folder / "block_plain_load.keras"
    CliRunner().invoke(
        cli, ["freeze", str(folder / "block.keras"), "--bn-frozen-stats", "-o", str(out)]
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""}
    # Then, in the same process, `import bnfreeze` after Keras registers the class at once.
    code = (
        "import sys, keras\n"
        "try:\n"
        f"    keras.models.load_model({str(out)!r})\n"
        "except Exception as exc:\n"
        "    print('bnfreeze' in sys.modules, 'Could not locate class' in str(exc))\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import bnfreeze\n"
        f"model = keras.models.load_model({str(out)!r})\n"
        "print(sorted({type(l).__qualname__ for l in model._flatten_layers()"
        " if isinstance(l, keras.layers.BatchNormalization)}))\n"
    )
    proc = warm.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
    )
    assert proc.stdout.splitlines() == [
        "False True",
        "['FrozenStatsBatchNormalization']",
    ], proc.stderr[-2000:]


def test_the_guard_records_the_inference_branch_and_the_expectation_holds():
    import warnings

    import keras
    import numpy as np

    import bnfreeze

    inp = keras.Input((6,))
    h = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(4, name="dense")(inp))
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(h))
    x = np.random.default_rng(0).normal(5, 2, (16, 6)).astype("float32")
    bnfreeze.recalibrate(model, x, batch_size=8)
    bnfreeze.freeze(model, bn_frozen_stats=True)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    guard = bnfreeze.BatchNormGuard(expect="bn-frozen-stats", strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, np.zeros((16, 1)), batch_size=8, epochs=1, verbose=0, callbacks=[guard])
    assert [str(w.message) for w in caught] == []
    report = guard.report
    assert report.disagreements == () and report.expectations[0][1] == ()
    (bn,) = [m for m in report.measured if m.is_batchnorm]
    assert (bn.branch.value, bn.moving_stats.value, bn.gamma_beta.value) == (
        "moving",
        "unchanged",
        "moved",
    )
