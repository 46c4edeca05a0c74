"""A keras-hub task's preset folder (``task.save_to_preset``: ``task.json`` and
``task.weights.h5`` beside the backbone's ``config.json`` and ``model.weights.h5``) is read as
the task, as ``Task.from_preset`` loads it, not as its backbone alone (main read
``config.json`` only: the head's layers were missing and the model's flag was the
backbone's). Crafted folders, no Keras; ``tests/runtime/test_hub_truth.py`` measures real
keras-hub tasks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from code_built_files import bn, write_task_preset

from bnfreeze.cli import cli
from bnfreeze.formats.readers import read_model, read_values, with_weights
from bnfreeze.formats.readers.keras_dir import TASK_GROUP
from bnfreeze.ops.inspect import inspect_file

BACKBONE = {
    "layers/batch_normalization": ("stem_bn", bn(4, variance=2.0)),
    "layers/conv2d": ("stem_conv", [[[[0.1] * 4] * 3] * 3]),
}
HEAD = {
    # Held as an attribute: only its values tell it is BN (a moving variance >= 0), so the
    # row is BN only if task.weights.h5 is read.
    "head/bn": ("head_bn", bn(4, variance=3.0)),
    "layers/dense": ("predictions", [[[0.0] * 2] * 4, [0.0] * 2]),
}


@pytest.fixture
def preset(tmp_path: Path) -> Path:
    return write_task_preset(tmp_path / "task_preset", BACKBONE, HEAD)


def test_the_task_is_read_with_both_weights_files(preset: Path) -> None:
    model = read_model(preset)
    assert model.preset_task == "TinyClassifier"
    assert model.config["class_name"] == "TinyClassifier"
    assert model.weights is not None
    assert model.weights.variables["tiny_backbone/stem_bn"][0] == (
        "/layers/batch_normalization/vars/0"
    )
    assert model.weights.variables["head"][0] == f"{TASK_GROUP}/head/bn/vars/0"
    # Reading unindexed then indexing gives the same index.
    assert with_weights(read_model(preset, weights=False)).weights == model.weights


def test_values_come_from_the_file_that_holds_them(preset: Path) -> None:
    model = read_model(preset)
    names = ["/layers/batch_normalization/vars/3", f"{TASK_GROUP}/head/bn/vars/3"]
    for indexed in (model, replace(model, weights=replace(model.weights, locations={}))):
        found = read_values(indexed, names)  # the pure-Python reader, then h5py's
        assert np.asarray(found[names[0]]).tolist() == [2.0] * 4
        assert np.asarray(found[names[1]]).tolist() == [3.0] * 4


def test_inspect_lists_the_backbone_and_the_head(preset: Path) -> None:
    report = inspect_file(preset)
    assert report.model_trainable is True  # the task's flag, not the frozen backbone's
    rows = {s.layer.path: s for s in report.batchnorm}
    assert sorted(rows) == ["head/head_bn", "tiny_backbone/stem_bn"]
    assert all(s.layer.from_weights for s in rows.values())
    assert report.bn_training_in_fit == 2  # by rule: Keras rebuilds them trainable


def test_the_output_names_the_task(preset: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"})
    result = runner.invoke(cli, ["inspect", "--from-file", "--json", str(preset)])
    assert result.exit_code == 0, result.output
    hub = json.loads(result.stdout)["model"]["keras_hub"]
    assert hub == {
        "classes": ["keras_hub>TinyClassifier", "keras_hub>TinyBackbone"],
        "preset": True,
        "version": "0.32.0",
        "task": "TinyClassifier",
    }
    result = runner.invoke(cli, ["inspect", "--from-file", str(preset)])
    assert "keras-hub  task preset folder (save_to_preset), the task as from_preset" in (
        result.stdout
    )


def test_a_backbone_preset_is_not_a_task(tmp_path: Path) -> None:
    folder = write_task_preset(tmp_path / "backbone_preset", BACKBONE, HEAD)
    (folder / "task.json").unlink()
    (folder / "task.weights.h5").unlink()
    model = read_model(folder)
    assert model.preset_task is None and model.config["class_name"] == "TinyBackbone"
    assert sorted(s.layer.path for s in inspect_file(folder).batchnorm) == ["stem_bn"]


def test_the_config_route_refuses_a_task_preset(preset: Path, tmp_path: Path) -> None:
    """Editing config.json would write the backbone alone: refused, nothing written."""
    out = tmp_path / "frozen.keras"
    args = ["freeze", str(preset), "--bn-inference", "--engine", "config", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "task's preset folder (TinyClassifier, task.json)" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_diff_compares_the_head_weights(preset: Path, tmp_path: Path) -> None:
    import h5py

    other = write_task_preset(tmp_path / "other", BACKBONE, HEAD)
    with h5py.File(other / "task.weights.h5", "r+") as h5:
        h5["layers/dense/vars/1"][...] = [1.0, 1.0]
    result = CliRunner().invoke(cli, ["diff", "--json", str(preset), str(other)])
    assert result.exit_code in (0, 1), result.output
    weights = json.loads(result.stdout)["weights"]
    assert weights["changed"] == [f"{TASK_GROUP}/layers/dense/vars/1"]
    assert weights["changed_layers"] == ["predictions"]


def test_without_keras_the_task_is_predicted_by_rule(preset: Path) -> None:
    """Where Keras (or keras-hub) cannot be asked, the rows are the file's, by rule, and the
    warning says why; Keras would have been asked about the task, not the backbone."""
    asked: list[str] = []

    def ask(model: object, listed: set[str]) -> tuple[None, str]:
        asked.append(model.config["class_name"])  # type: ignore[attr-defined]
        return None, "keras_hub is not installed"

    report = inspect_file(preset, ask_keras=ask)
    assert asked == ["TinyClassifier"]
    assert sorted(s.layer.path for s in report.batchnorm) == [
        "head/head_bn",
        "tiny_backbone/stem_bn",
    ]
    assert "predicted-by-rule" in {w.code for w in report.warnings}
