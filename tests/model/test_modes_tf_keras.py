"""Measured truth for the tf_keras rule set (``modes.TfKerasRules``): ``verify --runtime
tf-keras`` builds its prediction from the file with the tf_keras rules and measures a real
training step with tf_keras; every case here must AGREE. The models are built, saved as
``.h5`` and (for ``predict()`` and in-memory truth) measured by tf_keras itself in ONE
subprocess per module. The rules are never re-derived here: the expected values are what
tf_keras did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import warm
from click.testing import CliRunner

from bnfreeze.cli import cli
from bnfreeze.model import modes
from bnfreeze.model.records import Normalization, Runtime
from bnfreeze.model.walk import walk
from bnfreeze.ops.inspect import inspect_file

pytestmark = pytest.mark.keras

ENV = {"COLUMNS": "100", "NO_COLOR": "1", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}

#: Builds every case with tf_keras, saves it to ``<dir>/<case>.h5``, then measures in the same
#: process what tf_keras does after loading that file: the top-level flag it restores, and
#: which BN statistics ``predict()`` moves. The in-memory cases (``memory_*``) are trained one
#: ``fit()`` step without saving. Everything measured goes to ``<dir>/truth.json``.
BUILD = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tf_keras as keras

L = keras.layers
out = sys.argv[1]
rng = np.random.default_rng(0)
X = (rng.standard_normal((8, 4)) * 2 + 5).astype("float32")
Y = rng.standard_normal((8, 1)).astype("float32")


def bns(model, prefix=""):
    found = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.update(bns(layer, prefix + layer.name + "/"))
        elif isinstance(layer, L.BatchNormalization):
            found[prefix + layer.name] = layer
    return found


def changed(before, layer, names):
    return any(not np.array_equal(before[n], getattr(layer, n).numpy()) for n in names)


def snapshot(found):
    return {p: {n: getattr(l, n).numpy().copy() for n in
                ("gamma", "beta", "moving_mean", "moving_variance")} for p, l in found.items()}


def sub(name="sub", training=None):
    i = keras.Input((4,))
    y = L.Dense(4, name="sd")(i)
    y = L.BatchNormalization(name="sbn1")(y, training=training)
    y = L.BatchNormalization(name="sbn2")(y)
    return keras.Model(i, y, name=name)


def functional(body):
    i = keras.Input((4,))
    return keras.Model(i, L.Dense(1, name="head")(body(i)), name="model")


def bn_call_false(i):
    return L.BatchNormalization(name="bn")(L.Dense(4, name="dense")(i), training=False)


def sub_call_false(i):
    return sub()(i, training=False)


def frozen_sub_bn_unfrozen(i):
    s = sub()
    s.trainable = False
    s.get_layer("sbn1").trainable = True
    return s(i)


def bn_frozen(i):
    bn = L.BatchNormalization(name="bn")
    bn.trainable = False
    return bn(L.Dense(4, name="dense")(i))


def plain(i):
    return L.BatchNormalization(name="bn")(L.Dense(4, name="dense")(i))


def shared_bn_two_calls(i):
    bn = L.BatchNormalization(name="bn")
    a = bn(L.Dense(4, name="d1")(i), training=False)
    b = bn(L.Dense(4, name="d2")(i))
    return L.Add(name="add")([a, b])


def inner_true_outer_false(i):
    return sub(training=True)(i, training=False)


def sequential(unfreeze_bn):
    m = keras.Sequential([keras.Input((4,)), L.Dense(4, name="dense"),
                          L.BatchNormalization(name="bn"), L.Dense(1, name="head")],
                         name="model")
    m.trainable = False
    if unfreeze_bn:
        m.get_layer("bn").trainable = True
    return m


def frozen_model(unfreeze_bn):
    m = functional(plain)
    m.trainable = False
    if unfreeze_bn:
        m.get_layer("bn").trainable = True
    return m


def wrapper_frozen_bn_unfrozen():
    i = keras.Input((3, 4))
    wrapper = L.TimeDistributed(L.BatchNormalization(name="bn"), name="td")
    wrapper.trainable = False
    wrapper.layer.trainable = True
    return keras.Model(i, L.Dense(1, name="head")(wrapper(L.Dense(4, name="dense")(i))),
                       name="model")


cases = {
    "bn_call_false": functional(bn_call_false),
    "sub_call_false": functional(sub_call_false),
    "frozen_sub_bn_unfrozen": functional(frozen_sub_bn_unfrozen),
    "bn_frozen": functional(bn_frozen),
    "functional_frozen": frozen_model(False),
    "functional_frozen_bn_unfrozen": frozen_model(True),
    "sequential_frozen": sequential(False),
    "sequential_frozen_bn_unfrozen": sequential(True),
    "shared_bn_two_calls": functional(shared_bn_two_calls),
    "inner_true_outer_false": functional(inner_true_outer_false),
    "wrapper_frozen_bn_unfrozen": wrapper_frozen_bn_unfrozen(),
}
truth = {"files": {}, "memory": {}}
for name, model in cases.items():
    path = os.path.join(out, name + ".h5")
    model.save(path)
    if name in ("sub_call_false", "frozen_sub_bn_unfrozen"):
        model.save(os.path.join(out, name + ".keras"))  # tf_keras's own zip format
    loaded = keras.models.load_model(path, compile=False)
    found = bns(loaded)
    if name.startswith("wrapper"):
        found = {"td/bn": loaded.get_layer("td").layer}
    before = snapshot(found)
    loaded.predict(X[:, None, :].repeat(3, axis=1) if name.startswith("wrapper") else X,
                   verbose=0)
    truth["files"][name] = {
        "loaded_trainable": bool(loaded.trainable),
        "predict_stats_moved": {p: changed(before[p], l, ("moving_mean", "moving_variance"))
                                for p, l in found.items()},
    }

# In memory, no file: the live flags, with tf_keras's hierarchical trainability.
for name, model in {"memory_frozen_sub_bn_unfrozen": functional(frozen_sub_bn_unfrozen),
                    "memory_functional_frozen_bn_unfrozen": frozen_model(True)}.items():
    config = json.loads(model.to_json())
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    found = bns(model)
    before = snapshot(found)
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    truth["memory"][name] = {
        "config": config,
        "model_trainable": bool(model.trainable),
        "bn": {p: {"stats": changed(before[p], l, ("moving_mean", "moving_variance")),
                   "gamma_beta": changed(before[p], l, ("gamma", "beta"))}
               for p, l in found.items()},
    }
with open(os.path.join(out, "truth.json"), "w") as f:
    json.dump(truth, f)
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    pytest.importorskip("tf_keras")
    folder = tmp_path_factory.mktemp("tf_keras_cases")
    result = warm.run(
        [sys.executable, "-c", BUILD, str(folder)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def truth(built) -> dict[str, Any]:
    return json.loads((built / "truth.json").read_text())


_RUNS: dict[str, dict[str, Any]] = {}


@pytest.fixture()
def run(built):
    """``verify --runtime tf-keras --json`` on a case, once per case per module."""

    def go(case: str) -> dict[str, Any]:
        if case not in _RUNS:
            name = case if "." in case else f"{case}.h5"
            result = CliRunner().invoke(
                cli,
                ["verify", str(built / name), "--runtime", "tf-keras", "--json"],
                env=ENV,
                catch_exceptions=False,
            )
            doc = json.loads(result.stdout)
            doc["exit_code"] = result.exit_code
            doc["stderr"] = result.stderr
            _RUNS[case] = doc
        return _RUNS[case]

    return go


def layer(doc: dict[str, Any], path: str) -> dict[str, Any]:
    return next(entry for entry in doc["layers"] if entry["path"] == path)


def assert_agrees(doc: dict[str, Any]) -> None:
    assert doc["runtime"]["name"] == "tf-keras"
    assert doc["runtime"]["keras_version"].startswith("2.")
    assert doc["summary"]["compared"] is True
    assert doc["summary"]["checks"] > 0
    assert doc["disagreements"] == [], doc["disagreements"]
    assert doc["summary"]["agree"] is True
    assert doc["exit_code"] == 0, doc["stderr"]


CASES = {
    # case: {BN path: (moving stats measured, gamma/beta measured)}
    "bn_call_false": {"bn": ("unchanged", "moved")},
    "sub_call_false": {"sub/sbn1": ("unchanged", "moved"), "sub/sbn2": ("unchanged", "moved")},
    # tf_keras's load_model drops the sub-model's own trainable=False, so the BN set trainable
    # after freezing trains gamma/beta too once loaded from the file (in memory it would not:
    # test_in_memory_frozen_ancestor_freezes_gamma_beta).
    "frozen_sub_bn_unfrozen": {
        "sub/sbn1": ("moved", "moved"),
        "sub/sbn2": ("unchanged", "unchanged"),
    },
    "bn_frozen": {"bn": ("unchanged", "unchanged")},
    "functional_frozen": {"bn": ("unchanged", "unchanged")},
    "functional_frozen_bn_unfrozen": {"bn": ("moved", "moved")},
    "sequential_frozen": {"bn": ("unchanged", "unchanged")},
    "sequential_frozen_bn_unfrozen": {"bn": ("moved", "moved")},
    "shared_bn_two_calls": {"bn": ("moved", "moved")},
    "inner_true_outer_false": {"sub/sbn1": ("moved", "moved"), "sub/sbn2": ("unchanged", "moved")},
    # A wrapper keeps its own trainable=False through load_model, and freezes the BN inside
    # it although that BN's own flag is True: the hierarchical rule, in a file.
    "wrapper_frozen_bn_unfrozen": {"td/bn": ("moved", "unchanged")},
}
#: The same cases saved in tf_keras's own ``.keras`` zip: the same rules, the same verdicts.
KERAS_ZIP = {f"{case}.keras": CASES[case] for case in ("sub_call_false", "frozen_sub_bn_unfrozen")}


@pytest.mark.parametrize("case", sorted(CASES) + sorted(KERAS_ZIP))
def test_prediction_and_measurement_agree(run, case):
    doc = run(case)
    assert_agrees(doc)
    for path, (stats, gamma_beta) in {**CASES, **KERAS_ZIP}[case].items():
        entry = layer(doc, path)
        assert (entry["moving_stats"], entry["gamma_beta"]) == (stats, gamma_beta), path
        assert entry["predicted"]["updates_moving_stats"] is (stats == "moved"), path
        assert entry["predicted"]["trains_weights"] is (gamma_beta == "moved"), path


@pytest.mark.parametrize("case", ["bn_call_false", "sub_call_false", "inner_true_outer_false"])
def test_tf_keras_prediction_differs_from_keras3(built, run, case):
    """A recorded call-site training=False wins on tf_keras, not on Keras 3: the same file
    gets two predictions, and the tf_keras one is the one the measurement confirms."""
    doc = run(case)
    path = built / f"{case}.h5"
    keras3 = {s.layer.path: s.in_fit for s in inspect_file(path, Runtime.KERAS3).batchnorm}
    tf_keras = {s.layer.path: s.in_fit for s in inspect_file(path, Runtime.TF_KERAS).batchnorm}
    differs = [p for p in tf_keras if tf_keras[p] != keras3[p]]
    assert differs
    for p in differs:
        assert keras3[p].updates_moving_stats is True
        assert tf_keras[p].updates_moving_stats is (layer(doc, p)["moving_stats"] == "moved")


def test_two_call_sites_both_ways_has_no_single_mode(built):
    """Called once with training=False and once without, the BN's statistics move (measured
    above) but no one normalization mode describes it."""
    state = inspect_file(built / "shared_bn_two_calls.h5", Runtime.TF_KERAS).state("bn")
    assert state.in_fit.updates_moving_stats is True
    assert state.in_fit.normalizes_with is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_loaded_model_trainable(built, truth, case):
    report = inspect_file(built / f"{case}.h5", Runtime.TF_KERAS)
    assert report.model_trainable is truth["files"][case]["loaded_trainable"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_predict(built, truth, case):
    """predict(): nothing trains; a BN's statistics move only where a recorded training=True
    reaches it (measured: inner_true_outer_false)."""
    report = inspect_file(built / f"{case}.h5", Runtime.TF_KERAS)
    moved = truth["files"][case]["predict_stats_moved"]
    assert moved  # every case has a BN
    for path, did in moved.items():
        behaviour = report.state(path).in_predict
        assert behaviour.updates_moving_stats is did, path
        assert behaviour.trains_weights is False
        assert behaviour.normalizes_with is (Normalization.BATCH if did else Normalization.MOVING)
    if case == "inner_true_outer_false":
        assert moved == {"sub/sbn1": True, "sub/sbn2": False}


@pytest.mark.parametrize(
    "case", ["memory_frozen_sub_bn_unfrozen", "memory_functional_frozen_bn_unfrozen"]
)
def test_in_memory_frozen_ancestor_freezes_gamma_beta(truth, case):
    """Rule 3 (docs/semantics.md) on a live tf_keras model (its live config, loaded=False): a
    frozen ancestor or a frozen model freezes gamma/beta, yet a BN whose own flag is True
    moves its stats."""
    live = truth["memory"][case]
    walked = walk(live["config"])
    states = modes.resolve(
        walked.layers,
        model_trainable=live["model_trainable"],
        has_weights={r.path: modes.has_weights_by_class(r) for r in walked.layers},
        runtime=Runtime.TF_KERAS,
    )
    by_path = {s.layer.path: s.in_fit for s in states}
    unfrozen = "sub/sbn1" if "sub" in case else "bn"
    assert live["bn"][unfrozen] == {"stats": True, "gamma_beta": False}
    for path, did in live["bn"].items():
        assert by_path[path].updates_moving_stats is did["stats"], path
        assert by_path[path].trains_weights is did["gamma_beta"], path
