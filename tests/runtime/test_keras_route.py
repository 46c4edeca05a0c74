"""The Keras engine route (bnfreeze.runtime.keras_route): what only a loaded model can edit.

Truth comes from Keras: outputs are loaded back, compared value by value with the input, and
trained one real step to see which variables move.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import bnfreeze
from bnfreeze.cli import cli
from bnfreeze.errors import BnfreezeError, ModelFormatError, UnsafeModelError
from bnfreeze.formats.readers import read_model
from bnfreeze.model.walk import walk
from bnfreeze.ops import request as file_edit
from bnfreeze.ops.inspect import inspect_file
from bnfreeze.ops.optimizer_state import OptimizerState
from bnfreeze.runtime import live as keras_live
from bnfreeze.runtime import saving

pytestmark = pytest.mark.keras


def load(path: Path, objects=None, *, safe_mode: bool = True, compile: bool = False):
    import keras

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return keras.models.load_model(
            path, custom_objects=objects, safe_mode=safe_mode, compile=compile
        )


def objects_from(file: Path) -> dict:
    from bnfreeze.runtime.loading import load_custom_objects

    return load_custom_objects(str(file))


def values(model) -> dict:
    return saving.values_by_path(keras_live.live_layers(model))


def moved_layers(model, x, y) -> set[str]:
    """Layers whose own variables change in one real fit() step (fresh SGD)."""
    import keras

    before = values(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    model.fit(x, y, batch_size=len(x), verbose=0)
    after = values(model)
    return {k.split(":")[0] for k in before if not np.array_equal(before[k], after[k])}


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------ paths


def test_live_paths_follow_the_walk(samples):
    """Nested Functional, Sequential and a TimeDistributed wrapper: the live model's records
    are the saved config's records, path for path."""
    import keras

    inner = keras.Sequential(
        [
            keras.Input((3, 4)),
            keras.layers.TimeDistributed(keras.layers.Dense(4, name="td_d"), name="td"),
            keras.layers.BatchNormalization(name="inner_bn"),
        ],
        name="seq",
    )
    inputs = keras.Input((3, 4), name="x")
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(inner(inputs)), name="m")
    live = keras_live.live_model(model)
    walked = walk(keras_live.serialized_config(model)).layers
    assert [r.path for r in live.records] == [r.path for r in walked]
    assert "seq/td/td_d" in live.layers
    on_disk = inspect_file(samples / "bn_under_frozen.keras")
    loaded = keras_live.live_report(load(samples / "bn_under_frozen.keras"))
    assert [s.layer.path for s in loaded.layers] == [s.layer.path for s in on_disk.layers]
    assert [s.in_fit for s in loaded.layers] == [s.in_fit for s in on_disk.layers]


# ------------------------------------------------------------------------------ custom BN


def test_custom_bn_subclass_is_frozen_by_isinstance(custom_bn_keras, custom_layers_file, tmp_path):
    """--bn-inference on a model with a custom BN subclass: the config route cannot know it
    is BN, so auto picks the Keras engine, which freezes it. Measured: one fit() step moves
    neither BN, while the Dense layers train."""
    out = tmp_path / "out.keras"
    result = bnfreeze.freeze(
        custom_bn_keras, output=out, bn_inference=True, custom_objects=str(custom_layers_file)
    )
    assert result.engine is file_edit.Engine.KERAS
    assert [(c.path, c.before, c.after) for c in result.changes] == [
        ("my_bn", True, False),
        ("bn", True, False),
    ]
    assert [s.layer.path for s in result.report.batchnorm] == ["my_bn", "bn"]
    assert result.report.bn_inference_in_fit == 2
    assert result.optimizer_state is OptimizerState.DROPPED
    assert read_model(out).optimizer_variables is None and read_model(out).compiled
    objects = objects_from(custom_layers_file)
    loaded = load(out, objects)
    assert values(loaded).keys() == values(load(custom_bn_keras, objects)).keys()
    for key, value in values(load(custom_bn_keras, objects)).items():
        assert np.array_equal(value, values(loaded)[key]), key
    rng = np.random.default_rng(0)
    moved = moved_layers(loaded, rng.normal(5, 2, (8, 4)), rng.normal(size=(8, 1)))
    assert moved == {"d", "o"}


def test_custom_bn_needs_custom_objects(custom_bn_keras, tmp_path, monkeypatch):
    import keras

    monkeypatch.delitem(keras.saving.get_custom_objects(), "bnfreeze_test>MyBN")
    with pytest.raises(ModelFormatError, match="--custom-objects"):
        bnfreeze.freeze(custom_bn_keras, output=tmp_path / "out.keras", bn_inference=True)
    assert files_in(tmp_path) == []


def test_h5_output_through_the_engine(custom_bn_keras, custom_layers_file, tmp_path):
    """Saved as legacy .h5: compiled (training_config), no optimizer_weights, same values."""
    import h5py

    out = tmp_path / "out.h5"
    bnfreeze.freeze(
        custom_bn_keras,
        output=out,
        bn_inference=True,
        engine="keras",
        custom_objects=str(custom_layers_file),
    )
    with h5py.File(out) as h5:
        assert "training_config" in h5.attrs and "optimizer_weights" not in h5
    objects = objects_from(custom_layers_file)
    loaded = load(out, objects)
    assert not loaded.get_layer("my_bn").trainable and not loaded.get_layer("bn").trainable
    before = values(load(custom_bn_keras, objects))
    assert all(np.array_equal(v, values(loaded)[k]) for k, v in before.items())


# ------------------------------------------------------------------------------ subclassed


def test_subclassed_model_dry_run_sees_live_layers(subclassed_keras, custom_layers_file):
    result = bnfreeze.freeze(
        subclassed_keras,
        output=None,
        bn_inference=True,
        dry_run=True,
        custom_objects=str(custom_layers_file),
    )
    assert result.engine is file_edit.Engine.KERAS
    assert [s.layer.path for s in result.report.layers] == ["dense", "bn", "head"]
    assert [c.path for c in result.changes] == ["bn"]
    assert result.output is None


def test_subclassed_model_flags_that_keras_cannot_save_are_recorded(
    subclassed_keras, custom_layers_file, tmp_path
):
    """Keras does not store the flags of layers a subclassed model creates in Python: a plain
    keras.models.load_model gives bn trainable again. The .keras output records them
    (bnfreeze.json) and bnfreeze.load_model sets them again; the warning says so."""
    import bnfreeze

    runner = CliRunner()
    out = tmp_path / "out.keras"
    args = ["freeze", str(subclassed_keras), "--bn-inference"]
    args += ["--custom-objects", str(custom_layers_file), "-o", str(out)]
    result = runner.invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "bnfreeze.load_model(" in result.stderr
    assert "Traceback" not in result.stderr
    objects = objects_from(custom_layers_file)
    assert load(out, objects).get_layer("bn").trainable is True  # Keras alone: the trap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = bnfreeze.load_model(out, custom_objects=objects, compile=False)
    assert loaded.get_layer("bn").trainable is False
    assert [path for path, flag in saving.record_flags(loaded).flags.items() if not flag] == ["bn"]


# ------------------------------------------------------------------------------ safety


@pytest.fixture(scope="module")
def lambda_keras(tmp_path_factory) -> Path:
    import keras

    inputs = keras.Input((4,), name="x")
    h = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="o")(h), name="with_lambda")
    path = tmp_path_factory.mktemp("lambda") / "lambda.keras"
    model.save(path)
    return path


def test_lambda_refused_unless_unsafe(lambda_keras, tmp_path):
    out = tmp_path / "out.keras"
    with pytest.raises(UnsafeModelError, match="--unsafe"):
        bnfreeze.freeze(lambda_keras, output=out, bn_inference=True, engine="keras")
    assert files_in(tmp_path) == []
    result = bnfreeze.freeze(
        lambda_keras, output=out, bn_inference=True, engine="keras", unsafe=True
    )
    assert [c.path for c in result.changes] == ["bn"]
    assert load(out, safe_mode=False).get_layer("bn").trainable is False


# ------------------------------------------------------------------------------ vs config route


@pytest.fixture(scope="module")
def guide_both_routes(samples, tmp_path_factory):
    """unfreeze --keep-bn-inference --optimizer-state drop on the guide sample, once per
    route (the Keras engine does not remap, so drop is what both routes do alike)."""
    folder = tmp_path_factory.mktemp("routes")
    results = {}
    for engine in ("config", "keras"):
        out = folder / f"{engine}.keras"
        results[engine] = bnfreeze.unfreeze(
            samples / "guide_pattern.keras",
            output=out,
            keep_bn_inference=True,
            engine=engine,
            optimizer_state="drop",
        )
    return results


def test_engine_and_config_route_agree(samples, guide_both_routes):
    config, engine = guide_both_routes["config"], guide_both_routes["keras"]
    assert (config.engine, engine.engine) == (file_edit.Engine.CONFIG, file_edit.Engine.KERAS)
    assert config.changes == engine.changes
    flags = [
        [(r.path, r.trainable) for r in walk(read_model(res.output).config).layers]
        for res in (config, engine)
    ]
    assert flags[0] == flags[1]
    for res in (config, engine):
        written = read_model(res.output)
        assert written.compiled and written.optimizer_variables is None
        assert res.optimizer_state is OptimizerState.DROPPED
    source = values(load(samples / "guide_pattern.keras"))
    for res in (config, engine):
        again = values(load(Path(res.output)))
        assert all(np.array_equal(v, again[k]) for k, v in source.items())
    assert engine.output_bytes <= engine.input_bytes


@pytest.fixture(scope="module")
def compiled_without_optimizer_state(tmp_path_factory) -> Path:
    """A compiled, trained model whose file holds no optimizer variables: the output of the
    config route after a change that dropped them."""
    import keras

    keras.utils.set_random_seed(5)
    inputs = keras.Input((32,), name="x")
    h = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(256, name="d")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(32, name="o")(h), name="plain")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    rng = np.random.default_rng(5)
    model.fit(rng.normal(size=(16, 32)), rng.normal(size=(16, 32)), verbose=0)
    folder = tmp_path_factory.mktemp("no_state")
    model.save(folder / "trained.keras")
    out = folder / "frozen.keras"
    bnfreeze.freeze(folder / "trained.keras", output=out, bn_inference=True, optimizer_state="drop")
    assert read_model(out).compiled and read_model(out).optimizer_variables is None
    return out


def test_no_zero_filled_optimizer_slots(compiled_without_optimizer_state, tmp_path):
    """Keras's load builds a fresh optimizer for a compiled model, and a naive save writes
    its zero-filled slots (measured: 103 MB -> 308 MB on ResNet50). The engine does not."""
    source = compiled_without_optimizer_state
    naive = tmp_path / "naive.keras"
    model = load(source, compile=True)
    model.get_layer("bn").trainable = True
    model.save(naive)
    ours = tmp_path / "ours.keras"
    result = bnfreeze.unfreeze(source, output=ours, engine="keras")
    assert result.optimizer_state is OptimizerState.NONE
    assert [c.path for c in result.changes] == ["bn"]
    assert read_model(naive).optimizer_variables == 2 + 2 * 4  # Adam slots for d and o
    assert read_model(ours).optimizer_variables is None and read_model(ours).compiled
    plain = tmp_path / "plain.keras"  # what Keras writes for the model with no optimizer
    load(source).save(plain)
    assert ours.stat().st_size <= plain.stat().st_size + 4096
    assert naive.stat().st_size > plain.stat().st_size * 2.5


# ------------------------------------------------------------------------------ the CLI


def test_cli_progress_on_stderr_json_on_stdout(custom_bn_keras, custom_layers_file, tmp_path):
    out = tmp_path / "out.keras"
    result = CliRunner().invoke(
        cli,
        [
            "freeze",
            str(custom_bn_keras),
            "-o",
            str(out),
            "--bn-inference",
            "--json",
            "--custom-objects",
            str(custom_layers_file),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert [c["path"] for c in document["changes"]] == ["my_bn", "bn"]
    assert "bnfreeze: loading Keras (TensorFlow backend)" in result.stderr
    assert "bnfreeze: loading the saved model back to check it" in result.stderr


def test_bad_output_name_for_keras(custom_bn_keras, tmp_path):
    with pytest.raises(BnfreezeError, match=r"\.keras"):
        bnfreeze.freeze(custom_bn_keras, output=tmp_path / "out.model", engine="keras")
    assert files_in(tmp_path) == []
