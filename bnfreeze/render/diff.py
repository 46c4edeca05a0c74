"""Renderers for ``diff``: the changed layers, the weights verdict, and the JSON contract."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bnfreeze.model.records import LayerState
from bnfreeze.ops.diff import DiffResult, LayerDiff, LayerStatus
from bnfreeze.render.columns import Column, ColumnTable, Kind
from bnfreeze.render.json import (
    SCHEMA_VERSION,
    behaviour_dict,
    dumps,
    model_dict,
    runtime_dict,
)
from bnfreeze.render.table import STYLE_NONE, Trimmed, mode_text

#: At most this many changed dataset names are listed in the terminal (all are in --json).
DATASETS_SHOWN = 5


def _flag(state: LayerState | None) -> Text:
    if state is None:
        return Text("absent", style=STYLE_NONE)
    value = state.layer.trainable
    return Text("-" if value is None else str(value), style=STYLE_NONE if value is None else "")


def _mode(state: LayerState | None) -> Text:
    if state is None:
        return Text("absent", style=STYLE_NONE)
    return mode_text(state)


def _arrow(a: Text, b: Text, changed: bool) -> Text:
    text = Text()
    text.append_text(a)
    text.append(" → " if changed else "   ", style=STYLE_NONE)
    text.append_text(b if changed else Text(""))
    return text


def shown_rows(result: DiffResult) -> tuple[LayerDiff, ...]:
    """The rows the compact view lists: every layer whose ``fit()`` behaviour differs, every
    layer only in one model, and containers (they head their layers). A layer whose flag alone
    changed and that does nothing different in ``fit()`` (it has no weights) is unchanged
    context: :func:`context_line` counts those (``--json`` lists every one)."""
    return tuple(
        row
        for row in result.layers
        if row.status is not LayerStatus.CHANGED
        or row.fit_changed
        or (row.a is not None and row.a.layer.is_container)
    )


def context_line(result: DiffResult) -> Text | None:
    """One line for the unchanged context: layers whose flag changed, ``fit()`` unchanged."""
    shown = set(shown_rows(result))
    hidden = [row for row in result.layers if row not in shown]
    if not hidden:
        return None
    flips: dict[str, int] = {}
    for row in hidden:
        assert row.a is not None and row.b is not None
        key = f"{row.a.layer.trainable} → {row.b.layer.trainable}"
        flips[key] = flips.get(key, 0) + 1
    said = ", ".join(f"{n} {key}" for key, n in flips.items())
    count = len(hidden)
    return Text(
        f"and {count} layer{'s' if count != 1 else ''} without weights whose flag changed "
        f"({said}) and whose fit() does not (--json lists them).",
        style=STYLE_NONE,
    )


def layers_table(result: DiffResult) -> ColumnTable:
    """One line per layer whose ``fit()`` behaviour differs (:func:`shown_rows`), laid out for
    the width (:mod:`bnfreeze.render.columns`): a layer only in one model reads "absent" on the
    other side. The two change columns never wrap: the class column gives way first."""
    rows = []
    for row in shown_rows(result):
        path = Text(row.path)
        flag_changed = row.status is not LayerStatus.CHANGED or row.flag_changed
        mode_changed = row.status is not LayerStatus.CHANGED or row.fit_changed
        rows.append(
            (
                path,
                Text(row.class_name),
                _arrow(_flag(row.a), _flag(row.b), flag_changed),
                _arrow(_mode(row.a), _mode(row.b), mode_changed),
            )
        )
    columns = (
        Column("path", Kind.PATH, group=True),
        Column("class", Kind.CLASS),
        Column("trainable", Kind.FIXED),
        Column("in fit()", Kind.FIXED),
    )
    return ColumnTable(columns, rows)


def facts(result: DiffResult) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    a, b = result.training_layers_a, result.training_layers_b
    delta = b - a
    grid.add_row(
        "Training layers",
        f"{a} → {b} ({delta:+d}) layers whose weights train in fit()",
    )
    grid.add_row(
        "BN in fit()",
        f"{result.a.bn_training_in_fit} training / {result.a.bn_inference_in_fit} inference → "
        f"{result.b.bn_training_in_fit} training / {result.b.bn_inference_in_fit} inference",
    )
    weights = result.weights
    if weights.identical:
        grid.add_row("Weights", Text(f"weights identical ({weights.datasets} datasets)", "green"))
    else:
        text = Text("weights differ", style="bold red")
        parts = []
        if weights.changed:
            parts.append(f"{len(weights.changed)} of {weights.datasets} datasets changed")
        if weights.only_in_a:
            parts.append(f"{len(weights.only_in_a)} only in A")
        if weights.only_in_b:
            parts.append(f"{len(weights.only_in_b)} only in B")
        text.append(": " + ", ".join(parts))
        shown = weights.changed_layers or weights.changed
        if shown:
            text.append("\n" + ", ".join(shown[:DATASETS_SHOWN]), style=STYLE_NONE)
            if len(shown) > DATASETS_SHOWN:
                text.append(f" … and {len(shown) - DATASETS_SHOWN} more (see --json)", STYLE_NONE)
        grid.add_row("Weights", text)
    if weights.optimizer_a or weights.optimizer_b:
        if weights.optimizer_identical:
            state = f"identical ({weights.optimizer_a} datasets)"
        else:
            state = f"{_count(weights.optimizer_a)} → {_count(weights.optimizer_b)}"
        grid.add_row("Optimizer state", state)
    return grid


def _count(n: int) -> str:
    return f"{n} variables" if n else "none"


def diff_view(result: DiffResult) -> RenderableType:
    head = Text()
    head.append("A", style="bold")
    head.append(f"  {result.a.model.path}\n")
    head.append("B", style="bold")
    head.append(f"  {result.b.model.path}")
    if result.layers:
        count = len(result.layers)
        parts: list[RenderableType] = [
            Text(
                f"{count} layer{'s differ' if count != 1 else ' differs'} in flag or fit() "
                "behaviour, A → B:",
                style="bold",
            ),
        ]
        if shown_rows(result):
            parts.append(layers_table(result))
        context = context_line(result)
        if context is not None:
            parts.append(context)
        body: RenderableType = Group(*parts)
    else:
        body = Text("No layer differs in flag or fit() behaviour.", style=STYLE_NONE)
    return Trimmed(Group(head, Text(""), body, Text(""), facts(result)))


def _side(state: LayerState | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {"trainable": state.layer.trainable, "in_fit": behaviour_dict(state.in_fit)}


def layer_dict(row: LayerDiff) -> dict[str, Any]:
    return {
        "path": row.path,
        "class_name": row.class_name,
        "status": row.status.value,
        "a": _side(row.a),
        "b": _side(row.b),
    }


def diff_dict(result: DiffResult) -> dict[str, Any]:
    weights = result.weights
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "diff",
        "a": model_dict(result.a.model),
        "b": model_dict(result.b.model),
        "runtime": runtime_dict(result.a.runtime),
        "layers": [layer_dict(row) for row in result.layers],
        "training_layers": {
            "a": result.training_layers_a,
            "b": result.training_layers_b,
            "change": result.training_layers_b - result.training_layers_a,
        },
        "weights": {
            "identical": weights.identical,
            "datasets": weights.datasets,
            "changed": list(weights.changed),
            "changed_layers": list(weights.changed_layers),
            "only_in_a": list(weights.only_in_a),
            "only_in_b": list(weights.only_in_b),
        },
        "optimizer_state": {
            "a": weights.optimizer_a,
            "b": weights.optimizer_b,
            "identical": weights.optimizer_identical,
        },
    }


def render_diff(result: DiffResult) -> str:
    return dumps(diff_dict(result))
