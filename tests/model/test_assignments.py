"""Flag edits: the recipes, containers following Keras's rule, changes, the config edit."""

from __future__ import annotations

import copy
import json

import pytest
from nested_configs import nested_config

from bnfreeze.model.assignments import (
    Assignment,
    Change,
    apply_to_config,
    assign,
    changes,
    current_flags,
    editable,
    stores_flag,
    with_flags,
)
from bnfreeze.model.selection import select
from bnfreeze.model.walk import walk


@pytest.fixture()
def config():
    return nested_config()


@pytest.fixture()
def layers(config):
    return walk(config).layers


@pytest.mark.parametrize(
    ("assignment", "others", "batchnorm"),
    [
        (Assignment.freeze(), False, False),
        (Assignment.freeze(bn_inference=True), None, False),
        (Assignment.freeze(train_bn=True), False, True),
        (Assignment.unfreeze(), True, True),
        (Assignment.unfreeze(keep_bn_inference=True), True, False),
    ],
    ids=["freeze", "bn-inference", "train-bn", "unfreeze", "keep-bn-inference"],
)
def test_recipes(assignment, others, batchnorm):
    assert (assignment.others, assignment.batchnorm) == (others, batchnorm)


def test_bn_inference_touches_only_bn(layers):
    before = current_flags(layers)
    after = assign(layers, before, select(layers), Assignment.freeze(bn_inference=True))
    assert [c.path for c in changes(layers, before, after)] == [
        "bn1",
        "backbone/bn2",
        "backbone/inner/bn3",
        "head_bn",
    ]
    # No container flag changes: only BN leaves were set.
    assert after["backbone"] is True and after["backbone/inner"] is True


def test_full_selection_sets_containers_as_keras_would(layers):
    before = current_flags(layers)
    after = assign(layers, before, select(layers), Assignment.freeze())
    assert after["backbone"] is False and after["backbone/inner"] is False
    assert after["image"] is None and after["backbone/bb_in"] is None  # InputLayers: no flag
    got = changes(layers, before, after)
    assert got[0] == Change("conv1", "Conv2D", False, True, False)
    assert [c.path for c in got] == [
        "conv1",
        "bn1",
        "backbone",
        "backbone/conv2",
        "backbone/bn2",
        "backbone/inner",
        "backbone/inner/bn3",
        "head_bn",
        "head",
    ]


def test_partial_selection_leaves_the_container_alone(layers):
    before = current_flags(layers)
    chosen = select(layers, layers=["backbone/conv2"])
    after = assign(layers, before, chosen, Assignment.freeze())
    assert [c.path for c in changes(layers, before, after)] == ["backbone/conv2"]


def test_train_bn_container_follows_others(layers):
    before = current_flags(layers)
    chosen = select(layers, layers=["backbone"])
    after = assign(layers, before, chosen, Assignment.freeze(train_bn=True))
    assert after["backbone"] is False  # Keras: backbone.trainable = False ...
    assert after["backbone/bn2"] is True  # ... then each BN leaf back to True
    assert after["backbone/inner/bn3"] is True
    assert after["backbone/conv2"] is False


def test_no_change_gives_no_changes(layers):
    before = current_flags(layers)
    after = assign(layers, before, select(layers), Assignment.unfreeze())
    assert changes(layers, before, after) == ()


def test_with_flags_returns_new_records(layers):
    flags = current_flags(layers) | {"bn1": False}
    new = with_flags(layers, flags)
    assert next(r for r in new if r.path == "bn1").trainable is False
    assert next(r for r in layers if r.path == "bn1").trainable is True
    assert [r.path for r in new] == [r.path for r in layers]


def test_apply_to_config_edits_only_trainable_and_copies(config, layers):
    original = copy.deepcopy(config)
    before = current_flags(layers)
    after = assign(layers, before, select(layers), Assignment.unfreeze(keep_bn_inference=True))
    new = apply_to_config(config, layers, after)
    assert config == original  # the input is not mutated
    for record in walk(new).layers:
        if record.is_batchnorm:
            assert record.trainable is False
    # Nothing but "trainable" values differ.
    flat_old = json.dumps(original).replace("true", "X").replace("false", "X")
    flat_new = json.dumps(new).replace("true", "X").replace("false", "X")
    assert flat_old == flat_new


def test_layers_without_a_stored_flag_are_never_given_one():
    """Keras records some operations as layers without a trainable key (MobileNetV3's
    ``keras.src.ops.numpy.Add``); their constructors reject one, so it must not be added."""
    config = nested_config()
    op = {"module": "keras.src.ops.numpy", "class_name": "Add", "config": {"name": "add"}}
    config["config"]["layers"][3]["config"]["layers"].append(op)  # inside backbone
    records = walk(config).layers
    assert [r.path for r in editable(config, records)] == [
        r.path for r in records if r.path not in ("image", "backbone/bb_in", "backbone/add")
    ]
    assert not stores_flag(config, next(r for r in records if r.path == "backbone/add"))
    selected = editable(config, select(records))
    after = assign(
        records,
        current_flags(records),
        selected,
        Assignment.freeze(),
        without_flag={"backbone/add"},
    )
    assert after["backbone"] is False  # the op does not keep its container from being set
    assert after["backbone/add"] is None  # unchanged: an operation has no flag
    new = apply_to_config(config, records, after)
    assert new["config"]["layers"][3]["config"]["layers"][-1] == op
    with pytest.raises(ValueError, match="no trainable flag to set"):
        apply_to_config(config, records, after | {"backbone/add": False})
