"""Truth from Keras for code-built models (issue 20): keras-hub tasks frozen as users freeze
them (``task.backbone.trainable = False``), saved as ``.keras`` files and preset folders,
reloaded in a fresh process and measured for one ``fit()`` step with the branch of every BN
recorded (``tests/support/hub_tasks.py``). ``inspect`` asks Keras how the file loads; its rows and
counts must be what the measurement shows, and ``verify`` must agree and exit 0.

One fresh interpreter builds and saves every model; one more measures them all
(``tests/support/warm.py``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import warm

pytestmark = pytest.mark.keras

ROOT = Path(__file__).resolve().parent.parent.parent
SUPPORT = ROOT / "tests" / "support"
TASKS = ("deeplabv3", "densenet", "efficientnet", "hgnetv2", "retinanet")
FILES = (
    *(f"{t}.keras" for t in TASKS),
    *(f"{t}_preset" for t in TASKS),
    "hgnetv2_backbone_preset",
)


def _run(*args: str) -> str:
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(SUPPORT)]),
    }
    done = warm.run([sys.executable, str(SUPPORT / "hub_tasks.py"), *args], env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="session")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("hub_tasks")
    _run("build", str(out))
    rows = [json.loads(line) for line in _run("measure", str(out)).splitlines() if line]
    return {row["file"]: row for row in rows}


@pytest.mark.parametrize("name", FILES)
def test_inspect_and_verify_agree_with_one_fit_step(
    measured: dict[str, dict[str, Any]], name: str
) -> None:
    row = measured[name]
    assert "error" not in row, row.get("error")
    # verify: every BN compared (or reported as never called), every check agrees, exit 0.
    assert row["disagreements"] == []
    assert row["bn_not_compared"] == []
    assert row["agree"] is True and row["exit_code"] == 0
    assert row["checks"] > 0
    # The branch was recorded for every BN that was called.
    assert row["branch_recorded"] == len(row["measured_bn"]) - len(row["bn_not_called"])
    # inspect asked Keras: the same BN rows, at the paths verify measures.
    assert row["inspect_sources"] == ["keras"]
    assert row["inspect_bn"] == row["measured_bn"]
    # Every count, and the BN layers never called in fit(): inspect names the ones verify
    # measured as never called, and counts them as neither training nor inference.
    assert row["inspect_not_called"] == sorted(row["bn_not_called"])
    assert row["inspect_training"] == row["measured_batch"]
    assert row["inspect_inference"] == row["measured_moving"]


@pytest.mark.parametrize(
    "name", ["frozen/deeplabv3.keras", "frozen/retinanet.keras", "frozen/hgnetv2_preset.keras"]
)
def test_bn_inference_reaches_every_bn(measured: dict[str, dict[str, Any]], name: str) -> None:
    """``freeze --bn-inference`` (DeepLabV3 through the CLI, RetinaNet through
    ``bnfreeze.freeze``, HGNetV2's task preset folder through the CLI), reloaded with
    ``bnfreeze.load_model``: every BN the model tracks reads ``trainable=False``, including
    those its backbone holds outside its graph (the ResNet ``post_bn`` under DeepLabV3, the P5
    stage under RetinaNet: main left them trainable) and the task's head (main wrote the
    preset's backbone alone); one fit() step: no BN takes the batch branch, and no gamma/beta
    or statistics is trained or moves."""
    row = measured[name]
    if name == "frozen/hgnetv2_preset.keras":
        assert "head_last/head_last_bn" in row["measured_bn"]
        assert row["bn_instances"] == 13
    assert row["bn_trainable"] == []
    assert len(row["measured_bn"]) == row["bn_instances"]
    assert row["called"] > 0
    assert row["batch_branch"] == []
    assert row["moved"] == []


def test_hgnetv2_keeps_its_flags_after_reload(measured: dict[str, dict[str, Any]]) -> None:
    """The rule "code-built layers come back trainable" is wrong here (main said 13 train)."""
    row = measured["hgnetv2.keras"]
    assert (row["inspect_training"], row["inspect_inference"]) == (1, 12)
    assert (row["measured_batch"], row["measured_moving"]) == (1, 12)


def test_backbone_preset_folder_loads_as_keras_loads_it(
    measured: dict[str, dict[str, Any]],
) -> None:
    """A backbone's preset folder is what ``keras.models.load_model`` (and
    ``Backbone.from_preset``) loads from it: ``config.json`` and ``model.weights.h5``.
    HGNetV2's returns a dict of feature maps, which verify's synthetic targets now fit (main:
    exit 2, shapes [2,8,8,16] vs [2,8,8,8]: targets packed in the dict's order, not Keras's
    sorted one)."""
    row = measured["hgnetv2_backbone_preset"]
    assert "error" not in row, row.get("error")
    assert row["exit_code"] == 0
    assert (row["measured_batch"], row["measured_moving"]) == (0, 12)
    assert row["inspect_bn"] == row["measured_bn"]
    assert not any(p.startswith("hg_net_v2_backbone/") for p in row["inspect_bn"])


@pytest.mark.parametrize("task", TASKS)
def test_task_preset_folder_is_read_as_the_task(
    measured: dict[str, dict[str, Any]], task: str
) -> None:
    """A task's preset folder (``task.save_to_preset``) is the task, as
    ``Task.from_preset`` loads it (``task.json``, ``task.weights.h5`` and the backbone):
    inspect and verify read the same rows, at the same paths and with the same counts, as the
    task saved with ``task.save`` (main read the backbone alone: HGNetV2's head BN was
    missing, and its paths had no backbone name)."""
    preset, keras_file = measured[f"{task}_preset"], measured[f"{task}.keras"]
    assert "error" not in preset, preset.get("error")
    assert preset["exit_code"] == 0 and preset["agree"] is True
    assert preset["keras_hub_task"] == keras_file["task_class"]
    for key in ("inspect_bn", "measured_bn", "inspect_not_called", "bn_not_called"):
        assert preset[key] == keras_file[key], key
    for key in ("inspect_training", "inspect_inference", "measured_batch", "measured_moving"):
        assert preset[key] == keras_file[key], key
    if task == "hgnetv2":  # the classifier head's BN, which trains
        assert "head_last/head_last_bn" in preset["measured_bn"]
        assert (preset["measured_batch"], preset["measured_moving"]) == (1, 12)


@pytest.mark.parametrize("name", ["deeplabv3.keras", "retinanet.keras"])
def test_reload_trap_counts_are_row_counts(measured: dict[str, dict[str, Any]], name: str) -> None:
    """The code-built-reload-trains warning counts the BN rows that train (main said 1 for
    DeepLabV3 and 3 for RetinaNet)."""
    row = measured[name]
    assert row["trap_count"] == 1
    count = row["inspect_training"]
    assert f"{count} of the {len(row['inspect_bn'])} BN layer(s)" in row["trap_message"]


def test_retinanet_verify_reports_uncalled_bn(measured: dict[str, dict[str, Any]]) -> None:
    """RetinaNet's compile config has no plain ``loss`` (main: exit 3, KeyError 'loss'); its
    FPN output norms, and the P5 stage of its ResNet (held by the backbone, above
    ``max_level``), are never called in fit(): reported as such, not compared."""
    row = measured["retinanet.keras"]
    assert row["exit_code"] == 0
    assert sorted(row["bn_not_called"]) == [
        "retina_net_backbone/fpn/output_norm_P3",
        "retina_net_backbone/fpn/output_norm_P4",
        "retina_net_backbone/res_net_backbone_1/stack3_block0_0_bn",
        "retina_net_backbone/res_net_backbone_1/stack3_block0_1_bn",
        "retina_net_backbone/res_net_backbone_1/stack3_block0_2_bn",
    ]


def test_deeplabv3_post_bn_is_a_row_never_called(measured: dict[str, dict[str, Any]]) -> None:
    """The ResNet ``post_bn`` under DeepLabV3 (held by the backbone, after the pyramid outputs
    it calls) is a row of inspect and a measured layer of verify (main had neither), never
    called in fit()."""
    for name in ("deeplabv3.keras", "deeplabv3_preset"):
        row = measured[name]
        post_bn = "deep_lab_v3_backbone/res_net_backbone/post_bn"
        assert post_bn in row["inspect_bn"] and post_bn in row["measured_bn"]
        assert row["bn_not_called"] == [post_bn]


def test_momentum_one_statistics_never_move(measured: dict[str, dict[str, Any]]) -> None:
    """``momentum=1.0``: the batch branch, but the statistics stay bit-identical; inspect must
    not say they update (main said they do)."""
    row = measured["momentum_one.keras"]
    assert row["agree"] is True and row["exit_code"] == 0
    assert row["measured_batch"] == 1 and row["stats_moved"] == 0
    assert row["inspect_updates"] == 0


def test_renorm_bn_in_a_custom_block_is_found(measured: dict[str, dict[str, Any]]) -> None:
    """``BatchNormalization(renorm=True)`` has 7 variables; from the file alone (main listed
    0 BN layers) and asked of Keras, it is one BN that trains, as measured."""
    row = measured["renorm_block.keras"]
    from_file = [r for r in row["from_file"] if r["is_batchnorm"]]
    assert from_file == [
        {
            "path": "block/batch_normalization",
            "is_batchnorm": True,
            "renorm": True,
            "normalizes_with": "batch",
        }
    ]
    assert row["measured_bn"] == ["block/batch_normalization"] and row["measured_batch"] == 1
    assert row["agree"] is True and row["exit_code"] == 0


def test_bn_inside_a_custom_wrapper_is_listed_and_measured(
    measured: dict[str, dict[str, Any]],
) -> None:
    """A BN inside a custom ``Wrapper`` subclass is listed (main: missing, verify exit 1), with
    its mode left unknown and a reason; verify reports its measured mode and exits 0."""
    row = measured["custom_wrapper.keras"]
    assert [r for r in row["from_file"] if r["is_batchnorm"]] == [
        {"path": "wrap/bn", "is_batchnorm": True, "renorm": False, "normalizes_with": None}
    ]
    assert "unknown-layer" in row["warnings"]
    assert row["inspect_bn"] == row["measured_bn"] == ["wrap/bn"]
    assert row["measured_batch"] == 1
    assert row["bn_not_compared"] == [] and row["disagreements"] == []
    assert row["exit_code"] == 0


def test_keras_3_3_files_map_weights_by_position(measured: dict[str, dict[str, Any]]) -> None:
    """A file as Keras 3.0-3.5 write it (no layer names in the weights file) reads like the
    same model saved by this Keras (main: "2 layers train" instead of 5, Conv/Dense
    trains_weights null, untrained-statistics warnings for 0 of 3), and verify agrees."""
    old, new = measured["old_keras.keras"], measured["new_keras.keras"]
    assert old["rows"] == new["rows"]
    assert old["layers_train"] == new["layers_train"] == 5
    assert old["warning_paths"] == new["warning_paths"]
    # Untrained statistics are warned about where they do harm: the one BN in inference mode
    # (the other two fill their statistics in fit()).
    assert sum(p.startswith("untrained-bn-statistics") for p in old["warning_paths"]) == 1
    assert old["agree"] is True and old["exit_code"] == 0
