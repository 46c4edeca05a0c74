"""Measuring the branch each BatchNormalization layer took in a real training step
(:mod:`bnfreeze.runtime.branches`), and ``verify`` / ``explain`` using it.

The case that separates the branch from the statistics: ``BatchNormalization(momentum=1.0)``
normalizes with the batch's statistics in ``fit()`` (its gamma/beta train) while its moving
statistics stay bit-identical. Reading the mode off the statistics says "inference"; the
branch says "training", which is what ``inspect`` predicts. Each backend runs in its own
process.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import warm
from click.testing import CliRunner
from paths import ROOT

from bnfreeze.cli import cli

pytestmark = pytest.mark.keras

ENV = {"COLUMNS": "100", "NO_COLOR": "1", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}

#: A conv net with a momentum-1 BN, a default BN, and a frozen BN; saved compiled with SGD.
BUILD = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=1.0, name="bn_still")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.BatchNormalization(name="bn_frozen")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("bn_frozen").trainable = False
    model.save(sys.argv[1])
    """
)

VERIFY_JAX = textwrap.dedent(
    """
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "jax"
    from bnfreeze.render.verify import verify_dict
    from bnfreeze.runtime.verify import verify_file
    report = verify_file(sys.argv[1])
    print(json.dumps(verify_dict(report)))
    """
)


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def momentum_one(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("branches") / "momentum_one.keras"
    warm.run(
        [sys.executable, "-c", BUILD, str(path)],
        check=True,
        capture_output=True,
        env=_env("tensorflow"),
    )
    return path


def _layers(doc: dict) -> dict[str, dict]:
    return {layer["path"]: layer for layer in doc["layers"]}


def _assert_branch_not_statistics(doc: dict) -> None:
    layers = _layers(doc)
    still = layers["bn_still"]
    # Measured by Keras: gamma/beta trained, the statistics did not move...
    assert still["gamma_beta"] == "moved"
    assert still["moving_stats"] == "unchanged"
    # ...and the call took the batch branch: training mode, as inspect predicts, and inspect
    # knows that momentum=1.0 leaves the statistics where they are.
    assert still["branch_recorded"] is True
    assert still["normalizes_with"] == "batch"
    assert still["predicted"]["updates_moving_stats"] is False
    assert layers["bn"]["normalizes_with"] == "batch"
    assert layers["bn"]["moving_stats"] == "moved"
    assert layers["bn_frozen"]["normalizes_with"] == "moving"
    assert layers["bn_frozen"]["moving_stats"] == "unchanged"
    assert doc["disagreements"] == []
    assert doc["summary"]["agree"] is True
    assert doc["summary"]["bn_training"] == 2
    assert doc["summary"]["bn_inference"] == 1
    assert doc["summary"]["bn_stats_moved"] == 1


def test_verify_measures_the_branch_on_tensorflow(momentum_one):
    result = CliRunner().invoke(
        cli, ["verify", str(momentum_one), "--json"], env=ENV, catch_exceptions=False
    )
    assert result.exit_code == 0, result.stderr
    _assert_branch_not_statistics(json.loads(result.stdout))


def test_verify_measures_the_branch_on_jax(momentum_one):
    """On JAX, train_on_batch first calls every layer with training=False on symbolic
    tensors to build the model; that pass is not the step and is not recorded."""
    pytest.importorskip("jax")
    done = warm.run(
        [sys.executable, "-c", VERIFY_JAX, str(momentum_one)],
        capture_output=True,
        text=True,
        env=_env("jax"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["runtime"]["backend"] == "jax"
    _assert_branch_not_statistics(doc)


def test_verify_view_says_training_mode_for_momentum_one(momentum_one):
    result = CliRunner().invoke(cli, ["verify", str(momentum_one)], env=ENV, catch_exceptions=False)
    assert result.exit_code == 0, result.stdout
    assert "AGREE" in result.stdout
    assert "3 BN layers: 2 in training mode, 1 in inference mode; 1 moved" in result.stdout


def test_the_recorder_restores_call_and_skips_symbolic_calls():
    import keras
    import numpy as np

    from bnfreeze.model.records import Normalization
    from bnfreeze.runtime.branches import BranchRecorder

    layer = keras.layers.BatchNormalization()
    layer.build((None, 3))
    recorder = BranchRecorder({"bn": layer})
    with recorder.active():
        assert "call" in vars(layer)
        keras.ops.convert_to_numpy(layer(np.ones((2, 3), "float32"), training=True))
        keras.ops.convert_to_numpy(layer(np.ones((2, 3), "float32"), training=False))
        layer(keras.KerasTensor((2, 3)), training=True)  # symbolic: not a step
    assert "call" not in vars(layer)
    branch = recorder.branches()["bn"]
    assert (branch.batch, branch.moving, branch.unknown) == (1, 1, 0)
    assert branch.normalizes_with is Normalization.BATCH
    layer.trainable = False
    recorder.reset()
    with recorder.active():
        layer(np.ones((2, 3), "float32"), training=True)
    assert recorder.branches()["bn"].normalizes_with is Normalization.MOVING
