"""``bnfreeze explain``: the seed experiment, measured live.

The numbers must come from running Keras: the tests change the starting values and check
that every number follows, by the batch-normalization formulas written out here in numpy.
"""

from __future__ import annotations

import json

import json_schemas
import numpy as np
import pytest
from click.testing import CliRunner
from paths import GOLDEN

from bnfreeze.cli import cli
from bnfreeze.model.records import Normalization
from bnfreeze.runtime.explain import (
    COMBINATIONS,
    HISTORICAL_NOTE,
    IMAGE_SHAPE,
    RULES,
    ExplainReport,
    explain,
    meaning,
)

pytestmark = pytest.mark.keras

ENV = {"COLUMNS": "100", "NO_COLOR": "1", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}


def inference(report: ExplainReport) -> np.ndarray:
    s = report.setup
    x = np.asarray(s.image).reshape(IMAGE_SHAPE)
    return np.asarray(s.gamma) * (x - np.asarray(s.moving_mean)) / np.sqrt(
        np.asarray(s.moving_variance) + s.epsilon
    ) + np.asarray(s.beta)


def batch_stats(report: ExplainReport) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(report.setup.image).reshape(IMAGE_SHAPE)
    return x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))


def check_numbers(report: ExplainReport) -> None:
    """Every case against the formulas, from the report's own starting values."""
    s = report.setup
    assert [(c.training, c.trainable) for c in report.cases] == list(COMBINATIONS)
    mean, var = batch_stats(report)
    x = np.asarray(s.image).reshape(IMAGE_SHAPE)
    for case in report.cases:
        out = np.asarray(case.output).reshape(IMAGE_SHAPE)
        assert case.first_row == case.output[:4]
        if case.training and case.trainable:
            normalized = np.asarray(s.gamma) * (x - mean) / np.sqrt(var + s.epsilon) + np.asarray(
                s.beta
            )
            np.testing.assert_allclose(out, normalized, rtol=1e-4, atol=1e-4)
            assert case.stats_updated
            assert case.normalizes_with is Normalization.BATCH
            np.testing.assert_allclose(
                case.moving_mean,
                s.momentum * np.asarray(s.moving_mean) + (1 - s.momentum) * mean,
                rtol=1e-5,
                atol=1e-6,
            )
            np.testing.assert_allclose(
                case.moving_variance,
                s.momentum * np.asarray(s.moving_variance) + (1 - s.momentum) * var,
                rtol=1e-5,
                atol=1e-6,
            )
        else:
            np.testing.assert_allclose(out, inference(report), rtol=1e-5, atol=1e-5)
            assert not case.stats_updated
            assert case.normalizes_with is Normalization.MOVING
            np.testing.assert_allclose(case.moving_mean, s.moving_mean, rtol=0, atol=0)
            np.testing.assert_allclose(case.moving_variance, s.moving_variance, rtol=0, atol=0)


@pytest.fixture(scope="module")
def seed_report() -> ExplainReport:
    return explain()


def test_seed_setup(seed_report):
    s = seed_report.setup
    image = np.asarray(s.image).reshape(IMAGE_SHAPE)
    assert image.shape == (1, 2, 2, 4)
    assert np.all(image == np.round(image)) and image.min() >= 0 and image.max() <= 9
    assert (s.gamma, s.beta, s.moving_mean, s.moving_variance) == (
        (2.0,) * 4,
        (1.0,) * 4,
        (0.0,) * 4,
        (1.0,) * 4,
    )
    assert (s.momentum, s.epsilon, s.seed) == (0.99, 1e-3, 0)


def test_seed_numbers(seed_report):
    """With training=False or trainable=False the output is gamma*x + beta (moving mean 0,
    variance 1) and nothing moves; with both True it is batch-normalized and the moving
    mean moves toward the batch mean at momentum 0.99."""
    check_numbers(seed_report)
    first_pixel = np.asarray(seed_report.setup.first_pixel)
    for case in seed_report.cases[:3]:
        np.testing.assert_allclose(case.first_row, 2 * first_pixel / np.sqrt(1.001) + 1, rtol=1e-5)
    trained = seed_report.cases[3]
    mean, _ = batch_stats(seed_report)
    np.testing.assert_allclose(trained.moving_mean, 0.01 * mean, rtol=1e-5)


@pytest.mark.parametrize(
    "values",
    [
        {"gamma": 3.0, "beta": -1.0, "moving_mean": 0.5, "moving_variance": 4.0, "seed": 7},
        {
            "gamma": [1.0, 2.0, 3.0, 4.0],
            "beta": [0.0, 0.5, 1.0, 1.5],
            "momentum": 0.9,
            "moving_mean": [1.0, -1.0, 2.0, 0.0],
        },
        {"image": np.arange(16).reshape(IMAGE_SHAPE), "epsilon": 0.1, "moving_variance": 2.0},
    ],
    ids=["scalars", "per-channel", "given-image"],
)
def test_numbers_follow_the_starting_values(values):
    report = explain(**values)
    check_numbers(report)
    seed_numbers = explain()
    assert report.cases[0].output != seed_numbers.cases[0].output
    assert report.cases[3].moving_mean != seed_numbers.cases[3].moving_mean


def test_a_given_image_has_no_seed():
    report = explain(image=np.ones(IMAGE_SHAPE))
    assert report.setup.seed is None
    assert report.setup.image == (1.0,) * 16


def test_meanings_come_from_the_measurement(seed_report):
    assert [c.meaning for c in seed_report.cases] == [
        "inference mode: nothing changes",
        "inference mode: nothing changes",
        "inference mode: trainable=False overrides training=True",
        "training mode: moving statistics move toward the batch's (momentum 0.99)",
    ]


@pytest.mark.parametrize("mode", [*Normalization, None])
@pytest.mark.parametrize("updated", [False, True])
def test_every_mode_has_a_meaning(mode, updated):
    assert meaning(True, True, mode, updated, 0.99)


def test_rules_and_runtime(seed_report):
    assert seed_report.rules == RULES["keras3"]
    assert [r.split(" ")[0] for r in seed_report.rules] == ["1.", "2.", "3.", "4."]
    assert seed_report.runtime.backend == "tensorflow"
    import keras
    import tensorflow as tf

    assert seed_report.runtime.keras_version == keras.__version__
    assert seed_report.runtime.tensorflow_version == tf.__version__
    assert seed_report.historical_note == HISTORICAL_NOTE
    assert HISTORICAL_NOTE.startswith("Historical, not measured here:")


# --------------------------------------------------------------------------- the CLI


def invoke(*args: str):
    return CliRunner().invoke(cli, ["explain", *args], env=ENV, catch_exceptions=False)


def test_json_document(seed_report):
    result = invoke("--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    r = seed_report

    def nested(flat):
        return np.asarray(flat).reshape(IMAGE_SHAPE).tolist()

    json_schemas.validate("explain", doc)
    assert doc == {
        "schema_version": 2,
        "command": "explain",
        "runtime": {
            "name": "keras3",
            "measured": True,
            "keras_version": r.runtime.keras_version,
            "backend": "tensorflow",
            "tensorflow_version": r.runtime.tensorflow_version,
        },
        "setup": {
            "image": nested(r.setup.image),
            "seed": 0,
            "gamma": [2.0] * 4,
            "beta": [1.0] * 4,
            "moving_mean": [0.0] * 4,
            "moving_variance": [1.0] * 4,
            "momentum": 0.99,
            "epsilon": 0.001,
        },
        "cases": [
            {
                "training": c.training,
                "trainable": c.trainable,
                "output_first_row": list(c.first_row),
                "output": nested(c.output),
                "normalizes_with": "batch" if c.training and c.trainable else "moving",
                "branch_recorded": True,
                "moving_stats_updated": c.training and c.trainable,
                "moving_mean": list(c.moving_mean),
                "moving_variance": list(c.moving_variance),
                "meaning": c.meaning,
            }
            for c in r.cases
        ],
        "rules": list(RULES["keras3"]),
        "rules_note": r.rules_note,
        "historical_note": HISTORICAL_NOTE,
    }
    assert "bnfreeze: loading Keras (TensorFlow backend)" in result.stderr


def test_table_view(seed_report):
    result = invoke()
    assert result.exit_code == 0
    out = result.stdout
    assert "training  trainable  output[0,0,0,:] and what it means" in out
    assert "\nTrue      True       [" in out
    assert all(line == line.rstrip() for line in out.splitlines())
    pixel = ", ".join(f"{round(v, 3):g}" for v in seed_report.cases[0].first_row)
    assert f"[{pixel}]" in out
    assert "moving mean [0, 0, 0, 0] -> [" in out
    flat = " ".join(out.split())
    for rule in RULES["keras3"]:
        assert " ".join(rule.split()[1:4]) in flat
    assert f"Keras {seed_report.runtime.keras_version}, backend tensorflow" in out
    assert "Historical, not measured here" in out


def test_help_has_an_example():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and "bnfreeze explain --json" in result.stdout


def test_runtime_tf_keras_without_tf_keras_exit_2(without_tf_keras):
    result = invoke("--runtime", "tf-keras")
    assert result.exit_code == 2
    assert "tf_keras" in result.stderr and "not installed" in result.stderr


def test_tf_keras_rules_name_tf_keras():
    """``--runtime tf-keras`` runs the experiment on Keras 2 and shows the tf_keras rules,
    measured on tf_keras (tests/model/test_modes_tf_keras.py measures rules 2-3 on files)."""
    pytest.importorskip("tf_keras")
    from bnfreeze.model.records import Runtime

    report = explain(runtime=Runtime.TF_KERAS)
    assert report.runtime.keras_version.startswith("2.")
    assert report.rules == RULES["tf-keras"]
    assert "load_model drops" in report.rules[2]
    assert report.rules_note.startswith("The rules were measured on tf_keras 2.21,")


@pytest.mark.parametrize("columns", [80, 100])
def test_view_matches_golden(seed_report, columns):
    """The whole view at 80 and 100 columns, with the runtime's versions pinned: within the
    width, and no line ends with a space."""
    import dataclasses
    import os

    import golden_files
    from rich.console import Console

    from bnfreeze.model.measured import RuntimeInfo
    from bnfreeze.model.records import Runtime
    from bnfreeze.render.explain import explain_view

    pinned = RuntimeInfo(Runtime.KERAS3, "3.15.1", "tensorflow", "2.21.0")
    report = dataclasses.replace(seed_report, runtime=pinned)
    with open(os.devnull, "w") as sink:
        console = Console(width=columns, record=True, color_system=None, file=sink)
        console.print(explain_view(report))
    text = console.export_text()
    golden = GOLDEN / "explain"
    golden_files.check(golden, f"seed_{columns}.txt", text)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert all(line == line.rstrip() for line in lines)


def test_momentum_one_is_training_mode_with_still_statistics():
    """momentum=1.0: the batch branch runs (the output is normalized with the batch's
    statistics) and the moving statistics stay put; the mode is the branch, not the
    movement."""
    report = explain(momentum=1.0)
    case = next(c for c in report.cases if c.training and c.trainable)
    assert case.branch is Normalization.BATCH
    assert case.output_matches is Normalization.BATCH
    assert case.normalizes_with is Normalization.BATCH
    assert not case.stats_updated
    assert "TF1" not in case.meaning and "training mode" in case.meaning


def test_the_branch_is_known_when_the_output_cannot_tell():
    """A batch whose statistics equal the moving ones gives the same output in both branches;
    the recorded branch still tells them apart."""
    image = np.full(IMAGE_SHAPE, 3.0)
    report = explain(image=image, moving_mean=3.0, moving_variance=0.0)
    by_flags = {(c.training, c.trainable): c for c in report.cases}
    assert all(c.output_matches is None for c in report.cases)
    assert by_flags[(True, True)].normalizes_with is Normalization.BATCH
    assert by_flags[(True, False)].normalizes_with is Normalization.MOVING
    assert by_flags[(False, True)].normalizes_with is Normalization.MOVING
