"""Renderers: pure functions from a report to Rich renderables or strings.

A synthetic 1,000-layer model (built as a config, no Keras) checks that the default view stays
readable at 80 and 100 columns: every BN layer's name on one line, intact, and no line wider
than the terminal.
"""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from bnfreeze.model.records import (
    Finding,
    FitBehaviour,
    LayerKind,
    LayerRecord,
    LayerState,
    ModelFile,
    ModelFormat,
    Normalization,
    WarningCode,
)
from bnfreeze.ops.inspect import inspect_model_file
from bnfreeze.render import findings as findings_render
from bnfreeze.render import table
from bnfreeze.render.json import dumps_by_line, render_report, report_dict


def render(renderable, width: int) -> str:
    console = Console(
        file=io.StringIO(),
        width=width,
        color_system=None,
        force_terminal=False,
        highlight=False,
        soft_wrap=False,
        legacy_windows=False,
    )
    console.print(renderable)
    return console.file.getvalue()


def _layer(class_name: str, name: str, trainable: bool = True, **extra) -> dict:
    config = {"name": name, "trainable": trainable, **extra}
    return {"class_name": class_name, "config": config, "module": "keras.layers"}


def _container(name: str, layers: list[dict], trainable: bool = True) -> dict:
    return {
        "class_name": "Functional",
        "module": "keras.src.models.functional",
        "config": {"name": name, "trainable": trainable, "layers": layers},
    }


def big_model(blocks: int = 92) -> ModelFile:
    """~1,000 layers: an EfficientNet-like backbone with long names, a nested sub-model, and
    a head. Every fourth block is frozen, so containers mix training and inference BN."""
    layers = [{"class_name": "InputLayer", "config": {"name": "input_1"}, "module": "keras.layers"}]
    for b in range(blocks):
        frozen = b % 4 == 0
        prefix = f"block{b // 7 + 1}{chr(ord('a') + b % 7)}"
        layers += [
            _layer("Conv2D", f"{prefix}_expand_conv", not frozen),
            _layer("BatchNormalization", f"{prefix}_expand_bn", not frozen),
            _layer("Activation", f"{prefix}_expand_activation"),
            _layer("DepthwiseConv2D", f"{prefix}_dwconv2", not frozen),
            _layer("BatchNormalization", f"{prefix}_bn", not frozen),
            _layer("GlobalAveragePooling2D", f"{prefix}_se_squeeze"),
            _layer("Conv2D", f"{prefix}_se_reduce", not frozen),
            _layer("Conv2D", f"{prefix}_project_conv", not frozen),
            _layer("BatchNormalization", f"{prefix}_project_bn", not frozen),
            _layer("Dropout", f"{prefix}_drop"),
            _layer("Add", f"{prefix}_add"),
        ]
    inner = _container(
        "feature_pyramid_with_a_rather_long_name",
        [
            _layer("Conv2D", "lateral_conv_p5"),
            _layer("BatchNormalization", "lateral_bn_p5"),
            _container("deeper", [_layer("BatchNormalization", "deepest_bn_with_long_name")]),
        ],
        trainable=False,
    )
    backbone = _container("efficientnetv2-l", [*layers, inner], trainable=False)
    head = [_layer("GlobalAveragePooling2D", "avg_pool"), _layer("Dense", "predictions")]
    config = _container(
        "fine_tuned_model",
        [
            {"class_name": "InputLayer", "config": {"name": "image"}, "module": "keras.layers"},
            backbone,
            *head,
        ],
    )
    return ModelFile(
        path="synthetic/fine_tuned_model.keras",
        format=ModelFormat.KERAS,
        config=config,
        keras_version="3.15.1",
        compiled=True,
        optimizer_variables=None,
    )


@pytest.fixture(scope="module")
def big_report():
    report = inspect_model_file(big_model())
    assert len(report.layers) > 1000
    return report


@pytest.mark.parametrize("width", [80, 100, 120])
def test_big_model_every_bn_name_intact_on_one_line(big_report, width):
    out = render(table.inspect_view(big_report), width)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= width
    assert all(line == line.rstrip() for line in lines)
    for state in big_report.batchnorm:
        name = state.layer.name
        indent = " " * (table.INDENT * state.layer.depth)
        assert any(line.startswith(indent + name + " ") for line in lines), name
    # one row per BN layer and per container above one, plus summary, header and legend
    rows = table.layer_rows(big_report, all_layers=False)
    assert len(lines) < len(rows) + 20


def test_big_model_all_layers_at_80_columns(big_report):
    out = render(table.inspect_view(big_report, all_layers=True), 80)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert len(lines) >= len(big_report.layers)
    assert "    deepest_bn_with_long_name " in out  # depth 2: four spaces


def test_class_column_is_cut_before_the_path():
    report = inspect_model_file(big_model(blocks=3))
    wide = render(table.layer_table(report, all_layers=True), 120)
    assert "GlobalAveragePooling2D" in wide and "…" not in wide
    out = render(table.layer_table(report, all_layers=True), 92)
    assert "BatchNormalization" not in out and " BN " in out  # the short label first
    assert "GlobalAverage" in out and "GlobalAveragePooling2D" not in out  # then cut
    assert "    lateral_bn_p5 " in out  # the path is intact
    assert "  feature_pyramid_with_a_rather_long_name " in out
    narrow = render(table.layer_table(report, all_layers=True), 50)
    header = next(line for line in narrow.splitlines() if line.startswith("path "))
    assert "class" not in header  # hidden, not squeezed to nothing
    assert max(len(line) for line in narrow.splitlines()) <= 50


def test_container_rows_summarise_their_bn_layers(big_report):
    backbone = big_report.state("efficientnetv2-l")
    summary = table._container_summary(big_report, backbone).plain
    training, inference = table._bn_counts(big_report, backbone)
    assert summary == f"{training} training, {inference} inference"
    assert training and inference
    deeper = big_report.state("efficientnetv2-l/feature_pyramid_with_a_rather_long_name/deeper")
    assert table._container_summary(big_report, deeper).plain == "1 training"


def test_default_rows_are_bn_layers_and_their_containers(big_report):
    rows = table.layer_rows(big_report, all_layers=False)
    paths = {s.layer.path for s in rows}
    for state in rows:
        assert state.layer.is_batchnorm or state.layer.is_container
        if state.layer.parent is not None:
            assert state.layer.parent in paths
    assert {s.layer.path for s in big_report.batchnorm} <= paths
    assert table.layer_rows(big_report, all_layers=True) == list(big_report.layers)


def test_tree_nests_and_fits(big_report):
    out = render(table.inspect_view(big_report, tree=True), 100)
    assert "└── deeper (Functional)" in out or "├── deeper (Functional)" in out
    assert "deepest_bn_with_long_name (BatchNormalization)  training" in out


def _state(
    kind: LayerKind, *, trains=None, normalizes=None, updates=None, trainable=True, class_name="X"
) -> LayerState:
    record = LayerRecord(
        path="p",
        name="p",
        class_name=class_name,
        kind=kind,
        depth=0,
        parent=None,
        trainable=trainable,
    )
    fit = FitBehaviour(
        trains_weights=trains, normalizes_with=normalizes, updates_moving_stats=updates
    )
    return LayerState(layer=record, has_weights=None, in_fit=fit, in_predict=fit)


@pytest.mark.parametrize("normalization", list(Normalization))
def test_mode_words_for_every_normalization(normalization):
    state = _state(LayerKind.BATCHNORM, trains=True, normalizes=normalization, updates=True)
    expected = {Normalization.BATCH: "training", Normalization.MOVING: "inference"}
    text = table.mode_text(state)
    assert text.plain == expected[normalization]
    assert (
        text.style
        == {Normalization.BATCH: table.STYLE_TRAINING, Normalization.MOVING: table.STYLE_INFERENCE}[
            normalization
        ]
    )


@pytest.mark.parametrize("kind", list(LayerKind))
@pytest.mark.parametrize("trains", [True, False, None])
def test_mode_words_for_every_kind(kind, trains):
    state = _state(kind, trains=trains)
    word = table.mode_text(state).plain
    if kind in (LayerKind.CONTAINER, LayerKind.WRAPPER):
        assert word == ""
    elif trains is True:
        assert word == "trains"
    elif trains is False:
        assert word == "frozen"
    else:
        assert word == ("unknown" if kind is LayerKind.UNKNOWN else "-")


def _finding(code: WarningCode, path: str | None, text: str = "it is wrong.") -> Finding:
    return Finding(code, path, f"{path or 'the model'}: {text}")


@pytest.mark.parametrize("code", list(WarningCode))
def test_warning_lines_every_code(code):
    lines = findings_render.warning_lines([_finding(code, "a/b")])
    assert lines == ["warning: a/b: it is wrong."]


def test_warning_lines_group_per_code():
    many = [_finding(WarningCode.UNTRAINED_BN_STATISTICS, f"bn_{i}") for i in range(53)]
    few = [_finding(WarningCode.CALL_SITE_TRAINING_IGNORED, f"base_{i}") for i in range(3)]
    lines = findings_render.warning_lines([*many[:1], *few, *many[1:]])
    assert lines == [
        "warning: bn_0: it is wrong.",
        "warning: 52 more untrained-bn-statistics warnings, for bn_1, bn_2, bn_3, bn_4 and 48 "
        "more (all listed by --json).",
        "warning: base_0: it is wrong.",
        "warning: base_1: it is wrong.",
        "warning: base_2: it is wrong.",
    ]


def test_warning_lines_wrap_with_a_hanging_indent():
    long = _finding(WarningCode.OPTIMIZER_STATE, None, "word " * 60)
    (entry,) = findings_render.warning_lines([long], width=60)
    lines = entry.split("\n")
    assert len(lines) > 3 and all(len(line) <= 60 for line in lines)
    assert lines[0].startswith("warning: ") and all(line.startswith(" " * 9) for line in lines[1:])
    (unwrapped,) = findings_render.warning_lines([long])
    assert "\n" not in unwrapped


def test_table_module_still_exports_warning_lines():
    assert table.warning_lines is findings_render.warning_lines


def test_no_bn_layers_says_so():
    config = _container("plain", [_layer("Dense", "d")])
    report = inspect_model_file(
        ModelFile(
            path="plain.keras",
            format=ModelFormat.KERAS,
            config=config,
            keras_version=None,
            compiled=False,
        )
    )
    out = render(table.inspect_view(report), 100)
    assert "No BatchNormalization layers. Use --all to list every layer." in out
    assert "Keras unknown, not compiled" in out
    assert "Dense" not in out
    every = render(table.inspect_view(report, all_layers=True), 100)
    # no weights file: whether Dense trains cannot be known, so "-"
    assert any(line.split() == ["d", "Dense", "True", "-", "-"] for line in every.splitlines())


def test_model_not_trainable_is_in_the_summary():
    config = _container("frozen_model", [_layer("BatchNormalization", "bn")], trainable=False)
    report = inspect_model_file(
        ModelFile(
            path="f.keras",
            format=ModelFormat.KERAS,
            config=config,
            keras_version="3.15.1",
            compiled=False,
        )
    )
    assert "trainable=False: fit() trains no weights" in render(table.summary(report), 100)


def test_renderers_are_pure(big_report, capsys):
    table.inspect_view(big_report)
    table.inspect_view(big_report, all_layers=True, tree=True)
    table.summary(big_report)
    findings_render.warning_lines(big_report.warnings, width=80)
    render_report(big_report)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize(
    "document",
    [
        {"a": 1, "b": [], "c": [{"x": "é", "y": None}, {"x": [1, 2]}], "d": {"e": True}},
        {"only": [1, 2, 3]},
        {},
    ],
)
def test_json_layout_round_trips(document):
    text = dumps_by_line(document)
    assert json.loads(text) == document
    assert list(json.loads(text)) == list(document)


def test_json_report_one_line_per_layer(big_report):
    text = render_report(big_report)
    assert json.loads(text) == report_dict(big_report)
    assert len(text.splitlines()) == len(big_report.layers) + len(big_report.warnings) + 11


@pytest.mark.parametrize("all_layers", [False, True])
def test_column_table_draws_what_rich_table_draws(big_report, all_layers):
    """When every cell fits, the layer table draws its lines itself (ten times faster than
    Rich's layout); the text must be exactly what Rich's own SIMPLE_HEAD table draws."""
    layer_table = table.layer_table(big_report, all_layers)
    natural = layer_table.natural_width()
    fast = render(table.Trimmed(layer_table), natural)
    rich_table = table.simple_table()
    for header in table.HEADERS:
        rich_table.add_column(header, no_wrap=True)
    for row in layer_table.rows:
        rich_table.add_row(*row)
    assert fast == render(table.Trimmed(rich_table), natural)
    assert len(fast.splitlines()) == len(layer_table.rows) + 2
    # One column narrower and it narrows itself (the class label first), still in the width.
    narrower = render(table.Trimmed(layer_table), natural - 1)
    assert narrower != fast
    assert max(len(line) for line in narrower.splitlines()) <= natural - 1


def test_change_table_layout():
    from bnfreeze.model.assignments import Change
    from bnfreeze.render.edit import change_table

    changes = tuple(
        Change(
            path=f"backbone/block{i}_bn",
            class_name="BatchNormalization",
            before=True,
            after=False,
            is_batchnorm=True,
        )
        for i in range(30)
    )
    fast = change_table(changes)
    wide = render(table.Trimmed(fast), fast.natural_width())
    assert wide.splitlines()[2] == "backbone/block0_bn   BatchNormalization  True → False"
    narrow = render(table.Trimmed(fast), 40)
    assert narrow.splitlines()[2] == "backbone/block0_bn   BN     True → False"


def test_a_measured_problem_is_wrapped_like_a_finding_at_80_columns():
    from bnfreeze.render.findings import PREFIX, warning_text

    message = "1 training-mode BatchNormalization layer normalized over 2 samples, " * 3
    wrapped = warning_text(message.strip(), 80).splitlines()
    assert len(wrapped) > 1 and all(len(line) <= 80 for line in wrapped)
    assert wrapped[0].startswith(PREFIX)
    assert all(line.startswith(" " * len(PREFIX)) for line in wrapped[1:])
    assert warning_text("short", None) == PREFIX + "short"
