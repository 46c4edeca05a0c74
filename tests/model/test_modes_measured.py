"""Measured truth (issue 2, Acceptance): what ``bnfreeze inspect --json`` predicts from the
FILE agrees, for every layer, with what moves when Keras loads that file and trains one real
``fit()`` step (``tests/support/keras_truth.py``). The rule is never re-derived here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from keras_truth import (
    Moved,
    edit_keras_config,
    measure_fit_step,
    measure_predict,
    set_every_flag,
)
from paths import SAMPLES

from bnfreeze.cli import cli

pytestmark = pytest.mark.keras

SAMPLE_FILES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".keras", ".h5"))


def predicted(path: Path) -> dict[str, Any]:
    """``bnfreeze inspect --json`` on the file, through the CLI."""
    result = CliRunner().invoke(cli, ["inspect", "--json", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def load(path: Path) -> Any:
    """Load without the saved compile config: measure_fit_step compiles afresh anyway, and
    Keras 3.15 cannot restore a legacy .h5's compiled loss ("Could not deserialize
    'keras.metrics.mse' because it is not a KerasSaveable subclass")."""
    import keras

    return keras.models.load_model(path, compile=False)


def disagreements(doc: dict[str, Any], truth: dict[str, Moved]) -> list[str]:
    """Every way the prediction differs from what moved, one line each."""
    problems = []
    listed = {layer["path"] for layer in doc["layers"]}
    for path in truth:
        if path not in listed:
            problems.append(f"{path}: Keras has this layer, inspect does not list it")
    for layer in doc["layers"]:
        path, fit = layer["path"], layer["in_fit"]
        got = (fit["trains_weights"], fit["normalizes_with"], fit["updates_moving_stats"])
        moved = truth.get(path)
        if moved is None:
            # Only an InputLayer of a Sequential is absent from Keras's layer lists.
            if layer["class_name"] != "InputLayer" or got != (None, None, None):
                problems.append(f"{path}: listed by inspect ({got}), but not a Keras layer")
            continue
        if layer["class_name"] != moved.class_name:
            problems.append(f"{path}: class {layer['class_name']} != Keras {moved.class_name}")
        if layer["is_batchnorm"] != moved.is_batchnorm:
            problems.append(f"{path}: is_batchnorm {layer['is_batchnorm']}, Keras says not")
            continue
        if moved.is_batchnorm:
            # A BN with neither gamma nor beta trains no weights: False, not "not applicable".
            want = (
                bool(moved.gamma_beta),
                "batch" if moved.moving_stats else "moving",
                moved.moving_stats,
            )
            # Extra state (batch renormalization) moves with the moving statistics.
            if moved.other_weights not in (None, moved.moving_stats):
                problems.append(f"{path}: BN variables beyond the statistics moved alone")
        else:
            want = (moved.other_weights, None, None)
        if got != want:
            problems.append(
                f"{path} ({layer['class_name']}): predicted (trains_weights, normalizes_with, "
                f"updates_moving_stats) = {got}, measured {want}"
            )
    return problems


def check(path: Path) -> tuple[dict[str, Any], dict[str, Moved]]:
    """Predict from the file, then load it into Keras, train a step, and compare."""
    doc = predicted(path)
    truth = measure_fit_step(load(path))
    problems = disagreements(doc, truth)
    assert not problems, "\n".join(problems)
    return doc, truth


def bn_moving(truth: dict[str, Moved], prefix: str = "") -> int:
    return sum(
        1 for p, m in truth.items() if m.is_batchnorm and m.moving_stats and p.startswith(prefix)
    )


# --- the samples ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_sample(samples, name):
    doc, truth = check(samples / name)
    assert doc["summary"]["batchnorm"] == sum(1 for m in truth.values() if m.is_batchnorm)
    assert doc["summary"]["bn_training_in_fit"] == bn_moving(truth)


def test_bn_under_frozen_sub_model_trains_anyway(samples):
    doc, truth = check(samples / "bn_under_frozen.keras")
    backbone = next(layer for layer in doc["layers"] if layer["path"] == "backbone")
    assert backbone["trainable"] is False
    assert truth["backbone/inner_bn"].moving_stats and truth["backbone/inner_bn"].gamma_beta
    assert truth["backbone/inner_dense"].other_weights is False


def test_predict_and_evaluate_move_nothing(samples):
    """In predict() every BN uses its moving statistics and nothing changes (the Report's
    in_predict; not part of the JSON)."""
    from bnfreeze.ops.inspect import inspect_file

    report = inspect_file(samples / "bn_under_frozen.keras")
    assert {s.in_predict.normalizes_with.value for s in report.batchnorm} == {"moving"}
    assert not any(s.in_predict.updates_moving_stats for s in report.layers)
    truth = measure_predict(load(samples / "bn_under_frozen.keras"))
    assert not any(m.moving_stats or m.gamma_beta or m.other_weights for m in truth.values())


# --- keras.applications, built at test time (conftest.py) ----------------------------------


def test_guide_pattern_phase2(guide_phase2_keras):
    """base(x, training=False), then base.trainable=True and recompile: on Keras 3 every BN
    of the backbone trains in fit(), and the warning counts exactly those."""
    doc, truth = check(guide_phase2_keras)
    base = next(layer["path"] for layer in doc["layers"] if layer["class_name"] == "Functional")
    moving = bn_moving(truth, base + "/")
    assert moving == 52  # every BN of MobileNetV2
    (warning,) = [w for w in doc["warnings"] if w["code"] == "call-site-training-ignored"]
    assert warning["path"] == base
    assert re.search(rf"\b{moving} BN layer\(s\)", warning["message"])


def test_mobilenetv3small_half_frozen(mobilenetv3small_keras):
    doc, truth = check(mobilenetv3small_keras)
    assert 0 < bn_moving(truth) < doc["summary"]["batchnorm"]
    # Its hard-swish "x + 3" and "* (1/6)" are Keras operations: listed, no flag, no weights.
    # (Its residual connections are Add *layers*, named block-wise, with flags.)
    op_name = re.compile(r"(add|multiply)(_\d+)?")
    ops = [layer for layer in doc["layers"] if op_name.fullmatch(layer["name"])]
    assert len(ops) == 18 and all(op["trainable"] is None for op in ops)
    assert all(
        op["in_fit"]
        == {"trains_weights": None, "normalizes_with": None, "updates_moving_stats": None}
        for op in ops
    )


def test_efficientnetb0_bn_inference(efficientnetb0_keras):
    doc, truth = check(efficientnetb0_keras)
    assert bn_moving(truth) == 0
    assert doc["summary"]["bn_inference_in_fit"] == doc["summary"]["batchnorm"] > 40
    assert any(m.other_weights for m in truth.values())  # the convolutions still train


# --- models built here: each is tiny --------------------------------------------------------


def _keras():
    import keras

    keras.utils.set_random_seed(1234)
    return keras


@pytest.mark.filterwarnings("ignore:The model does not have any trainable weights")
def test_root_functional_not_trainable(samples, tmp_path):
    """The model's own flag False, every leaf True (a file edited by hand): gamma/beta and
    other weights do not train, but BN layers still normalize with batch statistics."""

    def edit(config):
        set_every_flag(config, True)
        config["config"]["trainable"] = False

    path = tmp_path / "root_false.keras"
    edit_keras_config(samples / "bn_under_frozen.keras", path, edit)
    doc, truth = check(path)
    assert bn_moving(truth) == 2
    assert not any(m.gamma_beta or m.other_weights for m in truth.values())
    assert [w["code"] for w in doc["warnings"]].count("model-not-trainable") == 1


def test_root_sequential_flag_is_dropped_on_load(samples, tmp_path):
    """Keras 3 drops a Sequential's own flag when it loads one: everything trains."""

    def edit(config):
        set_every_flag(config, True)
        config["config"]["trainable"] = False

    path = tmp_path / "root_false.keras"
    edit_keras_config(samples / "sequential.keras", path, edit)
    doc, truth = check(path)
    assert truth["dense_1"].other_weights and truth["bn_1"].gamma_beta
    assert "model-not-trainable" not in [w["code"] for w in doc["warnings"]]


def test_wrappers(tmp_path):
    """TimeDistributed(BN) with the wrapper frozen but the BN's own flag True, and a frozen
    Bidirectional(LSTM)."""
    keras = _keras()
    inputs = keras.Input((3, 4), name="seq")
    td = keras.layers.TimeDistributed(keras.layers.BatchNormalization(name="td_bn"), name="td")
    td_frozen = keras.layers.TimeDistributed(
        keras.layers.BatchNormalization(name="td_bn_frozen"), name="td_frozen"
    )
    bidi = keras.layers.Bidirectional(keras.layers.LSTM(3, name="lstm"), name="bidi")
    outputs = keras.layers.Dense(1, name="out")(bidi(td_frozen(td(inputs))))
    model = keras.Model(inputs, outputs, name="wrappers")
    td.trainable = False
    td.layer.trainable = True
    td_frozen.trainable = False
    bidi.trainable = False
    path = tmp_path / "wrappers.keras"
    model.save(path)
    doc, truth = check(path)
    assert truth["td/td_bn"].moving_stats and not truth["td_frozen/td_bn_frozen"].moving_stats
    assert truth["bidi/forward_lstm"].other_weights is False
    assert {"bidi/forward_lstm", "bidi/backward_lstm"} <= {layer["path"] for layer in doc["layers"]}


def test_frozen_spectral_normalization_still_rewrites_its_kernel(tmp_path):
    """A known divergence, pinned: SpectralNormalization is a wrapper, not BN, and in fit()
    it assigns a power-iteration vector and the normalized kernel of the layer it wraps,
    whatever the flags. So a frozen SpectralNormalization(Dense) changes in fit() although
    the optimizer trains nothing of it, which is all ``trains_weights`` claims."""
    keras = _keras()
    inputs = keras.Input((4,), name="x")
    spectral = keras.layers.SpectralNormalization(keras.layers.Dense(2, name="sn_dense"), name="sn")
    outputs = keras.layers.Dense(1, name="out")(spectral(inputs))
    model = keras.Model(inputs, outputs, name="spectral")
    spectral.trainable = False
    path = tmp_path / "spectral.keras"
    model.save(path)
    doc = predicted(path)
    truth = measure_fit_step(load(path))
    by_path = {layer["path"]: layer for layer in doc["layers"]}
    assert not by_path["sn"]["is_batchnorm"] and by_path["sn"]["in_fit"]["trains_weights"] is None
    assert by_path["sn/sn_dense"]["in_fit"]["trains_weights"] is False
    assert truth["sn"].other_weights and truth["sn/sn_dense"].other_weights
    problems = disagreements(doc, truth)
    assert [p.split(" ")[0] for p in problems] == ["sn", "sn/sn_dense"]


def test_augmentation_and_dropout_hold_no_weights(tmp_path):
    """The Keras guide puts RandomFlip/RandomRotation in front of the backbone."""
    keras = _keras()
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.RandomFlip("horizontal", name="flip")(inputs)
    x = keras.layers.RandomRotation(0.1, name="rotate")(x)
    x = keras.layers.GaussianNoise(0.1, name="noise")(x)
    x = keras.layers.Conv2D(2, 3, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dropout(0.2, name="drop")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(1, name="out")(x)
    path = tmp_path / "augment.keras"
    keras.Model(inputs, outputs, name="augment").save(path)
    doc, _ = check(path)
    fit = {layer["path"]: layer["in_fit"]["trains_weights"] for layer in doc["layers"]}
    assert [fit[p] for p in ("flip", "rotate", "noise", "drop", "conv")] == [
        None,
        None,
        None,
        None,
        True,
    ]


def _deep_model(keras):
    """Functional > Sequential > Functional > BN (depth 3), with call-site training=False on
    the innermost sub-model and on a top-level BN."""
    inner_in = keras.Input((4,), name="inner_in")
    h = keras.layers.Dense(4, name="inner_dense")(inner_in)
    h = keras.layers.BatchNormalization(name="deep_bn")(h)
    inner = keras.Model(inner_in, h, name="inner")
    middle = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.BatchNormalization(name="mid_bn"),
            inner,
            keras.layers.BatchNormalization(name="mid_bn_frozen"),
        ],
        name="middle",
    )
    outer_in = keras.Input((4,), name="outer_in")
    x = keras.layers.BatchNormalization(name="top_bn")(outer_in, training=False)
    x = middle(x)
    outer = keras.Model(outer_in, x, name="outer")
    inputs = keras.Input((4,), name="x")
    y = outer(inputs, training=False)
    outputs = keras.layers.Dense(1, name="head")(y)
    model = keras.Model(inputs, outputs, name="deep")
    middle.get_layer("mid_bn_frozen").trainable = False
    outer.trainable = False
    outer.get_layer("middle").get_layer("inner").get_layer("deep_bn").trainable = True
    return model


def test_nested_three_deep_with_call_site_training(tmp_path):
    keras = _keras()
    path = tmp_path / "deep.keras"
    _deep_model(keras).save(path)
    doc, truth = check(path)
    assert truth["outer/middle/inner/deep_bn"].moving_stats is True
    assert truth["outer/top_bn"].moving_stats is False  # frozen by outer.trainable=False
    depths = {layer["path"]: layer["depth"] for layer in doc["layers"]}
    assert depths["outer/middle/inner/deep_bn"] == 3


def test_eager_and_graph_fit_agree(tmp_path):
    """keras_truth runs the step eagerly for speed; the traced graph moves the same things."""
    keras = _keras()
    path = tmp_path / "deep.keras"
    _deep_model(keras).save(path)
    assert measure_fit_step(load(path), run_eagerly=False) == measure_fit_step(load(path))


def test_bn_variants(tmp_path):
    """scale/center off, batch renormalization, synchronized=True: all BN, each measured."""
    keras = _keras()
    inputs = keras.Input((4,), name="x")
    h = keras.layers.BatchNormalization(name="bn_bare", scale=False, center=False)(inputs)
    h = keras.layers.BatchNormalization(name="bn_bare_frozen", scale=False, center=False)(h)
    h = keras.layers.BatchNormalization(name="bn_beta_only", scale=False)(h)
    h = keras.layers.BatchNormalization(name="bn_gamma_only", center=False)(h)
    h = keras.layers.BatchNormalization(name="bn_renorm", renorm=True)(h)
    h = keras.layers.BatchNormalization(name="bn_sync", synchronized=True)(h)
    h = keras.layers.LayerNormalization(name="ln")(h)
    h = keras.layers.GroupNormalization(groups=2, name="gn")(h)
    outputs = keras.layers.Dense(2, name="out")(h)
    model = keras.Model(inputs, outputs, name="variants")
    model.get_layer("bn_bare_frozen").trainable = False
    path = tmp_path / "variants.keras"
    model.save(path)
    doc, _ = check(path)
    by_path = {layer["path"]: layer for layer in doc["layers"]}
    assert by_path["bn_bare"]["in_fit"]["trains_weights"] is False
    assert by_path["bn_bare"]["in_fit"]["updates_moving_stats"] is True
    assert not by_path["ln"]["is_batchnorm"] and not by_path["gn"]["is_batchnorm"]


def _nested_h5_model(keras):
    sub = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, name="d1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.BatchNormalization(name="bn2"),
        ],
        name="sub",
    )
    inputs = keras.Input((4,), name="x")
    outputs = keras.layers.BatchNormalization(name="bn_top")(sub(inputs))
    return keras.Model(inputs, outputs, name="nested_h5"), sub


def test_legacy_h5_nested_mixed_flags(tmp_path):
    keras = _keras()
    model, sub = _nested_h5_model(keras)
    sub.get_layer("bn1").trainable = False
    sub.get_layer("d1").trainable = False
    path = tmp_path / "nested.h5"
    model.save(path)
    doc, truth = check(path)
    assert doc["model"]["format"] == "h5"
    assert truth["sub/bn2"].moving_stats and not truth["sub/bn1"].moving_stats


@pytest.mark.xfail(raises=ValueError, strict=True, reason="Keras 3.15 cannot load it")
def test_keras_cannot_load_its_own_h5_with_a_trainable_bn_under_a_frozen_sub_model(tmp_path):
    """A fact about Keras, pinned so a fix shows up: with sub.trainable=False then
    bn2.trainable=True, a legacy .h5 saves sub's weights in an order its loader does not
    expect ("Shape mismatch in layer #0 (named sub)"). inspect still reads the file."""
    keras = _keras()
    model, sub = _nested_h5_model(keras)
    sub.trainable = False
    sub.get_layer("bn2").trainable = True
    path = tmp_path / "nested.h5"
    model.save(path)
    assert predicted(path)["summary"]["bn_training_in_fit"] == 2
    load(path)
