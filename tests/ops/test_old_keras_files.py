"""Files written by Keras 3.3.3 itself (``tests/data/keras_3_3_3/make.py``), read without
Keras: Keras 3.0 to 3.5 name no layer in ``model.weights.h5`` and save the optimizer's
variables by position. Their weights map to layers by position, and a freeze remaps their
optimizer state (main kept all 22 variables for 14 trainable ones on the edit route, so Keras
skipped the whole state). What Keras loads from the outputs: tests/ops/test_optimizer_state.py.
"""

from __future__ import annotations

from paths import TESTS

import bnfreeze
from bnfreeze.ops.inspect import inspect_file
from bnfreeze.ops.optimizer_state import OptimizerState

OLD = TESTS / "data" / "keras_3_3_3"


def test_weights_map_to_layers_as_keras_3_3_loads_them():
    report = inspect_file(OLD / "adam_trained.keras")
    assert report.model.keras_version == "3.3.3"
    trains = {s.layer.path: s.in_fit.trains_weights for s in report.layers}
    assert trains == {
        "x": None,
        "conv": True,
        "bn": True,
        "sub": None,
        "sub/sub_x": None,
        "sub/inner_conv": True,
        "sub/inner_bn": True,
        "pool": None,
        "dense": True,
    }


def test_freeze_remaps_the_positional_optimizer_state(tmp_path):
    result = bnfreeze.freeze(
        OLD / "adam_trained.keras", output=tmp_path / "o.keras", bn_inference=True
    )
    assert result.optimizer_state is OptimizerState.REMAPPED, result.optimizer_plan
    plan = result.optimizer_plan
    # iteration and learning rate, then Adam's two slots of conv, inner_conv and dense
    # (kernel and bias each); the two BN layers' 8 slots are left out.
    assert (plan.saved, plan.expected, plan.kept, plan.created, plan.left_out) == (22, 14, 12, 0, 8)


def test_unfreeze_adds_zero_slots_where_keras_would(tmp_path):
    source = OLD / "adam_trained_sub_frozen.keras"
    result = bnfreeze.unfreeze(source, output=tmp_path / "o.keras")
    assert result.optimizer_state is OptimizerState.REMAPPED, result.optimizer_plan
    plan = result.optimizer_plan
    assert (plan.saved, plan.expected, plan.kept, plan.created, plan.left_out) == (14, 22, 12, 8, 0)
