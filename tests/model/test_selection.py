"""Selection: globs, --up-to / --from, containers expanded to their leaves, clear errors."""

from __future__ import annotations

import pytest
from nested_configs import layer, model, nested_config

from bnfreeze.errors import SelectionError
from bnfreeze.model.records import LayerKind
from bnfreeze.model.selection import (
    find_layer,
    is_leaf,
    layers_from,
    layers_up_to,
    match_glob,
    select,
)
from bnfreeze.model.walk import walk


@pytest.fixture()
def layers():
    return walk(nested_config()).layers


def paths(records) -> list[str]:
    return [r.path for r in records]


def test_model_order_paths(layers):
    assert paths(layers) == [
        "image",
        "conv1",
        "bn1",
        "backbone",
        "backbone/bb_in",
        "backbone/conv2",
        "backbone/bn2",
        "backbone/inner",
        "backbone/inner/bn3",
        "head_bn",
        "head",
    ]


@pytest.mark.parametrize("kind", list(LayerKind))
def test_is_leaf_for_every_kind(kind):
    from bnfreeze.model.records import LayerRecord

    record = LayerRecord("x", "x", "X", kind, 0, None, True)
    not_leaves = (LayerKind.CONTAINER, LayerKind.WRAPPER, LayerKind.INPUT)
    assert is_leaf(record) is (kind not in not_leaves)


def test_no_selector_selects_every_leaf(layers):
    assert paths(select(layers)) == [
        "conv1",
        "bn1",
        "backbone/conv2",
        "backbone/bn2",
        "backbone/inner/bn3",
        "head_bn",
        "head",
    ]


def test_glob_on_container_selects_every_leaf_below(layers):
    assert paths(select(layers, layers=["backbone"])) == [
        "backbone/conv2",
        "backbone/bn2",
        "backbone/inner/bn3",
    ]


def test_glob_matches_names_and_paths_and_repeats_union(layers):
    assert paths(select(layers, layers=["bn*"])) == ["bn1", "backbone/bn2", "backbone/inner/bn3"]
    assert paths(select(layers, layers=["backbone/inner/*", "head"])) == [
        "backbone/inner/bn3",
        "head",
    ]
    assert match_glob(layers, "*conv*") == {"conv1", "backbone/conv2"}


def test_glob_that_matches_nothing_is_an_error(layers):
    with pytest.raises(SelectionError, match=r"--layers 'nope\*' matches no layer"):
        select(layers, layers=["bn*", "nope*"])


def test_up_to_is_inclusive_and_covers_a_container(layers):
    assert paths(select(layers, up_to="bn1")) == ["conv1", "bn1"]
    # Up to a container: everything below it too.
    assert paths(select(layers, up_to="backbone")) == [
        "conv1",
        "bn1",
        "backbone/conv2",
        "backbone/bn2",
        "backbone/inner/bn3",
    ]
    assert layers_up_to(layers, "conv1") == {"image", "conv1"}


def test_from_is_inclusive(layers):
    assert paths(select(layers, from_="backbone/inner")) == [
        "backbone/inner/bn3",
        "head_bn",
        "head",
    ]
    assert layers_from(layers, "head") == {"head"}


def test_selectors_intersect(layers):
    assert paths(select(layers, layers=["*bn*"], up_to="backbone")) == [
        "bn1",
        "backbone/bn2",
        "backbone/inner/bn3",
    ]
    assert paths(select(layers, layers=["backbone"], from_="backbone/bn2")) == [
        "backbone/bn2",
        "backbone/inner/bn3",
    ]


def test_empty_intersection_is_an_error(layers):
    with pytest.raises(SelectionError, match="matches no layer whose flag can be set"):
        select(layers, layers=["head"], up_to="bn1")


def test_selecting_only_an_input_layer_is_an_error(layers):
    with pytest.raises(SelectionError, match="matches no layer whose flag can be set"):
        select(layers, layers=["image"])


def test_find_layer_by_path_then_unique_name(layers):
    assert find_layer(layers, "backbone/bn2").path == "backbone/bn2"
    assert find_layer(layers, "bn3").path == "backbone/inner/bn3"


def test_unknown_layer_suggests_close_names(layers):
    with pytest.raises(SelectionError) as info:
        find_layer(layers, "bn_1")
    assert str(info.value).startswith("no layer named 'bn_1' in the model. Did you mean")
    assert "'bn1'" in str(info.value)


def test_unknown_layer_without_close_names_points_to_inspect(layers):
    with pytest.raises(SelectionError, match="Run bnfreeze inspect --all"):
        layers_up_to(layers, "zzzzzzzz")


def test_ambiguous_name_asks_for_a_path():
    config = model(
        "top",
        [
            layer("InputLayer", "x", None),
            model("a", [layer("BatchNormalization", "bn")]),
            model("b", [layer("BatchNormalization", "bn")]),
        ],
    )
    records = walk(config).layers
    with pytest.raises(SelectionError, match=r"ambiguous: a/bn, b/bn\. Use a full path\."):
        find_layer(records, "bn")
    assert find_layer(records, "b/bn").path == "b/bn"


def test_selection_on_a_real_sample(samples):
    from bnfreeze.formats.readers import read_model

    records = walk(read_model(samples / "guide_pattern.keras").config).layers
    chosen = select(records, layers=["mobilenetv2*"], up_to="block_1_project_BN")
    assert chosen[0].path == "mobilenetv2_0.35_32/Conv1"
    assert chosen[-1].path == "mobilenetv2_0.35_32/block_1_project_BN"
    assert all(r.path.startswith("mobilenetv2_0.35_32/") for r in chosen)


def test_suggestions_never_repeat_a_name():
    from bnfreeze.errors import SelectionError
    from bnfreeze.model.records import LayerKind, LayerRecord
    from bnfreeze.model.selection import find_layer

    head = LayerRecord(
        path="head",
        name="head",
        class_name="Dense",
        kind=LayerKind.LAYER,
        depth=0,
        parent=None,
        trainable=True,
    )
    try:
        find_layer((head,), "haed")
    except SelectionError as exc:
        assert str(exc).count("'head'") == 1, str(exc)
    else:
        raise AssertionError("expected a SelectionError")
