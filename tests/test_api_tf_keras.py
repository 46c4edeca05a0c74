"""The Python API (bnfreeze.api) on in-memory tf_keras (Keras 2) models.

Truth comes from tf_keras: each test trains a real ``fit()`` step and looks at which variables
moved; the predictions (``bnfreeze.inspect``, the tf_keras rule set for a model in memory) and
the RecompileWarning's claims must agree with it. The models are tiny and built per test
(training changes them); tf_keras itself is shared (``tfk``, module scope).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import bnfreeze
from bnfreeze.errors import BnfreezeError
from bnfreeze.model import modes
from bnfreeze.model.records import Normalization, Runtime
from bnfreeze.ops import request as file_edit
from bnfreeze.runtime import live as keras_live
from bnfreeze.runtime import saving

pytestmark = pytest.mark.keras

RNG = np.random.default_rng(7)
X = RNG.normal(5.0, 2.0, (16, 4)).astype("float32")
Y = RNG.normal(size=(16, 1)).astype("float32")
IGNORED = "fit() ignores this change"


@pytest.fixture(scope="module")
def tfk():
    """tf_keras, imported quietly as bnfreeze would import it."""
    pytest.importorskip("tf_keras")
    from bnfreeze.runtime import environment

    return environment.keras_module(Runtime.TF_KERAS)


# ------------------------------------------------------------------------------ helpers


def sub_model(tfk, name: str = "sub"):
    """Dense "sd" -> BatchNormalization "sbn"."""
    inputs = tfk.Input((4,))
    y = tfk.layers.BatchNormalization(name="sbn")(tfk.layers.Dense(4, name="sd")(inputs))
    return tfk.Model(inputs, y, name=name)


def nested(tfk, *, sub_training=None):
    """x -> Dense "d" -> BN "bn" -> sub(training=sub_training) -> Dense "o"."""
    tfk.utils.set_random_seed(7)
    inputs = tfk.Input((4,), name="x")
    h = tfk.layers.BatchNormalization(name="bn")(tfk.layers.Dense(4, name="d")(inputs))
    h = sub_model(tfk)(h, training=sub_training)
    return tfk.Model(inputs, tfk.layers.Dense(1, name="o")(h), name="outer")


def small(tfk):
    """x -> Dense "d" -> BN "bn" -> Dense "o"."""
    tfk.utils.set_random_seed(7)
    inputs = tfk.Input((4,), name="x")
    h = tfk.layers.BatchNormalization(name="bn")(tfk.layers.Dense(4, name="d")(inputs))
    return tfk.Model(inputs, tfk.layers.Dense(1, name="o")(h), name="small")


def compile_(tfk, model, lr: float = 1e-2):
    model.compile(optimizer=tfk.optimizers.Adam(lr), loss="mse")
    return model


def step(model) -> dict[str, set[str]]:
    """One real fit() epoch (one batch); which variables of which layer moved:
    ``{path: {"gamma", "moving_mean", "kernel", ...}}``."""
    layers = keras_live.live_layers(model)
    before = saving.values_by_path(layers)
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    after = saving.values_by_path(layers)
    moved: dict[str, set[str]] = {}
    for key, value in before.items():
        if not np.array_equal(value, after[key]):
            path, _, name = key.split(":", 2)
            moved.setdefault(path, set()).add(name.rsplit("/", 1)[-1].split(":")[0])
    return moved


def measured(moved: dict[str, set[str]], report) -> dict[str, tuple[bool, bool | None]]:
    """Per layer with weights: (its trainable weights moved, its BN statistics moved)."""
    out = {}
    for state in report.layers:
        if not state.has_weights:
            continue
        names = moved.get(state.layer.path, set())
        if state.layer.is_batchnorm:
            out[state.layer.path] = (
                bool(names & {"gamma", "beta"}),
                bool(names & {"moving_mean", "moving_variance"}),
            )
        else:
            out[state.layer.path] = (bool(names), None)
    return out


def predicted(states) -> dict[str, tuple[bool, bool | None]]:
    return {
        s.layer.path: (
            bool(s.in_fit.trains_weights),
            s.in_fit.updates_moving_stats if s.layer.is_batchnorm else None,
        )
        for s in states
        if s.has_weights
    }


def recompile_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, bnfreeze.RecompileWarning)]


# ------------------------------------------------------------------------------ inspect


def test_inspect_call_site_training_false_matches_a_measured_step(tfk):
    """A sub-model called with training=False: tf_keras honours it in fit() (its BN keeps
    its moving statistics, its gamma/beta still train). Keras 3's rules would say otherwise."""
    model = compile_(tfk, nested(tfk, sub_training=False))
    report = bnfreeze.inspect(model)
    assert report.runtime is Runtime.TF_KERAS
    assert report.model.format.value == "memory"
    sbn = next(s for s in report.layers if s.layer.path == "sub/sbn")
    assert sbn.in_fit.normalizes_with is Normalization.MOVING
    truth = measured(step(model), report)
    assert truth["sub/sbn"] == (True, False)  # what tf_keras did
    assert truth["bn"] == (True, True)
    assert predicted(report.layers) == truth
    keras3 = modes.resolve(
        tuple(s.layer for s in report.layers),
        model_trainable=report.model_trainable,
        has_weights={s.layer.path: s.has_weights for s in report.layers},
        runtime=Runtime.KERAS3,
    )
    assert predicted(keras3) != truth


def test_inspect_refuses_another_runtime_for_a_live_model(tfk):
    model = small(tfk)
    with pytest.raises(BnfreezeError, match=r"is a tf-keras model in memory"):
        bnfreeze.inspect(model, runtime=Runtime.KERAS3)
    assert bnfreeze.inspect(model, runtime=Runtime.TF_KERAS).runtime is Runtime.TF_KERAS


def test_frozen_container_with_trainable_bn_in_memory(tfk):
    """freeze the sub-model, then unfreeze its BN: on tf_keras in memory the frozen container
    still freezes gamma/beta, while the BN runs in training mode (its statistics move)."""
    model = nested(tfk)
    bnfreeze.freeze(model, layers=["sub"])
    bnfreeze.unfreeze(model, layers=["sub/sbn"])
    sub = model.get_layer("sub")
    assert sub.trainable is False and sub.get_layer("sbn").trainable is True
    report = bnfreeze.inspect(compile_(tfk, model))
    sbn = next(s for s in report.layers if s.layer.path == "sub/sbn")
    assert (sbn.in_fit.trains_weights, sbn.in_fit.updates_moving_stats) == (False, True)
    truth = measured(step(model), report)
    assert truth["sub/sbn"] == (False, True)
    assert truth["sub/sd"] == (False, None)
    assert predicted(report.layers) == truth


# ------------------------------------------------------------------------------ editing


def test_freeze_bn_inference_then_a_measured_step(tfk):
    model = nested(tfk)
    result = bnfreeze.freeze(model, bn_inference=True)
    assert isinstance(result, file_edit.EditResult)
    assert [(c.path, c.before, c.after) for c in result.changes] == [
        ("bn", True, False),
        ("sub/sbn", True, False),
    ]
    assert result.report.runtime is Runtime.TF_KERAS
    assert result.warnings == ()  # not compiled: nothing to recompile
    moved = step(compile_(tfk, model))
    stats = {p for p, names in moved.items() if names & {"moving_mean", "moving_variance"}}
    assert stats == set()
    assert {"d", "sub/sd", "o"} <= set(moved)
    assert predicted(result.report.layers) == measured(moved, result.report)


def test_output_is_refused_for_tf_keras(tfk, tmp_path):
    model = small(tfk)
    with pytest.raises(BnfreezeError, match="tf_keras"):
        bnfreeze.freeze(model, bn_inference=True, output=tmp_path / "out.keras")
    assert model.get_layer("bn").trainable is True
    assert list(tmp_path.iterdir()) == []


def test_not_a_model_is_a_type_error(tfk):
    with pytest.raises(TypeError, match=r"tf_keras\.Model"):
        bnfreeze.inspect(tfk.layers.Dense(3))


# ------------------------------------------------------------------------------ recompile


def test_compiled_change_is_ignored_until_recompile(tfk):
    """Compiled, before the first fit(): the warning says fit() ignores the change, and a
    measured step agrees; after that fit() it is ignored again; recompile() makes it count."""
    model = compile_(tfk, small(tfk))
    texts = recompile_warnings(lambda: bnfreeze.freeze(model, layers=["d"]))
    assert len(texts) == 1 and IGNORED in texts[0] and "already been trained" not in texts[0]
    assert "tf_keras" in texts[0] and "bnfreeze.recompile(model)" in texts[0]
    assert "d" in step(model)  # ignored, as the warning says

    result = None

    def freeze_o():
        nonlocal result
        result = bnfreeze.freeze(model, layers=["o"])

    texts = recompile_warnings(freeze_o)
    assert len(texts) == 1 and IGNORED in texts[0] and "already been trained" in texts[0]
    assert result.optimizer_variables == len(model.optimizer.variables) > 1  # built by fit()
    assert [f.code.value for f in result.warnings] == ["recompile-required"]
    assert {"d", "o"} <= set(step(model))  # still ignored after fit()

    optimizer = model.optimizer
    assert bnfreeze.recompile(model) is model
    assert model.optimizer is not optimizer
    assert type(model.optimizer) is type(optimizer)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-2)
    assert set(step(model)) == {"bn"}  # both changes in effect: only BN still trains


def test_recompile_after_unfreeze_trains_the_unfrozen_layer(tfk):
    model = small(tfk)
    model.get_layer("d").trainable = False
    compile_(tfk, model)
    assert "d" not in step(model)
    texts = recompile_warnings(lambda: bnfreeze.unfreeze(model, layers=["d"]))
    assert len(texts) == 1 and IGNORED in texts[0]
    assert "d" not in step(model)  # ignored: no error, d stays frozen in fit()
    bnfreeze.recompile(model)
    assert "d" in step(model)


def test_compiled_bn_inference_is_ignored_until_recompile(tfk):
    """The warning's "BatchNormalization's mode alike": a BN frozen after compile() still
    moves its statistics in fit(); after recompile() it does not."""
    model = compile_(tfk, small(tfk))
    texts = recompile_warnings(lambda: bnfreeze.freeze(model, bn_inference=True))
    assert len(texts) == 1 and "BatchNormalization's mode" in texts[0]
    assert step(model)["bn"] >= {"moving_mean", "gamma"}
    bnfreeze.recompile(model)
    assert "bn" not in step(model)


def test_recompile_refuses_an_uncompiled_tf_keras_model(tfk):
    with pytest.raises(BnfreezeError, match="not compiled"):
        bnfreeze.recompile(small(tfk))
