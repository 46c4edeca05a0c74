"""The walk: a saved config, recursively, as flat LayerRecords. Pure config, no Keras.

The configs here are written in the shapes Keras 3 and tf_keras save (checked against real
files in tests/model/test_modes_measured.py, which walks what Keras itself wrote).
"""

from __future__ import annotations

import copy
import json
import re
import zipfile
from typing import Any

import pytest
from keras_configs import functional, input_layer, layer, node, sequential
from paths import SAMPLES

from bnfreeze.errors import ModelFormatError
from bnfreeze.limits import MAX_NESTING_DEPTH
from bnfreeze.model.records import LayerKind
from bnfreeze.model.walk import ancestors, call_kwargs, classify, descendants, walk


def deep_config() -> dict:
    """Functional > Sequential > Functional > BN: the BN is at depth 3."""
    inner = functional("inner", [input_layer("inner_in"), layer("BatchNormalization", "bn")])
    middle = sequential("middle", [input_layer("mid_in"), inner, layer("Dense", "dense", units=2)])
    outer = functional(
        "outer",
        [input_layer("outer_in"), middle],
        trainable=False,
        inbound=node(training=False, mask=None),
    )
    return functional("model", [input_layer("x"), outer, layer("Dense", "head", units=1)])


def at(config: dict, config_path: tuple) -> Any:
    for key in config_path:
        config = config[key]
    return config


# --- structure ------------------------------------------------------------------------------


def test_nested_three_deep_paths_depths_parents():
    walked = walk(deep_config())
    rows = [(r.path, r.depth, r.parent, r.kind) for r in walked.layers]
    assert rows == [
        ("x", 0, None, LayerKind.INPUT),
        ("outer", 0, None, LayerKind.CONTAINER),
        ("outer/outer_in", 1, "outer", LayerKind.INPUT),
        ("outer/middle", 1, "outer", LayerKind.CONTAINER),
        ("outer/middle/mid_in", 2, "outer/middle", LayerKind.INPUT),
        ("outer/middle/inner", 2, "outer/middle", LayerKind.CONTAINER),
        ("outer/middle/inner/inner_in", 3, "outer/middle/inner", LayerKind.INPUT),
        ("outer/middle/inner/bn", 3, "outer/middle/inner", LayerKind.BATCHNORM),
        ("outer/middle/dense", 2, "outer/middle", LayerKind.LAYER),
        ("head", 0, None, LayerKind.LAYER),
    ]
    assert (walked.name, walked.class_name, walked.trainable) == ("model", "Functional", True)


def test_config_path_locates_each_layer_dict():
    config = deep_config()
    for record in walk(config).layers:
        assert at(config, record.config_path)["config"]["name"] == record.name


def test_flags_are_each_layers_own():
    """Stored verbatim: a frozen container does not make its children frozen
    (docs/semantics.md, rule 3)."""
    flags = {r.path: r.trainable for r in walk(deep_config()).layers}
    assert flags["outer"] is False
    assert flags["outer/middle"] is True and flags["outer/middle/inner/bn"] is True
    assert flags["x"] is None  # InputLayer has no flag
    assert flags["head"] is True


def test_missing_trainable_key_means_true():
    config = functional("m", [layer("BatchNormalization", "bn")])
    del config["config"]["layers"][0]["config"]["trainable"]
    del config["config"]["trainable"]
    walked = walk(config)
    assert walked.trainable is True and walked.layers[0].trainable is True


def test_ancestors_and_descendants():
    layers = walk(deep_config()).layers
    bn = next(r for r in layers if r.name == "bn")
    assert [r.path for r in ancestors(layers, bn)] == [
        "outer/middle/inner",
        "outer/middle",
        "outer",
    ]
    middle = next(r for r in layers if r.path == "outer/middle")
    assert [r.name for r in descendants(layers, middle)] == [
        "mid_in",
        "inner",
        "inner_in",
        "bn",
        "dense",
    ]


def test_a_subclassed_model_without_layers_is_walked_as_empty():
    walked = walk({"class_name": "MyModel", "config": {"name": "m", "trainable": True}})
    assert walked.layers == () and walked.lists_layers is False


# --- wrappers -------------------------------------------------------------------------------


def test_time_distributed_bn():
    td = layer("TimeDistributed", "td", layer=layer("BatchNormalization", "td_bn"))
    td["config"]["trainable"] = False
    records = walk(functional("m", [td])).layers
    rows = [(r.path, r.kind, r.parent, r.depth, r.trainable) for r in records]
    assert rows == [
        ("td", LayerKind.WRAPPER, None, 0, False),
        ("td/td_bn", LayerKind.BATCHNORM, "td", 1, True),
    ]


def test_bidirectional_has_two_inner_layers():
    """Keras 3 saves the forward layer under "layer" with its own name (forward_lstm)."""
    bidi = layer(
        "Bidirectional",
        "bidi",
        merge_mode="concat",
        layer=layer("LSTM", "forward_lstm", units=3),
        backward_layer=layer("LSTM", "backward_lstm", units=3, go_backwards=True),
    )
    paths = [r.path for r in walk(functional("m", [bidi])).layers]
    assert paths == ["bidi", "bidi/forward_lstm", "bidi/backward_lstm"]


def test_wrapper_of_a_nested_model():
    td = layer("TimeDistributed", "td", layer=sequential("seq", [layer("BatchNormalization", "b")]))
    records = walk(functional("m", [td])).layers
    assert [(r.path, r.depth) for r in records] == [("td", 0), ("td/seq", 1), ("td/seq/b", 2)]


def test_dtype_policy_dict_is_not_a_wrapped_layer():
    """Keras 3 serializes dtype as {"class_name": "DTypePolicy", ...}: not a layer."""
    dense = layer(
        "Dense",
        "d",
        dtype={
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": "float32"},
            "registered_name": None,
        },
    )
    assert classify(dense) is LayerKind.LAYER


# --- call-site kwargs -------------------------------------------------------------------------


def test_keras3_dict_form_inbound_nodes():
    record = walk(deep_config()).layers[1]
    assert record.path == "outer"
    assert record.call_kwargs == ({"training": False, "mask": None},)
    assert record.call_training is False


def test_tf_keras_list_form_inbound_nodes():
    entry = layer("BatchNormalization", "bn", inbound=[[["input_1", 0, 0, {"training": False}]]])
    del entry["module"], entry["registered_name"]
    assert call_kwargs(entry) == ({"training": False},)
    record = walk(functional("m", [entry])).layers[0]
    assert record.call_training is False


def test_tf_keras_list_form_without_kwargs():
    entry = layer("Dense", "d", inbound=[[["input_1", 0, 0]], [["input_2", 0, 0, {}]]])
    assert call_kwargs(entry) == ({},)
    assert walk(functional("m", [entry])).layers[0].call_training is None


def test_no_inbound_nodes_inside_a_sequential():
    records = walk(sequential("s", [layer("BatchNormalization", "bn")])).layers
    assert records[0].call_kwargs == () and records[0].call_training is None


def test_training_true_and_several_call_sites():
    entry = layer("BatchNormalization", "bn", inbound=node(mask=None) + node(training=True))
    record = walk(functional("m", [entry])).layers[0]
    assert record.call_training is True
    assert len(record.call_kwargs) == 2


@pytest.mark.parametrize("nodes", [None, "x", [1, "a", None], [{"kwargs": "x"}], [[["a", 0]]]])
def test_odd_inbound_nodes_are_ignored_not_fatal(nodes):
    entry = layer("Dense", "d")
    entry["inbound_nodes"] = nodes
    assert call_kwargs(entry) == ()


# --- which layers are BN ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "kind"),
    [
        (layer("BatchNormalization", "b"), LayerKind.BATCHNORM),
        (layer("BatchNormalization", "b", synchronized=True), LayerKind.BATCHNORM),
        (
            layer("SyncBatchNormalization", "b", module="keras.layers.experimental"),
            LayerKind.BATCHNORM,
        ),
        (layer("LayerNormalization", "n"), LayerKind.NORMALIZATION),
        (layer("GroupNormalization", "n", groups=2), LayerKind.NORMALIZATION),
        (layer("UnitNormalization", "n"), LayerKind.NORMALIZATION),
        (layer("RMSNormalization", "n"), LayerKind.NORMALIZATION),
        (layer("Normalization", "n"), LayerKind.NORMALIZATION),
        (
            layer("SpectralNormalization", "n", layer=layer("Dense", "d", units=2)),
            LayerKind.WRAPPER,
        ),
        (layer("Dense", "d", units=2), LayerKind.LAYER),
        (layer("Add", "add", module="keras.src.ops.numpy"), LayerKind.LAYER),
        (input_layer("i"), LayerKind.INPUT),
    ],
    ids=lambda v: v["class_name"] if isinstance(v, dict) else v.name,
)
def test_classify(entry, kind):
    assert classify(entry) is kind
    record = walk(functional("m", [entry])).layers[0]
    assert record.kind is kind
    assert record.is_batchnorm is (kind is LayerKind.BATCHNORM)


def test_a_keras_operation_has_no_flag():
    """``x + 3`` in a Functional graph, exactly as MobileNetV3's config saves it."""
    op = {
        "module": "keras.src.ops.numpy",
        "class_name": "Add",
        "config": {"name": "add"},
        "registered_name": "Add",
        "name": "add",
        "inbound_nodes": [],
    }
    dense = layer("Dense", "d", units=2)
    del dense["config"]["trainable"]
    records = walk(functional("m", [op, dense])).layers
    assert [(r.kind, r.trainable, r.custom) for r in records] == [
        (LayerKind.LAYER, None, False),
        (LayerKind.LAYER, True, False),  # a layer without the key: Keras's default, True
    ]


def test_tf_keras_sync_batchnorm_without_module():
    """Old tf_keras configs record neither module nor registered_name."""
    entry = {"class_name": "SyncBatchNormalization", "config": {"name": "b", "trainable": True}}
    assert classify(entry) is LayerKind.BATCHNORM


def test_synchronized_scale_center_renorm_are_recorded():
    entries = [
        layer("BatchNormalization", "plain"),
        layer("BatchNormalization", "sync", synchronized=True),
        layer("BatchNormalization", "bare", scale=False, center=False),
        layer("BatchNormalization", "renorm", renorm=True),
    ]
    records = {r.name: r for r in walk(functional("m", entries)).layers}
    assert (records["plain"].synchronized, records["sync"].synchronized) == (False, True)
    assert (records["plain"].scale, records["plain"].center) == (True, True)
    assert (records["bare"].scale, records["bare"].center) == (False, False)
    assert (records["plain"].renorm, records["renorm"].renorm) == (False, True)


@pytest.mark.parametrize(
    "entry",
    [
        layer("MyLayer", "mine", module="my_package.layers", registered_name="my_package>MyLayer"),
        # A custom BN subclass saved under the built-in name from its own module: only a
        # loaded model could tell what it does, so it is unknown, not BN.
        layer(
            "BatchNormalization",
            "bn",
            module="my_package.layers",
            registered_name="my_package>BatchNormalization",
        ),
        layer("FancyBN", "fancy", module=None, registered_name="Custom>FancyBN"),
    ],
    ids=["custom-layer", "custom-bn-subclass", "registered-only"],
)
def test_custom_classes_are_kept_as_unknown(entry):
    config = functional("m", [input_layer("x"), entry, layer("Dense", "d")])
    records = walk(config).layers
    assert [r.name for r in records] == ["x", entry["config"]["name"], "d"]
    custom = records[1]
    assert custom.kind is LayerKind.UNKNOWN and custom.custom is True
    assert custom.is_batchnorm is False


def test_custom_wrapper_is_decided_before_its_structure():
    """Issue 11 item 1 (measured with a real step in tests/model/test_modes_adversarial.py): a
    registered Wrapper subclass keeps its inner layer under "layer", but its call() decides."""
    inner = layer("BatchNormalization", "inner_bn")
    keras3 = layer(
        "InferenceWrapper", "wrap", module=None, registered_name="adversarial>InferenceWrapper"
    )
    keras3["config"]["layer"] = inner
    legacy = {
        "class_name": "adversarial>InferenceWrapper",
        "config": {"name": "wrap2", "layer": inner},
    }
    builtin = layer("TimeDistributed", "td")
    builtin["config"]["layer"] = layer("BatchNormalization", "td_bn")
    records = walk(functional("m", [input_layer("x"), keras3, legacy, builtin])).layers
    kinds = {r.path: r.kind for r in records}
    assert kinds == {
        "x": LayerKind.INPUT,
        "wrap": LayerKind.UNKNOWN,
        "wrap2": LayerKind.UNKNOWN,
        "td": LayerKind.WRAPPER,
        "td/td_bn": LayerKind.BATCHNORM,
    }


def test_builtins_are_not_custom():
    records = walk(deep_config()).layers
    assert not any(r.custom for r in records)
    assert next(r for r in records if r.name == "bn").module == "keras.layers"


# --- real files -----------------------------------------------------------------------------


def _config(name: str) -> dict:
    with zipfile.ZipFile(SAMPLES / name) as archive:
        return json.loads(archive.read("config.json"))


def test_guide_pattern_sample_paths():
    walked = walk(_config("guide_pattern.keras"))
    bns = [r for r in walked.layers if r.is_batchnorm]
    assert len(bns) == 51
    assert {r.parent for r in bns} == {"mobilenetv2_0.35_32"}
    assert "mobilenetv2_0.35_32/block_1_expand_BN" in {r.path for r in bns}
    base = next(r for r in walked.layers if r.path == "mobilenetv2_0.35_32")
    assert base.call_training is False and base.trainable is False


def test_walking_does_not_change_the_config():
    config = _config("bn_under_frozen.keras")
    before = copy.deepcopy(config)
    walk(config)
    assert config == before


# --- config-level validation ------------------------------------------------------------------


def _with(mutate) -> dict:
    config = deep_config()
    mutate(config)
    return config


def _bn(config: dict) -> dict:
    return config["config"]["layers"][1]["config"]["layers"][1]["config"]["layers"][1]["config"][
        "layers"
    ][1]


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (
            lambda c: c["config"].__setitem__("trainable", "false"),
            "model 'model' has trainable='false'; it must be true or false",
        ),
        (
            lambda c: _bn(c)["config"].__setitem__("trainable", "yes"),
            "layer 'outer/middle/inner/bn' has trainable='yes'",
        ),
        (lambda c: _bn(c)["config"].__setitem__("trainable", 1), "has trainable=1"),
        (lambda c: _bn(c).pop("class_name"), "a layer of outer/middle/inner has no class_name"),
        (lambda c: _bn(c).__setitem__("class_name", ["BatchNormalization"]), "has no class_name"),
        (lambda c: _bn(c).__setitem__("config", []), "has no config"),
        (lambda c: _bn(c)["config"].pop("name"), "has no name"),
        (lambda c: _bn(c)["config"].__setitem__("name", ""), "has no name"),
        (
            lambda c: c["config"].__setitem__("layers", {"0": {}}),
            "'layers' of the model is not a list",
        ),
        (
            lambda c: c["config"]["layers"][1]["config"].__setitem__("layers", {}),
            "'layers' of outer is not a list",
        ),
        (
            lambda c: c["config"]["layers"].__setitem__(2, ["Dense", "head"]),
            "a layer of the model is not an object",
        ),
        (
            lambda c: c["config"]["layers"].append(layer("Dense", "head")),
            "two layers have the path 'head'",
        ),
        (lambda c: c.__setitem__("config", []), "the model config is not an object"),
    ],
    ids=[
        "root-trainable-string",
        "trainable-string",
        "trainable-int",
        "missing-class-name",
        "class-name-list",
        "config-list",
        "missing-name",
        "empty-name",
        "root-layers-dict",
        "nested-layers-dict",
        "layer-list",
        "duplicate-path",
        "root-config-list",
    ],
)
def test_config_errors(mutate, words):
    with pytest.raises(ModelFormatError, match=re.escape(words)) as info:
        walk(_with(mutate), "model.keras")
    assert str(info.value).startswith("model.keras: ")
    assert "\n" not in str(info.value)


def test_nesting_deeper_than_the_limit_is_refused():
    config: dict = layer("BatchNormalization", "bn")
    for i in range(MAX_NESTING_DEPTH + 2):
        config = sequential(f"s{i}", [config])
    with pytest.raises(ModelFormatError, match="nested more than"):
        walk(functional("m", [config]))


def test_nesting_at_the_limit_is_walked():
    config: dict = layer("BatchNormalization", "bn")
    for i in range(MAX_NESTING_DEPTH):
        config = sequential(f"s{i}", [config])
    records = walk(functional("m", [config])).layers
    assert records[-1].depth == MAX_NESTING_DEPTH and records[-1].is_batchnorm
