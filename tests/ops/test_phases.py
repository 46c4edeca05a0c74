"""bnfreeze.Phase and the phase declarations (bnfreeze/ops/phases.py): validation, what each
BN mode declares, the selectors, and no Keras import. The runs are in
tests/runtime/test_finetune.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from paths import ROOT

import bnfreeze
from bnfreeze.errors import BnfreezeError
from bnfreeze.model.records import LayerKind, LayerRecord
from bnfreeze.ops.phases import BnMode, OptimizerStateMode, Phase, PhaseError, declare


def test_phase_from_the_issue():
    p = bnfreeze.Phase(epochs=2, trains=["head*"], bn="inference", learning_rate=1e-3)
    assert p == Phase(epochs=2, trains=("head*",), bn=BnMode.INFERENCE, learning_rate=0.001)
    with pytest.raises(AttributeError):
        p.epochs = 3  # type: ignore[misc]


def test_phase_normalizes_a_single_glob_and_a_rate_mapping():
    p = Phase(epochs=1, trains="block_1*", learning_rates={"block_1*": 1e-5, "*": 1e-4})
    assert p.trains == ("block_1*",)
    assert p.learning_rates == (("block_1*", 1e-5), ("*", 1e-4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "phase: epochs must be a whole number >= 1, not 0."),
        ({"epochs": True}, "phase: epochs must be a whole number >= 1, not True."),
        (
            {"epochs": 1, "bn": "frozen"},
            "phase: bn 'frozen' is not one of 'inference', 'train', 'flags', 'frozen-stats'.",
        ),
        ({"epochs": 1, "learning_rate": -1}, "phase: learning_rate must be a positive number"),
        ({"epochs": 1, "learning_rate": "1e-3"}, "phase: learning_rate must be a number, not str."),
        ({"epochs": 1, "trains": [""]}, "phase: trains takes non-empty globs, not ''."),
        (
            {"epochs": 1, "learning_rates": {"x": 0}, "name": "top"},
            "top: learning_rates['x'] must be a positive number, not 0.",
        ),
    ],
)
def test_a_bad_phase_is_a_one_line_error(kwargs, message):
    with pytest.raises(PhaseError) as info:
        Phase(**kwargs)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, BnfreezeError)


@pytest.mark.parametrize("mode", list(BnMode))
def test_every_bn_mode_declares_what_trains(mode):
    def rec(path, bn=False, kind=LayerKind.LAYER):
        return LayerRecord(
            path=path,
            name=path.rsplit("/", 1)[-1],
            class_name="BatchNormalization" if bn else "Dense",
            kind=LayerKind.BATCHNORM if bn else kind,
            depth=path.count("/"),
            parent=path.rsplit("/", 1)[0] if "/" in path else None,
            trainable=True,
        )

    layers = [
        rec("base", kind=LayerKind.CONTAINER),
        rec("base/conv"),
        rec("base/bn", bn=True),
        rec("head"),
        rec("head_bn", bn=True),
    ]
    d = declare(Phase(epochs=1, trains=["head*"], bn=mode), "phase 1", layers)
    expected = {
        BnMode.INFERENCE: {"head"},
        BnMode.TRAIN: {"head", "head_bn", "base/bn"},
        BnMode.FLAGS: {"head", "head_bn"},
        BnMode.FROZEN_STATS: {"head", "head_bn"},
    }[mode]
    frozen_stats = {"head_bn"} if mode is BnMode.FROZEN_STATS else set()
    assert d.trains == expected
    assert d.frozen == {"base/conv", "base/bn", "head", "head_bn"} - expected
    assert d.bn_train == (expected & {"base/bn", "head_bn"}) - frozen_stats
    assert d.bn_inference == {"base/bn", "head_bn"} - expected
    assert d.bn_frozen_stats == frozen_stats
    kinds = {e.kind.value for e in d.expectations()}
    assert ("bn-frozen-stats" in kinds) is (mode is BnMode.FROZEN_STATS)


def test_every_optimizer_state_mode_is_a_value():
    assert [m.value for m in OptimizerStateMode] == ["carry", "reset"]


def test_phases_and_schedules_in_plans_never_import_keras():
    code = (
        "import sys, bnfreeze\n"
        "bnfreeze.Phase(epochs=1, trains=['head*'])\n"
        "from bnfreeze.ops.plan_parser import load_plan\n"
        "load_plan('gradual-unfreeze')\n"
        "heavy = [m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_selectors_intersect_as_freeze_and_unfreeze_do(samples):
    from bnfreeze.ops.inspect import inspect_file

    layers = [s.layer for s in inspect_file(samples / "guide_pattern.keras").layers]
    top = declare(Phase(epochs=1, from_="block_16_expand"), "p", layers)
    assert sorted(top.trains) == [
        "head",
        "mobilenetv2_0.35_32/block_16_depthwise",
        "mobilenetv2_0.35_32/block_16_depthwise_relu",
        "mobilenetv2_0.35_32/block_16_expand",
        "mobilenetv2_0.35_32/block_16_expand_relu",
        "mobilenetv2_0.35_32/block_16_project",
        "pool",
    ]
    assert len(top.bn_inference) == 51 and not top.bn_train
    both = declare(Phase(epochs=1, trains=["*project*"], from_="block_15_expand"), "p", layers)
    assert sorted(both.trains) == [
        "mobilenetv2_0.35_32/block_15_project",
        "mobilenetv2_0.35_32/block_16_project",
    ]
    early = declare(Phase(epochs=1, up_to="expanded_conv_project_BN", bn="flags"), "p", layers)
    assert len(early.bn_train) == 3  # bn_Conv1, expanded_conv_depthwise_BN, ..._project_BN
    with pytest.raises(PhaseError, match="no layer named 'block_99'"):
        declare(Phase(epochs=1, from_="block_99"), "p", layers)
