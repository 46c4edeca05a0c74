"""Files saved by Keras 2 (tf_keras): the ``keras3-incompatible`` warning names each layer that
Keras 3's ``load_model`` refuses, measured by loading the file; ``--runtime tf-keras`` on
``inspect`` and ``check`` predicts what tf_keras does, measured with a real ``fit()`` step; and
the ``saved-by-keras-2`` hint says when the two runtimes disagree on a BN layer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bnfreeze.cli import cli
from bnfreeze.model.keras3_compat import incompatibility

pytestmark = pytest.mark.keras


def _tf_keras_models(tk: Any, tf: Any) -> dict[str, Any]:
    L = tk.layers

    def functional(shape: tuple[int, ...], build: Any, name: str) -> Any:
        inp = tk.Input(shape, name="x")
        return tk.Model(inp, build(inp), name=name)

    return {
        "depthwise": functional((6, 6, 3), lambda x: L.DepthwiseConv2D(3, name="dw")(x), "dw"),
        "tfoplambda": functional(
            (6, 6, 3), lambda x: L.Dense(2, name="head")(tf.math.reduce_mean(x, axis=[1, 2])), "op"
        ),
        "lstm": functional((5, 3), lambda x: L.LSTM(3, name="lstm")(x), "rnn"),
        "slicing": functional((5, 3), lambda x: L.Dense(2, name="d")(x[:, 0]), "slice"),
    }


@pytest.fixture(scope="session")
def tf_keras_files(tmp_path_factory) -> dict[str, Path]:
    tk = pytest.importorskip("tf_keras")
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("tf_keras")
    out = {}
    for name, model in _tf_keras_models(tk, tf).items():
        out[name] = folder / f"{name}.h5"
        model.save(out[name])
    # The guide pattern: a sub-model called with training=False, whose BN Keras 3 trains in
    # fit() and tf_keras does not. Keras 3 cannot load the nested tf_keras graph.
    inner_in = tk.Input((4,))
    inner = tk.Model(inner_in, tk.layers.BatchNormalization(name="bn")(inner_in), name="base")
    inp = tk.Input((4,), name="x")
    guide = tk.Model(inp, tk.layers.Dense(2, name="head")(inner(inp, training=False)))
    out["nested"] = folder / "nested.h5"
    guide.save(out["nested"])
    # The same call-site training=False on a top-level BN, which Keras 3 loads.
    inp = tk.Input((4,), name="x")
    bn = tk.layers.BatchNormalization(name="bn")(inp, training=False)
    out["guide"] = folder / "guide.h5"
    tk.Model(inp, tk.layers.Dense(2, name="head")(bn)).save(out["guide"])
    return out


def inspect_json(path: Path, *extra: str) -> dict[str, Any]:
    result = CliRunner().invoke(
        cli, ["inspect", "--json", str(path), *extra], catch_exceptions=False
    )
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def codes(doc: dict[str, Any], code: str) -> list[str | None]:
    return [w["path"] for w in doc["warnings"] if w["code"] == code]


@pytest.mark.parametrize(
    ("name", "path", "keras_says"),
    [
        ("depthwise", "dw", "Unrecognized keyword arguments passed to DepthwiseConv2D"),
        ("tfoplambda", "tf.math.reduce_mean", "Unknown layer: 'TFOpLambda'"),
        ("lstm", "lstm", "Unrecognized keyword arguments passed to LSTM"),
        ("slicing", None, "Unknown layer: 'SlicingOpLambda'"),
        ("nested", "base", "Invalid Functional model configuration"),
    ],
)
def test_keras3_cannot_load_and_inspect_names_the_layer(tf_keras_files, name, path, keras_says):
    import keras

    with pytest.raises(Exception, match=keras_says.replace("(", r"\(").replace(")", r"\)")):
        keras.models.load_model(tf_keras_files[name], compile=False)
    doc = inspect_json(tf_keras_files[name])
    flagged = codes(doc, "keras3-incompatible")
    assert len(flagged) == 1
    if path is not None:
        assert flagged == [path]
    message = next(w["message"] for w in doc["warnings"] if w["code"] == "keras3-incompatible")
    assert "cannot be loaded by Keras 3" in message and "--runtime tf-keras" in message
    # tf_keras itself loads it: no such warning under its rules.
    assert (
        codes(inspect_json(tf_keras_files[name], "--runtime", "tf-keras"), "keras3-incompatible")
        == []
    )


def test_keras3_files_are_not_flagged(samples):
    for sample in sorted(samples.iterdir()):
        if sample.suffix in (".keras", ".h5"):
            assert codes(inspect_json(sample), "keras3-incompatible") == [], sample.name


def test_incompatibility_of_a_keras3_config_is_none():
    import keras

    for layer in (
        keras.layers.DepthwiseConv2D(3),
        keras.layers.LSTM(2),
        keras.layers.SeparableConv2D(2, 2),
        keras.layers.Conv2DTranspose(2, 2),
        keras.layers.MultiHeadAttention(2, 2),
        keras.layers.RandomFlip(),
    ):
        entry = {"class_name": type(layer).__name__, "config": layer.get_config()}
        assert incompatibility(entry) is None, type(layer).__name__


def _measure_tf_keras(path: Path) -> tuple[bool, bool]:
    """Load with tf_keras and train one real fit() step: whether the BN's statistics moved,
    and whether the model, called as fit() calls it (training=True), normalizes with the
    moving statistics (the branch, told apart by moving statistics far from the batch's)."""
    import numpy as np
    import tf_keras as tk

    model = tk.models.load_model(path, compile=False)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full((4,), 3.0, "float32"))
    bn.moving_variance.assign(np.full((4,), 0.25, "float32"))
    x = np.random.default_rng(0).normal(5, 2, (8, 4)).astype("float32")
    out = model(x, training=True).numpy()
    moving = (x - 3.0) / np.sqrt(0.25 + bn.epsilon) * bn.gamma.numpy() + bn.beta.numpy()
    moving = model.get_layer("head")(moving).numpy()
    model.compile(optimizer=tk.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    model.fit(x, np.zeros((8, 2), "float32"), batch_size=8, epochs=1, verbose=0)
    stats_moved = not np.array_equal(bn.moving_mean.numpy(), np.full((4,), 3.0, "float32"))
    return stats_moved, bool(np.allclose(out, moving, atol=1e-3))


def test_runtime_tf_keras_predicts_what_tf_keras_does(tf_keras_files):
    """Issue 11 item 6: a tf_keras file whose sub-model is called with training=False."""
    guide = tf_keras_files["guide"]
    keras3 = inspect_json(guide)
    tfk = inspect_json(guide, "--runtime", "tf-keras")
    bn3 = next(layer for layer in keras3["layers"] if layer["path"] == "bn")["in_fit"]
    bn2 = next(layer for layer in tfk["layers"] if layer["path"] == "bn")["in_fit"]
    assert (bn3["normalizes_with"], bn2["normalizes_with"]) == ("batch", "moving")
    assert keras3["runtime"]["name"] == "keras3" and tfk["runtime"]["name"] == "tf-keras"
    hint = [w["message"] for w in keras3["warnings"] if w["code"] == "saved-by-keras-2"]
    assert len(hint) == 1 and "--runtime tf-keras" in hint[0] and "1 BN layer(s)" in hint[0]
    assert codes(tfk, "saved-by-keras-2") == []
    # The truth, from tf_keras: the recorded training=False wins in fit().
    stats_moved, moving_branch = _measure_tf_keras(guide)
    assert moving_branch and not stats_moved
    # And from Keras 3: the same file's BN trains in fit().
    import keras
    import numpy as np

    model = keras.models.load_model(guide, compile=False)
    bn = model.get_layer("bn")
    before = bn.moving_mean.numpy().copy()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    x = np.random.default_rng(0).normal(5, 2, (8, 4)).astype("float32")
    model.fit(x, np.zeros((8, 2), "float32"), batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(before, bn.moving_mean.numpy())


def test_check_runtime_option(tf_keras_files):
    guide = str(tf_keras_files["guide"])
    runner = CliRunner()
    keras3 = runner.invoke(cli, ["check", guide, "--expect", "bn-inference"])
    tfk = runner.invoke(cli, ["check", guide, "--expect", "bn-inference", "--runtime", "tf-keras"])
    assert (keras3.exit_code, tfk.exit_code) == (1, 0), (keras3.output, tfk.output)


def test_keras3_operations_in_a_keras3_h5_are_named(tmp_path):
    """Keras 3.15 cannot load its own .h5 of a model with an operation on a Keras tensor
    (MobileNetV3's hard-swish, ``x + 3.0``): the .h5 config drops the operation's module, so
    Keras rebuilds an ``Add`` layer and refuses the 3.0. The same model's .keras loads. main
    gave Keras 3 predictions for the .h5 without a word (and freeze wrote an output just as
    unloadable)."""
    import keras

    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(4, name="dense")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h + 3.0)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h * 0.5), name="ops")
    refused = {}
    for suffix in ("h5", "keras"):
        path = tmp_path / f"ops.{suffix}"
        model.save(path)
        try:
            keras.models.load_model(path)
        except ValueError as exc:
            refused[suffix] = str(exc)
        result = CliRunner().invoke(cli, ["inspect", "--json", str(path)])
        assert result.exit_code == 0, result.stderr
        warned = [
            w["path"]
            for w in json.loads(result.stdout)["warnings"]
            if w["code"] == "keras3-incompatible"
        ]
        if suffix == "h5":
            assert "Only input tensors may be passed as positional arguments" in refused["h5"]
            # Keras numbers the operations it names (add_9 after other models in this process).
            assert sorted(re.sub(r"_\d+$", "", p) for p in warned) == ["add", "multiply"], warned
        else:
            assert "keras" not in refused and warned == []
    frozen = tmp_path / "frozen.h5"
    result = CliRunner().invoke(
        cli, ["freeze", str(tmp_path / "ops.h5"), "--bn-inference", "-o", str(frozen)]
    )
    assert result.exit_code == 0 and "keras3-incompatible" not in result.stdout
    assert "cannot be loaded by Keras 3" in result.stderr
