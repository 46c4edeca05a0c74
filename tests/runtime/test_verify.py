"""``bnfreeze verify``: a real training step, measured, against inspect's prediction.

The acceptance cases of issue 5: the Keras guide's phase 2 (call-site ``training=False``
ignored by Keras 3, which inspect predicts and verify measures), the ``--bn-inference`` recipe
(zero BN movement), disagreements on purpose, unsafe and bad input, and the JSON contract.

Golden views live in ``tests/golden/verify/``; regenerate after an intended change with
``BNFREEZE_REGEN_GOLDEN=1 pytest tests/runtime/test_verify.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from pathlib import Path

import golden_files
import json_schemas
import pytest
from click.testing import CliRunner
from paths import GOLDEN as GOLDEN_ROOT
from paths import ROOT

from bnfreeze.cli import cli
from bnfreeze.model.expectations import parse_expectation
from bnfreeze.model.measured import (
    Aspect,
    CompileSource,
    DataSource,
    Disagreement,
    LayerMeasurement,
    Movement,
    RuntimeInfo,
    TrainingSetup,
)
from bnfreeze.model.records import Normalization, Runtime
from bnfreeze.ops.inspect import inspect_file
from bnfreeze.runtime.compare import compare

pytestmark = pytest.mark.keras

GOLDEN = GOLDEN_ROOT / "verify"
ENV = {"COLUMNS": "100", "NO_COLOR": "1", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}


def invoke(*args: str):
    return CliRunner().invoke(cli, ["verify", *map(str, args)], env=ENV, catch_exceptions=False)


def verify_json(*args: str) -> tuple[int, dict, str]:
    result = invoke(*args, "--json")
    return result.exit_code, json.loads(result.stdout), result.stderr


def fingerprint(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# --------------------------------------------------------------------------- acceptance (a)


@pytest.fixture(scope="module")
def phase2(guide_phase2_keras):
    """One verify run of the guide's phase 2, with the file's bytes and mtime around it."""
    before = fingerprint(guide_phase2_keras)
    code, doc, stderr = verify_json(guide_phase2_keras)
    return {
        "code": code,
        "doc": doc,
        "stderr": stderr,
        "before": before,
        "after": fingerprint(guide_phase2_keras),
        "path": guide_phase2_keras,
    }


def test_phase2_prediction_and_measurement_agree(phase2):
    doc = phase2["doc"]
    assert phase2["code"] == 0
    assert doc["summary"]["agree"] is True
    assert doc["disagreements"] == []
    assert doc["summary"]["checks"] > 100


def test_phase2_reports_the_bn_layers_whose_stats_move_as_inspect_predicted(phase2):
    doc = phase2["doc"]
    report = inspect_file(phase2["path"])
    predicted = {s.layer.path for s in report.batchnorm if s.in_fit.updates_moving_stats}
    measured = {
        layer["path"]
        for layer in doc["layers"]
        if layer["is_batchnorm"] and layer["moving_stats"] == "moved"
    }
    bn_paths = {layer["path"] for layer in doc["layers"] if layer["is_batchnorm"]}
    assert len(bn_paths) == 52  # MobileNetV2 alpha 0.35 has 52 BN layers
    assert measured == predicted == bn_paths
    assert doc["summary"]["bn_stats_moved"] == 52
    assert all(
        layer["normalizes_with"] == "batch" for layer in doc["layers"] if layer["is_batchnorm"]
    )


def test_phase2_both_differ_from_the_naive_reading(phase2):
    """The naive reading: the backbone is called with training=False, so its BN layers run in
    inference mode and their statistics stay put. Keras 3 overrides it in fit()."""
    report = inspect_file(phase2["path"])
    backbone = [s.layer for s in report.layers if s.layer.is_container]
    assert [c.call_training for c in backbone] == [False]
    naive_frozen = {
        s.layer.path for s in report.batchnorm if s.layer.path.startswith(backbone[0].path + "/")
    }
    moved = {layer["path"] for layer in phase2["doc"]["layers"] if layer["moving_stats"] == "moved"}
    assert naive_frozen and naive_frozen <= moved
    assert all(
        layer["predicted"]["updates_moving_stats"]
        for layer in phase2["doc"]["layers"]
        if layer["is_batchnorm"]
    )


def test_phase2_convolutions_train_too(phase2):
    kernels = [layer for layer in phase2["doc"]["layers"] if layer["class_name"] == "Conv2D"]
    assert kernels and all(layer["other_weights"] in ("moved", "zero-update") for layer in kernels)


def test_the_file_is_never_written(phase2):
    assert phase2["after"] == phase2["before"]


def test_progress_and_keras_notes_go_to_stderr_only(phase2):
    assert "bnfreeze: loading Keras (TensorFlow backend)" in phase2["stderr"]
    assert "bnfreeze: training 1 step (batch 2)" in phase2["stderr"]
    assert phase2["doc"]["schema_version"] == 2  # stdout parsed as pure JSON
    json_schemas.validate("verify", phase2["doc"])


def test_phase2_uses_the_models_own_compile_config(phase2):
    run = phase2["doc"]["run"]
    assert run["compile"]["source"] == "model"
    assert run["compile"]["optimizer"].startswith("Adam(")
    assert run["compile"]["loss"] == "mse"
    assert run["data"] == {
        "source": "synthetic",
        "path": None,
        "seed": 0,
        "input_shapes": [[2, 32, 32, 3]],
    }


# --------------------------------------------------------------------------- acceptance (b)


def test_bn_inference_recipe_verifies_with_zero_bn_movement(guide_phase2_bn_inference_keras):
    code, doc, _ = verify_json(guide_phase2_bn_inference_keras, "--expect", "bn-inference")
    assert code == 0
    assert doc["summary"]["batchnorm"] == 52
    assert doc["summary"]["bn_stats_moved"] == 0
    bns = [layer for layer in doc["layers"] if layer["is_batchnorm"]]
    assert {layer["moving_stats"] for layer in bns} == {"unchanged"}
    assert {layer["gamma_beta"] for layer in bns} == {"unchanged"}
    convs = [layer for layer in doc["layers"] if layer["class_name"] == "Conv2D"]
    assert convs and all(layer["other_weights"] != "unchanged" for layer in convs)
    assert doc["expectations"] == [{"expectation": "bn-inference", "holds": True, "failures": []}]
    assert doc["summary"]["agree"] is True


@pytest.mark.parametrize(
    "sample", ["sequential.keras", "bn_under_frozen.keras", "nested_legacy.h5"]
)
def test_a_model_frozen_with_bn_inference_verifies_with_zero_bn_movement(samples, tmp_path, sample):
    """The recipe through bnfreeze's own freeze command, then measured by Keras."""
    out = tmp_path / sample
    frozen = CliRunner().invoke(
        cli,
        ["freeze", str(samples / sample), "--bn-inference", "-o", str(out)],
        env=ENV,
        catch_exceptions=False,
    )
    assert frozen.exit_code == 0, frozen.stderr
    code, doc, _ = verify_json(out, "--expect", "bn-inference")
    assert code == 0
    assert doc["summary"]["batchnorm"] > 0
    assert doc["summary"]["bn_stats_moved"] == 0
    assert doc["summary"]["agree"] is True
    assert any(layer["other_weights"] == "moved" for layer in doc["layers"])  # Dense layers train


# --------------------------------------------------------------------------- samples


def test_sequential_json_document(samples):
    """The whole JSON document for a small sample, compared by equality."""
    path = samples / "sequential.keras"
    code, doc, _ = verify_json(path)
    assert code == 0
    from bnfreeze.runtime import environment

    info = environment.runtime_info()

    def layer(path, class_name, is_bn, stats, gb, other, trains, mode, p_trains, p_stats):
        return {
            "path": path,
            "class_name": class_name,
            "is_batchnorm": is_bn,
            "in_file": True,
            "moving_stats": stats,
            "gamma_beta": gb,
            "other_weights": other,
            "trains_weights": trains,
            "normalizes_with": mode,
            "branch_recorded": is_bn,
            "mode_measured": is_bn,
            "called": True if is_bn else None,
            "predicted": {"trains_weights": p_trains, "updates_moving_stats": p_stats},
        }

    json_schemas.validate("verify", doc)
    assert doc == {
        "schema_version": 2,
        "command": "verify",
        "model": {
            "path": str(path),
            "format": "keras",
            "keras_version": "3.15.1",
            "compiled": False,
            "optimizer_variables": None,
            "keras_hub": None,
        },
        "runtime": {
            "name": "keras3",
            "measured": True,
            "keras_version": info.keras_version,
            "backend": info.backend,
            "tensorflow_version": info.tensorflow_version,
        },
        "run": {
            "steps": 1,
            "batch_size": 2,
            "execution": "eager",
            "data": {"source": "synthetic", "path": None, "seed": 0, "input_shapes": [[2, 6]]},
            "compile": {
                "source": "default",
                "optimizer": "SGD(learning_rate=0.01)",
                "loss": "mse",
                "reason": None,
            },
        },
        "summary": {
            "batchnorm": 2,
            "bn_stats_moved": 1,
            "bn_stats_unchanged": 1,
            "bn_mode_not_measured": 0,
            "bn_training": 1,
            "bn_inference": 1,
            "layers_trained": 4,
            "layers_frozen": 1,
            "compared": True,
            "layers_measured": 5,
            "layers_compared": 5,
            "bn_not_compared": 0,
            "checks": 7,
            "disagreements": 0,
            "agree": True,
            "expectations_hold": True,
        },
        "layers": [
            layer("dense_1", "Dense", False, "none", "none", "moved", True, None, True, None),
            layer(
                "bn_1",
                "BatchNormalization",
                True,
                "moved",
                "moved",
                "none",
                True,
                "batch",
                True,
                True,
            ),
            layer("dense_2", "Dense", False, "none", "none", "moved", True, None, True, None),
            layer(
                "bn_2",
                "BatchNormalization",
                True,
                "unchanged",
                "unchanged",
                "none",
                False,
                "moving",
                False,
                False,
            ),
            layer("out", "Dense", False, "none", "none", "moved", True, None, True, None),
        ],
        "disagreements": [],
        "expectations": [],
        "not_in_file": [],
        "not_measured": [],
        "bn_not_compared": [],
        "bn_not_called": [],
        "notes": [],
    }


@pytest.mark.parametrize(
    ("expect", "code", "failures"),
    [
        ("bn-inference", 1, [{"path": "bn_1", "expected": "inference", "actual": "training"}]),
        ("bn-train", 1, [{"path": "bn_2", "expected": "training", "actual": "inference"}]),
        ("bn-inference=bn_2", 0, []),
        ("trains=dense_*", 0, []),
    ],
)
def test_expect_exit_codes(samples, expect, code, failures):
    exit_code, doc, _ = verify_json(samples / "sequential.keras", "--expect", expect)
    assert exit_code == code
    assert doc["expectations"] == [
        {"expectation": expect, "holds": not failures, "failures": failures}
    ]
    assert doc["summary"]["agree"] is True  # prediction and measurement still agree


def test_expect_failure_is_listed_in_the_table_view(samples):
    result = invoke(samples / "sequential.keras", "--expect", "bn-inference")
    assert result.exit_code == 1
    assert "FAILS  --expect bn-inference: 1 layer measured otherwise" in result.stdout
    assert "\nbn-inference  bn_1   inference  training\n" in result.stdout


def test_expect_glob_that_matches_nothing_fails_before_keras_runs(samples):
    result = invoke(samples / "sequential.keras", "--expect", "bn-train=nope*")
    assert result.exit_code == 2
    assert "nope*" in result.stderr
    assert "loading Keras" not in result.stderr


def test_bn_under_frozen_container_trains_as_predicted(samples):
    """Rule 3 (docs/semantics.md) measured: a trainable BN inside a frozen sub-model trains
    anyway."""
    code, doc, _ = verify_json(samples / "bn_under_frozen.keras")
    assert code == 0
    by_path = {layer["path"]: layer for layer in doc["layers"]}
    assert by_path["backbone/inner_bn"]["moving_stats"] == "moved"
    assert by_path["backbone/inner_bn"]["gamma_beta"] == "moved"
    assert by_path["backbone/inner_dense"]["other_weights"] == "unchanged"
    assert by_path["head"]["other_weights"] == "moved"


def test_nested_legacy_h5_paths(samples):
    code, doc, _ = verify_json(samples / "nested_legacy.h5")
    assert code == 0
    assert [layer["path"] for layer in doc["layers"]] == [
        "bn_bn/bn1",
        "bn_bn/bn2",
        "bn_dense/bn3",
        "bn_dense/d1",
        "head",
    ]
    assert doc["summary"]["bn_stats_moved"] == 3


def test_steps_and_batch_size(samples):
    code, doc, stderr = verify_json(samples / "seed_bn.keras", "--steps", "3", "--batch-size", "5")
    assert code == 0
    assert doc["run"]["steps"] == 3
    assert doc["run"]["data"]["input_shapes"] == [[5, 2, 2, 4]]
    assert "training 3 steps (batch 5)" in stderr


# --------------------------------------------------------------------------- --data


def test_data_file(samples, tmp_path):
    import numpy as np

    data = tmp_path / "batch.npz"
    rng = np.random.default_rng(3)
    np.savez(
        data,
        x=rng.normal(size=(6, 6)).astype("float32"),
        y=rng.normal(size=(6, 1)).astype("float32"),
    )
    code, doc, _ = verify_json(samples / "sequential.keras", "--data", data, "--batch-size", "4")
    assert code == 0
    assert doc["run"]["data"] == {
        "source": "file",
        "path": str(data),
        "seed": None,
        "input_shapes": [[4, 6]],
    }


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": ((5, 7), "float32")}, "input 'x' has shape (5, 7), the model expects (N, 6)"),
        ({"features": ((5, 6), "float32")}, "no inputs found; it holds features"),
    ],
)
def test_data_that_does_not_fit_exit_2(samples, tmp_path, arrays, message):
    import numpy as np

    data = tmp_path / "bad.npz"
    np.savez(data, **{k: np.zeros(shape, dtype) for k, (shape, dtype) in arrays.items()})
    result = invoke(samples / "sequential.keras", "--data", data)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_data_missing_or_not_npz_exit_2(samples, tmp_path):
    result = invoke(samples / "sequential.keras", "--data", tmp_path / "none.npz")
    assert result.exit_code == 2
    assert "none.npz: no such file" in result.stderr
    junk = tmp_path / "junk.npz"
    junk.write_text("not numpy")
    result = invoke(samples / "sequential.keras", "--data", junk)
    assert result.exit_code == 2
    assert "not a readable .npz archive" in result.stderr


# --------------------------------------------------------------------------- acceptance (d)


def test_missing_file_exit_2():
    result = invoke("no/such/model.keras")
    assert result.exit_code == 2
    assert result.stderr == "error: no/such/model.keras: no such file. Check the path.\n"
    assert result.stdout == ""


def test_not_a_model_exit_2(tmp_path):
    path = tmp_path / "notes.keras"
    path.write_text("hello")
    result = invoke(path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}: not a Keras model file")
    assert result.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def lambda_model(tmp_path_factory):
    """A model whose Lambda layer touches a marker file whenever Keras calls it, loading
    included. The marker is removed after saving."""
    import keras

    folder = tmp_path_factory.mktemp("lambda")
    marker = folder / "marker"
    touch = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Lambda(touch, name="touch")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    path = folder / "lambda.keras"
    model.save(path)
    marker.unlink()
    return path, marker


def test_lambda_model_refused_without_unsafe(lambda_model):
    path, marker = lambda_model
    result = invoke(path)
    assert result.exit_code == 2
    assert "--unsafe" in result.stderr
    assert "Python lambda" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_lambda_model_loads_with_unsafe(lambda_model):
    path, marker = lambda_model
    code, doc, _ = verify_json(path, "--unsafe")
    assert code == 0
    assert marker.exists()  # the file's code ran: the user said so
    marker.unlink()
    assert doc["summary"]["bn_stats_moved"] == 1


def test_missing_custom_objects_file_fails_before_tensorflow(samples, tmp_path):
    result = invoke(samples / "seed_bn.keras", "--custom-objects", tmp_path / "missing.py")
    assert result.exit_code == 2
    assert result.stderr == f"error: --custom-objects {tmp_path / 'missing.py'}: no such file.\n"


def test_runtime_tf_keras_without_tf_keras_exit_2(samples, without_tf_keras):
    result = invoke(samples / "seed_bn.keras", "--runtime", "tf-keras")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --runtime tf-keras needs the tf_keras package")
    assert "pip install tf_keras" in result.stderr
    assert "loading Keras" not in result.stderr


# --------------------------------------------------------------------------- disagreements


CUSTOM_LAYERS = textwrap.dedent(
    '''
    import keras


    class StuckDense(keras.layers.Dense):
        """A Dense whose variables never train, whatever its trainable flag says."""

        def build(self, input_shape):
            super().build(input_shape)
            for variable in self.weights:
                variable.trainable = False


    class MyBN(keras.layers.BatchNormalization):
        """A BN subclass: its call() could do anything, so verify does not claim its mode."""


    class Block(keras.layers.Layer):
        """A custom layer with a BN inside, which the saved config does not list."""

        def __init__(self, units=4, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.dense = keras.layers.Dense(units, name="inner_dense")
            self.bn = keras.layers.BatchNormalization(name="inner_bn")

        def build(self, input_shape):
            self.dense.build(input_shape)
            self.bn.build((*input_shape[:-1], self.units))

        def call(self, x, training=None):
            return self.bn(self.dense(x), training=training)

        def get_config(self):
            return {**super().get_config(), "units": self.units}
    '''
)


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory):
    import keras

    from bnfreeze.runtime.loading import load_custom_objects

    folder = tmp_path_factory.mktemp("custom")
    module = folder / "my_layers.py"
    module.write_text(CUSTOM_LAYERS)
    objects = load_custom_objects(str(module))
    inputs = keras.Input((6,), name="x")
    h = objects["StuckDense"](4, name="stuck")(inputs)
    h = objects["MyBN"](name="mybn")(h)
    h = objects["Block"](4, name="block")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h), name="custom")
    path = folder / "custom.keras"
    model.save(path)
    return path, module


@pytest.fixture(scope="module")
def custom_run(custom_model):
    path, module = custom_model
    return verify_json(path, "--custom-objects", module)


def test_disagreement_exit_1_names_the_layer(custom_run):
    code, doc, _ = custom_run
    assert code == 1
    assert doc["summary"]["agree"] is False
    assert doc["disagreements"] == [
        {
            "path": "stuck",
            "aspect": "weights",
            "predicted": True,
            "measured": "unchanged",
            "message": "stuck: inspect predicted its weights train in fit(), but they stayed "
            "frozen.",
        }
    ]


def test_custom_bn_subclass_mode_not_measured(custom_run):
    _, doc, _ = custom_run
    mybn = next(layer for layer in doc["layers"] if layer["path"] == "mybn")
    assert mybn["is_batchnorm"] is True
    assert mybn["mode_measured"] is False
    assert mybn["normalizes_with"] is None
    assert mybn["moving_stats"] == "moved"  # measured anyway; only the mode is not claimed
    assert mybn["predicted"] == {"trains_weights": True, "updates_moving_stats": None}


def test_bn_hidden_in_a_custom_layer_is_measured(custom_run):
    _, doc, _ = custom_run
    inner = next(layer for layer in doc["layers"] if layer["path"] == "block/inner_bn")
    # The config does not list it, but the weights file holds it: inspect predicts it.
    assert inner["in_file"] is True
    assert inner["moving_stats"] == "moved"
    assert inner["predicted"] == {"trains_weights": True, "updates_moving_stats": True}
    assert "block/inner_bn" not in doc["not_in_file"]
    assert doc["bn_not_compared"] == []


def test_disagreement_is_listed_in_the_table_view(custom_model):
    path, module = custom_model
    result = invoke(path, "--custom-objects", module)
    assert result.exit_code == 1
    assert "DISAGREE  1 of" in result.stdout
    assert "stuck: inspect predicted its weights train in fit(), but they stayed frozen." in (
        " ".join(result.stdout.split())
    )


def test_custom_classes_without_custom_objects_exit_2(custom_model):
    path, _ = custom_model
    result = invoke(path)
    assert result.exit_code == 2
    assert "--custom-objects" in result.stderr
    assert "StuckDense" in result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("bnfreeze: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ")


def test_subclassed_model_is_measured_from_its_build_config(subclassed_keras, custom_layers_file):
    """A subclassed model declares no inputs and its config lists no layers: the batch is
    built from the saved build_config. The prediction asks Keras (with the same custom
    objects) which layers it rebuilds, so every measured layer is predicted and compared."""
    code, doc, stderr = verify_json(subclassed_keras, "--custom-objects", custom_layers_file)
    assert code == 0
    assert doc["run"]["data"]["input_shapes"] == [[2, 3]]
    assert [layer["path"] for layer in doc["layers"]] == ["dense", "bn", "head"]
    assert doc["not_in_file"] == []
    assert doc["summary"]["checks"] == 4  # the BN's branch and gamma/beta, two kernels
    assert doc["summary"]["layers_measured"] == 3
    assert doc["summary"]["layers_compared"] == 3
    assert doc["summary"]["bn_stats_moved"] == 1
    assert "inspect could not predict them" not in stderr


# --------------------------------------------------------------------------- pure comparison


RUNTIME = RuntimeInfo(Runtime.KERAS3, "3.15.1", "tensorflow", "2.21.0")
SETUP = TrainingSetup(
    compile_source=CompileSource.DEFAULT,
    optimizer="SGD(learning_rate=0.01)",
    loss="mse",
    steps=1,
    batch_size=2,
    data_source=DataSource.SYNTHETIC,
    data_path=None,
    seed=0,
    input_shapes=((2, 6),),
)


def measurement(
    path: str,
    stats: Movement,
    gamma_beta: Movement,
    other: Movement = Movement.NONE,
    bn: bool = True,
) -> LayerMeasurement:
    return LayerMeasurement(
        path, "BatchNormalization" if bn else "Dense", bn, True, True, stats, gamma_beta, other
    )


def test_compare_finds_each_kind_of_disagreement(samples):
    prediction = inspect_file(samples / "sequential.keras")  # bn_1 trains, bn_2 inference
    measured = [
        measurement("bn_1", Movement.UNCHANGED, Movement.MOVED),  # stats: predicted to move
        measurement("bn_2", Movement.UNCHANGED, Movement.MOVED),  # gamma/beta: predicted frozen
        measurement("dense_1", Movement.NONE, Movement.NONE, Movement.UNCHANGED, bn=False),
        measurement("dense_2", Movement.NONE, Movement.NONE, Movement.ZERO_UPDATE, bn=False),
    ]
    report = compare(
        path="m", runtime=RUNTIME, setup=SETUP, measured=measured, prediction=prediction
    )
    assert report.disagreements == (
        Disagreement("bn_1", Aspect.MOVING_STATS, True, Movement.UNCHANGED),
        Disagreement("bn_2", Aspect.GAMMA_BETA, False, Movement.MOVED),
        Disagreement("dense_1", Aspect.WEIGHTS, True, Movement.UNCHANGED),
    )
    assert report.checks == 6  # bn_1 and bn_2: stats and gamma/beta; dense_1, dense_2: weights
    assert report.exit_code == 1
    assert report.not_measured == ("out",)


def test_without_a_prediction_nothing_is_compared():
    """The library's compare() accepts prediction=None (verify_file itself always predicts now
    that keras3 and tf-keras both have a rule set): the measurement is shown alone."""
    from rich.console import Console

    from bnfreeze.render.verify import verify_dict, verify_view

    tf_keras = RuntimeInfo(Runtime.TF_KERAS, "2.21.0", "tensorflow", "2.21.0")
    report = compare(
        path="m",
        runtime=tf_keras,
        setup=SETUP,
        prediction=None,
        measured=[measurement("bn", Movement.MOVED, Movement.MOVED)],
    )
    assert report.checks == 0 and report.exit_code == 0 and report.not_in_file == ()
    with open(os.devnull, "w") as sink:
        console = Console(width=100, record=True, color_system=None, file=sink)
        console.print(verify_view(report))
    text = console.export_text()
    assert "No prediction to compare: the report was built without one" in text
    assert "rule set" not in text
    assert "not in file" not in text
    assert verify_dict(report)["summary"]["compared"] is False


def test_zero_update_counts_as_trained():
    assert Movement.ZERO_UPDATE.trained is True
    assert Movement.ZERO_UPDATE.changed is False


@pytest.mark.parametrize("movement", list(Movement))
def test_every_movement_has_words_and_a_verdict(movement):
    from bnfreeze.render.verify import movement_text

    assert movement_text(movement).plain
    assert movement.trained is (
        None if movement is Movement.NONE else movement.changed or movement is Movement.ZERO_UPDATE
    )


@pytest.mark.parametrize("aspect", list(Aspect))
def test_every_aspect_reads_in_a_message(aspect):
    message = Disagreement("a/b", aspect, True, Movement.UNCHANGED).message
    assert message.startswith(f"a/b: inspect predicted {aspect.words} ")


@pytest.mark.parametrize("source", list(CompileSource))
def test_every_compile_source_is_explained(source):
    from bnfreeze.render.verify import compile_words

    words = compile_words(dataclasses.replace(SETUP, compile_source=source, reason="why"))
    assert words.startswith("SGD(learning_rate=0.01), loss mse (")


@pytest.mark.parametrize("source", list(DataSource))
def test_every_data_source_is_explained(source):
    from bnfreeze.render.verify import data_words

    words = data_words(dataclasses.replace(SETUP, data_source=source, data_path="b.npz"))
    assert ("b.npz" in words) is (source is DataSource.FILE)


def test_mode_is_read_off_the_moving_statistics():
    moved = measurement("bn", Movement.MOVED, Movement.MOVED)
    still = measurement("bn", Movement.UNCHANGED, Movement.UNCHANGED)
    custom = dataclasses.replace(moved, builtin=False)
    assert moved.normalizes_with is Normalization.BATCH
    assert still.normalizes_with is Normalization.MOVING
    assert custom.normalizes_with is None and not custom.mode_measured


def test_expectations_judge_the_measurement_not_the_prediction(samples):
    prediction = inspect_file(samples / "sequential.keras")
    measured = [
        measurement("bn_1", Movement.UNCHANGED, Movement.UNCHANGED),
        measurement("bn_2", Movement.UNCHANGED, Movement.UNCHANGED),
    ]
    report = compare(
        path="m",
        runtime=RUNTIME,
        setup=SETUP,
        measured=measured,
        prediction=prediction,
        expectations=[parse_expectation("bn-inference")],
    )
    assert report.expectations_hold  # although inspect predicts bn_1 trains
    assert not report.agree


# --------------------------------------------------------------------------- golden view


def check_golden(name: str, text: str) -> None:
    golden_files.check(GOLDEN, name, text)


@pytest.mark.parametrize("columns", [100, 80])
@pytest.mark.parametrize("all_layers", [False, True], ids=["bn", "all"])
def test_view_matches_golden(samples, monkeypatch, all_layers, columns):
    from rich.console import Console

    from bnfreeze.render.verify import verify_view
    from bnfreeze.runtime.verify import verify_file

    monkeypatch.chdir(ROOT)
    report = verify_file(
        "sample_models/sequential.keras", expectations=[parse_expectation("bn-inference")]
    )
    report = dataclasses.replace(report, runtime=RUNTIME)  # the golden file pins versions
    with open(os.devnull, "w") as sink:
        console = Console(width=columns, record=True, color_system=None, file=sink)
        console.print(verify_view(report, all_layers=all_layers))
    name = f"sequential_{'all' if all_layers else 'bn'}_{columns}.txt"
    check_golden(name, console.export_text())


TF_KERAS_BUILD = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tf_keras as keras
inputs = keras.Input((4,))
x = keras.layers.Dense(4, name="dense")(inputs)
x = keras.layers.BatchNormalization(name="bn")(x, training=False)
outputs = keras.layers.Dense(1, name="head")(x)
keras.Model(inputs, outputs).save(sys.argv[1])
"""


def test_runtime_tf_keras_measures_with_keras_2(tmp_path):
    """Rule 2 (docs/semantics.md) measured on tf_keras: a recorded call-site training=False WINS
    there, so the BN's statistics stay put in fit() while its gamma/beta still train; Keras 3 would
    move them. The model is a tf_keras .h5 (Keras 3 cannot load it)."""
    import sys

    import warm

    pytest.importorskip("tf_keras")
    model = tmp_path / "keras2.h5"
    warm.run([sys.executable, "-c", TF_KERAS_BUILD, str(model)], check=True)
    code, doc, stderr = verify_json(model, "--runtime", "tf-keras")
    assert code == 0, stderr
    assert doc["runtime"]["name"] == "tf-keras"
    assert doc["runtime"]["keras_version"].startswith("2.")
    bn = next(layer for layer in doc["layers"] if layer["path"] == "bn")
    assert bn["moving_stats"] == "unchanged"
    assert bn["gamma_beta"] == "moved"
    assert bn["normalizes_with"] == "moving"
    # The tf_keras rule set predicts it (more cases: tests/model/test_modes_tf_keras.py).
    assert doc["summary"]["compared"] is True and doc["disagreements"] == []
    assert bn["predicted"] == {"trains_weights": True, "updates_moving_stats": False}


def test_runtime_tf_keras_trains_with_the_model_s_own_compile_config(tmp_path):
    """tf_keras marks a compiled model with ``_is_compiled`` (Keras 3: ``compiled``): verify
    must train with the saved optimizer and loss, not fall back to SGD + MSE."""
    import sys

    import warm

    pytest.importorskip("tf_keras")
    build = TF_KERAS_BUILD.replace(
        "keras.Model(inputs, outputs).save(sys.argv[1])",
        "model = keras.Model(inputs, outputs)\n"
        "model.compile(keras.optimizers.Adam(0.003), 'mean_absolute_error')\n"
        "model.save(sys.argv[1])",
    )
    assert build != TF_KERAS_BUILD
    model = tmp_path / "keras2_compiled.h5"
    warm.run([sys.executable, "-c", build, str(model)], check=True)
    code, doc, stderr = verify_json(model, "--runtime", "tf-keras")
    assert code == 0, stderr
    compiled = doc["run"]["compile"]
    assert compiled["source"] == "model", compiled
    assert compiled["optimizer"] == "Adam(learning_rate=0.003)"
    assert "mean_absolute_error" in compiled["loss"]


def test_quiet_prints_no_progress_and_no_notes(samples):
    """-q: stdout unchanged, nothing on stderr (the progress lines and the notes go)."""
    loud = invoke(samples / "sequential.keras", "--json")
    quiet = invoke(samples / "sequential.keras", "--json", "-q")
    assert "bnfreeze: training 1 step (batch 2)" in loud.stderr
    assert quiet.stderr == ""
    assert quiet.exit_code == loud.exit_code == 0
    assert json.loads(quiet.stdout) == json.loads(loud.stdout)
