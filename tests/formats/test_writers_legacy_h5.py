"""The legacy `.h5` writer: new flags, and every value still where Keras expects it.

The truth comes from Keras: each output is loaded with ``keras.models.load_model`` and every
variable is compared, by layer path, with the input loaded the same way.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

import bnfreeze
from bnfreeze.errors import OutputError
from bnfreeze.formats.atomic import write_atomically
from bnfreeze.formats.readers import read_model
from bnfreeze.formats.writers import WriteOutcome, WriteRequest, legacy_h5
from bnfreeze.formats.writers.legacy_h5 import WRITER
from bnfreeze.model.assignments import apply_to_config, current_flags
from bnfreeze.model.walk import walk
from bnfreeze.ops import request as file_edit
from bnfreeze.ops.optimizer_state import OptimizerState

pytestmark = pytest.mark.keras


# ------------------------------------------------------------------------------ helpers


def load(path: Path, *, compile: bool = True):
    import keras

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return keras.models.load_model(path, compile=compile)


def leaves(model, prefix: str = "") -> dict:
    """Every non-container layer of a live model, by bnfreeze path."""
    import keras

    out = {}
    for layer in model.layers:
        path = prefix + layer.name
        if isinstance(layer, keras.Model):
            out.update(leaves(layer, path + "/"))
        else:
            out[path] = layer
    return out


def values_by_path(model) -> dict[str, np.ndarray]:
    """Every variable of a live model: ``{layer path:index:variable name: value}``."""
    return {
        f"{path}:{i}:{v.name}": np.array(v.numpy())
        for path, layer in leaves(model).items()
        for i, v in enumerate(layer.weights)
    }


def differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    assert a.keys() == b.keys()
    return sorted(k for k in a if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]))


def request(path: Path, new: dict[str, bool], *, drop: bool = True) -> WriteRequest:
    """Any flags at all (not only what one recipe gives), optimizer state dropped."""
    model = read_model(path)
    layers = walk(model.config).layers
    flags = {**current_flags(layers), **new}
    return WriteRequest(
        model=model,
        config=apply_to_config(model.config, layers, flags),
        layers=layers,
        flags=flags,
        drop_optimizer_state=drop,
    )


def edit(path: Path, out: Path, new: dict[str, bool], *, drop: bool = True) -> WriteOutcome:
    """The writer as the orchestration runs it: write, verify, then move into place."""
    req = request(path, new, drop=drop)
    done: list[WriteOutcome] = []
    write_atomically(
        out,
        produce=lambda tmp: done.append(WRITER.write(req, tmp)),
        verify=lambda tmp: WRITER.verify(req, tmp),
    )
    return done[0]


def regrouped(path: Path, new: dict[str, bool]) -> tuple[str, ...]:
    return legacy_h5.plan_request(request(path, new)).regrouped


def naive_edit(path: Path, out: Path, new: dict[str, bool]) -> None:
    """What a hand-written script does: change the flags in model_config, nothing else."""
    model = read_model(path)
    walked = walk(model.config)
    flags = {**current_flags(walked.layers), **new}
    shutil.copyfile(path, out)
    with h5py.File(out, "r+") as h5:
        h5.attrs["model_config"] = json.dumps(apply_to_config(model.config, walked.layers, flags))


def build_nested():
    """A nested model with every layout that scrambles: BN,BN and BN,Dense Sequentials, a
    Functional holding another Functional, and top-level leaves. Compiled and trained, so the
    file carries an optimizer and real statistics."""
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((4,), name="x")
    d_in = keras.Input((4,))
    d = keras.layers.BatchNormalization(name="db1")(d_in)
    d = keras.layers.Dense(4, name="dd")(d)
    deep = keras.Model(d_in, keras.layers.BatchNormalization(name="db2")(d), name="deep")
    f_in = keras.Input((4,))
    f = keras.layers.BatchNormalization(name="fb1")(f_in)
    f = keras.layers.Dense(4, name="fd")(deep(f))
    func = keras.Model(f_in, keras.layers.BatchNormalization(name="fb2")(f), name="func")
    bn_bn = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.BatchNormalization(name="bn2"),
        ],
        name="bn_bn",
    )
    bn_dense = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.BatchNormalization(name="bn3"),
            keras.layers.Dense(4, name="d1"),
        ],
        name="bn_dense",
    )
    x = keras.layers.BatchNormalization(name="top_bn")(bn_dense(bn_bn(func(inputs))))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x), name="nested")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.MeanSquaredError())
    rng = np.random.default_rng(7)
    model.fit(
        rng.normal(3, 2, (32, 4)), rng.normal(size=(32, 1)), epochs=2, batch_size=8, verbose=0
    )
    func.trainable = False  # a frozen Functional group: stored unpartitioned
    func.get_layer("fb2").trainable = True  # ...with a trainable BN inside it
    return model


@pytest.fixture(scope="module")
def nested_h5(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("h5") / "nested.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_nested().save(path)
    return path


@pytest.fixture(scope="module")
def nested_values(nested_h5) -> dict[str, np.ndarray]:
    return values_by_path(load(nested_h5))


# ------------------------------------------------------------------------------ the proof

CASES = {
    "bn1 frozen in BN,BN": {"bn_bn/bn1": False},
    "bn2 frozen in BN,BN": {"bn_bn/bn2": False},
    "bn3 frozen in BN,Dense": {"bn_dense/bn3": False},
    "d1 frozen in BN,Dense": {"bn_dense/d1": False},
    "BN,Dense both frozen": {"bn_dense/bn3": False, "bn_dense/d1": False},
    "deep Functional": {"func/deep/db1": False, "func/fd": False, "func/fb2": False},
    "frozen Functional unfrozen": {"func": True, "func/fb1": True, "func/deep/db2": True},
    "top-level leaves": {"top_bn": False, "head": False},
}


@pytest.mark.parametrize("new", CASES.values(), ids=CASES.keys())
def test_every_value_by_path_survives(nested_h5, nested_values, tmp_path, new):
    out = tmp_path / "out.h5"
    edit(nested_h5, out, new)
    loaded = load(out)
    assert differing(values_by_path(loaded), nested_values) == []
    live = leaves(loaded)
    for path, flag in new.items():
        if path in live:
            assert live[path].trainable is flag, path


@pytest.mark.parametrize("seed", range(6))
def test_random_flag_changes_keep_every_value(nested_h5, nested_values, tmp_path, seed):
    """Random flips of any leaves, at every depth at once (seeded, so a failure reproduces)."""
    rng = np.random.default_rng(seed)
    layers = walk(read_model(nested_h5).config).layers
    leaves_ = [r for r in layers if r.kind.value not in ("container", "input")]
    new = {r.path: not r.trainable for r in leaves_ if rng.random() < 0.5}
    out = tmp_path / "out.h5"
    edit(nested_h5, out, new)
    loaded = load(out)
    assert differing(values_by_path(loaded), nested_values) == [], new
    live = leaves(loaded)
    assert all(live[p].trainable is flag for p, flag in new.items()), new


def assert_scrambled(path: Path, before: dict[str, np.ndarray], *, compile: bool = True) -> None:
    """Keras either loads the file with values in the wrong places or cannot load it."""
    try:
        loaded = load(path, compile=compile)
    except ValueError as exc:
        assert "Shape mismatch" in str(exc)
        return
    assert differing(values_by_path(loaded), before) != []


@pytest.mark.parametrize("new", [CASES["bn1 frozen in BN,BN"], CASES["bn3 frozen in BN,Dense"]])
def test_naive_config_edit_scrambles(nested_h5, nested_values, tmp_path, new):
    """Without the reordering, Keras puts weights in the wrong places (or cannot load at all):
    the comparison above is a real check."""
    out = tmp_path / "naive.h5"
    naive_edit(nested_h5, out, new)
    assert_scrambled(out, nested_values)


def test_sample_nested_legacy(samples, tmp_path):
    """The shipped sample: bn1 frozen inside the BN,BN sub-model, d1 inside BN,Dense.

    compile=False: Keras 3.15 cannot rebuild this sample's string loss "mse" from an .h5
    training_config, for the input as well as the output.
    """
    source = samples / "nested_legacy.h5"
    new = {"bn_bn/bn1": False, "bn_dense/d1": False}
    out = tmp_path / "out.h5"
    edit(source, out, new)
    assert regrouped(source, new) == ("bn_bn", "bn_dense")
    before = values_by_path(load(source, compile=False))
    loaded = load(out, compile=False)
    assert differing(values_by_path(loaded), before) == []
    assert leaves(loaded)["bn_bn/bn1"].trainable is False
    assert leaves(loaded)["bn_dense/d1"].trainable is False
    naive_edit(source, tmp_path / "naive.h5", {"bn_bn/bn1": False})
    assert_scrambled(tmp_path / "naive.h5", before, compile=False)


@pytest.fixture(scope="module")
def guide_h5(samples, tmp_path_factory) -> Path:
    """The guide-pattern sample (frozen MobileNetV2 backbone, compiled) as a legacy .h5."""
    import keras

    path = tmp_path_factory.mktemp("guide") / "guide.h5"
    model = load(samples / "guide_pattern.keras", compile=False)
    # A loss object, not "mse": Keras 3.15 cannot rebuild a string loss from an .h5.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.MeanSquaredError())
    model.optimizer.build(model.trainable_variables)  # saved as optimizer_weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(path)
    return path


def test_guide_recipe_on_h5(guide_h5, tmp_path):
    """unfreeze --keep-bn-inference on a MobileNetV2 backbone: 51 BN stay frozen, every
    value lands where it was, and one real fit() step moves no BN variable but the convs."""
    import keras

    out = tmp_path / "out.h5"
    result = bnfreeze.unfreeze(guide_h5, output=out, keep_bn_inference=True)
    assert result.engine is file_edit.Engine.CONFIG
    assert result.optimizer_state is OptimizerState.DROPPED
    assert result.optimizer_variables_dropped == 6
    assert result.report.bn_inference_in_fit == 51
    before = values_by_path(load(guide_h5))
    loaded = load(out)
    assert differing(values_by_path(loaded), before) == []
    assert loaded.optimizer.iterations.numpy() == 0  # a fresh optimizer, as the output says
    loaded.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    rng = np.random.default_rng(1)
    loaded.fit(rng.normal(5, 2, (4, 32, 32, 3)), rng.normal(size=(4, 2)), verbose=0)
    moved = {k.split(":")[0] for k in differing(values_by_path(loaded), before)}
    live = leaves(loaded)
    bn = {p for p, layer in live.items() if isinstance(layer, keras.layers.BatchNormalization)}
    convs = {p for p, layer in live.items() if "Conv" in type(layer).__name__}
    assert len(bn) == 51 and len(convs) == 51
    assert moved & bn == set()
    # Keras's own list of what the optimizer updates holds every conv kernel; with untrained
    # statistics some ReLU6 units are saturated, so not every kernel moves in one step.
    trained = {id(v) for v in loaded.trainable_variables}
    assert all(id(live[p].kernel) in trained for p in convs)
    assert len(moved & convs) > len(convs) // 2


# ------------------------------------------------------------------------------ optimizer


def _optimizer_logs(path: Path, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load(path)
    return [r.getMessage() for r in caplog.records if "optimizer" in r.getMessage()]


def test_optimizer_state_dropped_when_trainable_set_changes(nested_h5, tmp_path, caplog):
    out = tmp_path / "out.h5"
    result = bnfreeze.freeze(nested_h5, output=out, layers=["bn_bn/bn1"])
    assert result.optimizer_state is OptimizerState.DROPPED
    assert result.optimizer_variables_dropped == read_model(nested_h5).optimizer_variables > 0
    with h5py.File(out) as h5:
        assert "optimizer_weights" not in h5
        assert "training_config" in h5.attrs  # Keras still compiles it, with a fresh optimizer
    assert read_model(out).optimizer_variables is None
    assert _optimizer_logs(out, caplog) == []
    assert out.stat().st_size < nested_h5.stat().st_size


def test_keep_optimizer_state(nested_h5, nested_values, tmp_path):
    out = tmp_path / "out.h5"
    result = bnfreeze.freeze(nested_h5, output=out, layers=["bn_bn/bn1"], optimizer_state="keep")
    assert result.optimizer_state is OptimizerState.KEPT
    assert result.optimizer_variables_dropped == 0
    assert read_model(out).optimizer_variables == read_model(nested_h5).optimizer_variables
    assert differing(values_by_path(load(out)), nested_values) == []


def test_plan_sees_whether_the_trainable_set_changes(nested_h5):
    """Freezing an already frozen layer changes nothing Keras trains; freezing bn1 does."""
    assert not legacy_h5.plan_request(request(nested_h5, {"func/fb1": False})).trainable_set_changed
    assert legacy_h5.plan_request(request(nested_h5, {"bn_bn/bn1": False})).trainable_set_changed


# ------------------------------------------------------------------------------ refusals


def test_refuses_what_it_cannot_order(nested_h5, tmp_path):
    """A layer class whose variable kinds bnfreeze does not know, trainable inside a nested
    group: refused with a message naming --engine keras, and nothing is written."""
    model = read_model(nested_h5)
    walked = walk(model.config)
    config = json.loads(json.dumps(model.config))
    records = list(walked.layers)
    target = next(r for r in records if r.path == "bn_dense/d1")
    node = config
    for key in target.config_path:
        node = node[key]
    node["class_name"] = "MyDense"
    node["module"] = "my_layers"
    custom = walk(config).layers
    flags = {**current_flags(custom), "bn_dense/bn3": False}
    req = WriteRequest(
        model=model, config=apply_to_config(config, custom, flags), layers=custom, flags=flags
    )
    out = tmp_path / "out.h5"
    with pytest.raises(legacy_h5.H5RewriteError, match="--engine keras"):
        write_atomically(out, produce=lambda tmp: WRITER.write(req, tmp))
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_weight_order_it_cannot_replay():
    """If the stored order is not what bnfreeze's model of Keras predicts, it refuses."""
    model_layers = walk(
        {
            "class_name": "Functional",
            "config": {
                "name": "m",
                "trainable": True,
                "layers": [
                    {
                        "class_name": "Sequential",
                        "config": {
                            "name": "s",
                            "trainable": True,
                            "layers": [
                                {
                                    "class_name": "BatchNormalization",
                                    "config": {"name": "a", "trainable": True},
                                },
                                {
                                    "class_name": "BatchNormalization",
                                    "config": {"name": "b", "trainable": True},
                                },
                            ],
                        },
                    }
                ],
            },
        }
    ).layers
    stored = {
        "s": [
            "s/a/gamma",
            "s/a/beta",
            "s/a/moving_mean",
            "s/a/moving_variance",
            "s/b/gamma",
            "s/b/beta",
            "s/b/moving_mean",
            "s/b/moving_variance",
        ]
    }
    old = current_flags(model_layers)
    with pytest.raises(legacy_h5.H5RewriteError, match="does not follow"):
        legacy_h5.plan_from_names(stored, model_layers, old, {**old, "s/a": False})
    # The order Keras really writes for two trainable BNs: gamma/beta first.
    stored["s"] = [
        "s/a/gamma",
        "s/a/beta",
        "s/b/gamma",
        "s/b/beta",
        "s/a/moving_mean",
        "s/a/moving_variance",
        "s/b/moving_mean",
        "s/b/moving_variance",
    ]
    layout = legacy_h5.plan_from_names(stored, model_layers, old, {**old, "s/a": False})
    assert layout.weight_names["s"] == (
        "s/b/gamma",
        "s/b/beta",
        "s/a/gamma",
        "s/a/beta",
        "s/a/moving_mean",
        "s/a/moving_variance",
        "s/b/moving_mean",
        "s/b/moving_variance",
    )


def test_failed_verification_leaves_nothing(nested_h5, tmp_path, monkeypatch):
    """A write that does not read back as planned never reaches the destination."""
    real = legacy_h5._write_copy

    def corrupting(source, target, config, layout, *, drop_optimizer):
        real(source, target, config, layout, drop_optimizer=drop_optimizer)
        with h5py.File(target, "r+") as h5:
            h5["model_weights/head/head/bias"][...] = 42.0

    monkeypatch.setattr(legacy_h5, "_write_copy", corrupting)
    out = tmp_path / "out.h5"
    out.write_bytes(b"previous output")
    with pytest.raises(OutputError, match="head/bias changed"):
        edit(nested_h5, out, {"bn_bn/bn1": False})
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


# ------------------------------------------------------------------------------ attributes


def test_chunked_weight_names_are_reordered_in_place(tmp_path):
    """Long lists are split by Keras into weight_names0..N; a permutation keeps the split."""
    names = [f"group/layer_{i:05d}_with_a_long_name/kernel" for i in range(3000)]
    path = tmp_path / "chunks.h5"
    with h5py.File(path, "w") as h5:
        group = h5.create_group("group")
        for i, part in enumerate(np.array_split(np.asarray([n.encode() for n in names]), 3)):
            group.attrs[f"weight_names{i}"] = part
    assert all(p.nbytes <= 64512 for p in np.array_split(np.asarray(names, "S"), 3))
    shuffled = list(reversed(names))
    with h5py.File(path, "r+") as h5:
        legacy_h5.write_weight_names(h5["group"], shuffled)
    with h5py.File(path) as h5:
        assert sorted(h5["group"].attrs) == ["weight_names0", "weight_names1", "weight_names2"]
        assert legacy_h5.read_weight_names(h5["group"]) == shuffled


@pytest.fixture(scope="module")
def custom_nested_h5(custom_layers_file, tmp_path_factory) -> Path:
    """An .h5 whose nested Sequential holds a custom BN subclass next to a Dense."""
    import keras

    from bnfreeze.runtime.loading import load_custom_objects

    my = load_custom_objects(str(custom_layers_file))
    keras.utils.set_random_seed(9)
    block = keras.Sequential(
        [keras.Input((4,)), my["MyBN"](name="mine"), keras.layers.Dense(4, name="dd")],
        name="blk",
    )
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(block(inputs)), name="m")
    model(np.random.default_rng(9).normal(3, 2, (8, 4)), training=True)  # move the statistics
    path = tmp_path_factory.mktemp("custom_h5") / "custom.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(path)
    return path


def test_unknown_layer_kinds_fall_back_to_the_keras_engine(
    custom_nested_h5, custom_layers_file, tmp_path
):
    """Freezing dd next to a trainable custom layer: the config route cannot know the custom
    layer's variable kinds, so it refuses; auto then edits through Keras, and every value is
    still where it was."""
    import keras

    from bnfreeze.runtime.loading import load_custom_objects

    out = tmp_path / "out.h5"
    with pytest.raises(legacy_h5.H5RewriteError, match="--engine keras"):
        bnfreeze.freeze(custom_nested_h5, output=out, layers=["blk/dd"], engine="config")
    assert list(tmp_path.iterdir()) == []
    result = bnfreeze.freeze(
        custom_nested_h5, output=out, layers=["blk/dd"], custom_objects=str(custom_layers_file)
    )
    assert result.engine is file_edit.Engine.KERAS
    assert [c.path for c in result.changes] == ["blk/dd"]
    objects = load_custom_objects(str(custom_layers_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = keras.models.load_model(custom_nested_h5, custom_objects=objects)
        after = keras.models.load_model(out, custom_objects=objects)
    assert differing(values_by_path(after), values_by_path(before)) == []
    assert leaves(after)["blk/dd"].trainable is False
    assert leaves(after)["blk/mine"].trainable is True
