"""Legacy `.h5` files from the wild (issue 11 items 3 and 4): weight names in the schemes of
Keras 2.0-era files and tf_keras are mapped to their layers; such files freeze with both
engines; and Keras loads the output with every value identical by path and the flags set,
measured with a real ``fit()`` step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from legacy_corpus import keras20_functional

from bnfreeze.cli import cli

pytestmark = pytest.mark.keras


def inspect_json(path: Path, *extra: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["inspect", "--json", str(path), *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("zoo") / "keras20.h5"
    return path, keras20_functional(path)


def test_keras20_weights_are_owned_by_their_layers(zoo):
    path, _ = zoo
    doc = inspect_json(path)
    fit = {layer["path"]: layer["in_fit"]["trains_weights"] for layer in doc["layers"]}
    assert fit == {"input_1": None, "dense_1": True, "batch_normalization_1": True, "dense_2": True}


@pytest.mark.parametrize("engine", ["config", "keras"])
def test_keras20_file_freezes_and_keras_loads_it(zoo, tmp_path, engine):
    import keras
    import numpy as np

    path, values = zoo
    out = tmp_path / "frozen.h5"
    result = CliRunner().invoke(
        cli,
        ["freeze", str(path), "--bn-inference", "--engine", engine, "-o", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    if engine == "keras":
        assert "loaded with compile=False" in result.stderr
        assert "Argument(s) not recognized" in result.stderr
    model = keras.models.load_model(out, compile=False)
    for layer in model.layers:
        for variable in layer.weights:
            key = f"{layer.name}/{variable.name}"
            assert np.array_equal(variable.numpy(), values[key]), key
    assert len(values) == sum(len(layer.weights) for layer in model.layers)
    assert model.get_layer("batch_normalization_1").trainable is False
    bn = model.get_layer("batch_normalization_1")
    before = [v.numpy().copy() for v in bn.weights]
    kernel = model.get_layer("dense_1").kernel.numpy().copy()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    x = np.random.default_rng(0).normal(5, 2, (8, 4)).astype("float32")
    out_train = model(x, training=True).numpy()
    model.fit(x, np.zeros((8, 2), "float32"), batch_size=8, epochs=1, verbose=0)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, bn.weights, strict=True))
    assert not np.array_equal(kernel, model.get_layer("dense_1").kernel.numpy())
    # The branch: with the saved moving statistics, the output is the moving normalization.
    h = np.maximum(x @ values["dense_1/kernel"] + values["dense_1/bias"], 0)
    mean, var = (
        values["batch_normalization_1/moving_mean"],
        values["batch_normalization_1/moving_variance"],
    )
    g, b = values["batch_normalization_1/gamma"], values["batch_normalization_1/beta"]
    y = (h - mean) / np.sqrt(var + 1e-3) * g + b
    expected = y @ values["dense_2/kernel"] + values["dense_2/bias"]
    assert np.allclose(out_train, expected, atol=1e-4)


@pytest.fixture(scope="session")
def tf_keras_files(tmp_path_factory) -> dict[str, Path]:
    tk = pytest.importorskip("tf_keras")
    L = tk.layers
    folder = tmp_path_factory.mktemp("tf_keras_names")
    out = {}
    seq = tk.Sequential([tk.Input((4,)), L.Dense(3, name="d1"), L.BatchNormalization(name="bn")])
    out["seq"] = folder / "seq.h5"
    seq.save(out["seq"])
    i = tk.Input((4,))
    inner = tk.Model(i, L.Dense(3, name="deep")(i), name="inner")
    i2 = tk.Input((4,))
    mid = tk.Model(i2, L.BatchNormalization(name="mbn")(inner(i2)), name="mid")
    i3 = tk.Input((4,))
    out["deep"] = folder / "deep.h5"
    tk.Model(i3, L.Dense(2, name="top")(mid(i3))).save(out["deep"])
    i4 = tk.Input((5, 3))
    x = L.Bidirectional(L.LSTM(3), name="bil")(i4)
    y = L.Bidirectional(L.GRU(2), name="big")(i4)
    out["bidi"] = folder / "bidi.h5"
    tk.Model(i4, L.Concatenate(name="cat")([x, y])).save(out["bidi"])
    return out


@pytest.mark.parametrize("name", ["seq", "deep", "bidi"])
def test_tf_keras_weight_names_and_a_real_step(tf_keras_files, name):
    """Item 3: every built-in layer whose weights are in the file gets trains_weights True or
    False, never null, and tf_keras's own fit() step agrees (its weights moved)."""
    import numpy as np
    import tf_keras as tk

    path = tf_keras_files[name]
    doc = inspect_json(path, "--runtime", "tf-keras")
    model = tk.models.load_model(path, compile=False)
    leaves: dict[str, Any] = {}

    def visit(layer: Any, prefix: str) -> None:
        children = getattr(layer, "layers", None)
        if isinstance(layer, tk.layers.Bidirectional):
            leaves[
                prefix + layer.name + "/" + layer.forward_layer.name.removeprefix("forward_")
            ] = layer
            return
        if children is not None and layer is not model:
            for child in children:
                visit(child, prefix + layer.name + "/")
        elif layer.weights:
            leaves[prefix + layer.name] = layer

    for layer in model.layers:
        visit(layer, "")
    before = {p: [w.numpy().copy() for w in layer.trainable_weights] for p, layer in leaves.items()}
    model.compile(optimizer=tk.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    x = np.random.default_rng(0).normal(5, 2, (4, *model.input_shape[1:])).astype("float32")
    y = np.zeros((4, *model.output_shape[1:]), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    predicted = {layer["path"]: layer["in_fit"]["trains_weights"] for layer in doc["layers"]}
    for path_, layer in leaves.items():
        moved = any(
            not np.array_equal(a, w.numpy())
            for a, w in zip(before[path_], layer.trainable_weights, strict=True)
        )
        assert predicted[path_] is moved, (path_, predicted[path_], moved)


def test_keras3_sequential_h5_weight_names_carry_the_model_name(tmp_path):
    """Item 3: Keras 3 names a top-level Sequential layer's weights ``outer/dense/kernel``;
    inspect must attribute them to ``dense``, and a real fit() step agrees on every layer."""
    import h5py
    import keras
    from keras_truth import measure_fit_step

    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, name="dense"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(2, name="frozen_head", trainable=False),
        ],
        name="outer",
    )
    path = tmp_path / "seq.h5"
    model.save(path)
    with h5py.File(path) as h5:
        names = [
            n.decode() if isinstance(n, bytes) else n
            for n in h5["model_weights/dense"].attrs["weight_names"]
        ]
    assert names[0].startswith("outer/dense/"), names  # the scheme this test is about
    doc = inspect_json(path)
    predicted = {layer["path"]: layer["in_fit"]["trains_weights"] for layer in doc["layers"]}
    moved = measure_fit_step(keras.models.load_model(path, compile=False))
    measured = {p: (m.gamma_beta if m.is_batchnorm else m.other_weights) for p, m in moved.items()}
    assert (
        {p: predicted[p] for p in measured}
        == measured
        == {
            "dense": True,
            "bn": True,
            "frozen_head": False,
        }
    )
