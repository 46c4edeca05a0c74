"""Renderers for ``freeze`` / ``unfreeze``: pure functions from an
:class:`~bnfreeze.ops.request.EditResult` to a Rich renderable or a JSON string.

The view is what changed (before → after per layer, then counts), then the new effective
modes in the ``inspect`` style (:func:`bnfreeze.render.table.inspect_view` of the result).
"""

from __future__ import annotations

import textwrap
from typing import Any

from rich.console import Group
from rich.text import Text

from bnfreeze.model.assignments import Change
from bnfreeze.ops.optimizer_state import OptimizerState
from bnfreeze.ops.request import EditResult
from bnfreeze.render.columns import Column, ColumnTable, Kind
from bnfreeze.render.json import (
    SCHEMA_VERSION,
    dumps,
    finding_dict,
    model_dict,
    report_dict,
    runtime_dict,
)
from bnfreeze.render.table import STYLE_NONE, Trimmed, flag_text, inspect_view


def _before_after(change: Change) -> Text:
    cell = flag_text(change.before)
    cell.append(" → ")
    cell.append_text(flag_text(change.after))
    return cell


CHANGE_COLUMNS = (
    Column("path", Kind.PATH, group=True),
    Column("class", Kind.CLASS),
    Column("trainable"),
)


def change_table(changes: tuple[Change, ...]) -> ColumnTable:
    """One row per changed layer: path, class, trainable before → after, laid out for the
    width as the ``inspect`` table is (:mod:`bnfreeze.render.columns`)."""
    return ColumnTable(
        CHANGE_COLUMNS, ((Text(c.path), Text(c.class_name), _before_after(c)) for c in changes)
    )


def change_counts(result: EditResult) -> Text:
    """ "12 layers changed (10 BN, 2 other) of 14 selected." ("would change" on a dry run),
    or why nothing changed."""
    selected = len(result.selected)
    if not result.changes:
        line = f"No flag changed: the {selected} selected layer(s) already had these flags."
        if result.bn_config_changes:
            line += f" {_bn_config(result)}"
        return Text(line, style=STYLE_NONE)
    bn = sum(1 for c in result.changes if c.is_batchnorm)
    # A dry run says so once, on stderr (status_line); here the verb carries it.
    verb = "would change" if result.dry_run else "changed"
    text = Text(f"{len(result.changes)} layer(s) {verb} ", style="bold")
    text.append(f"({bn} BN, {len(result.changes) - bn} other) of {selected} selected.")
    if result.bn_config_changes:
        text.append(f" {_bn_config(result)}")
    return text


def edit_view(result: EditResult, *, all_layers: bool = False) -> Trimmed:
    """Changes, counts, then the result in the ``inspect`` style."""
    parts: list[Any] = []
    if result.changes:
        parts += [change_table(result.changes), Text("")]
    parts += [change_counts(result), Text(""), inspect_view(result.report, all_layers=all_layers)]
    return Trimmed(Group(*parts))


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def status_line(result: EditResult) -> str:
    """The line for stderr that says what was written, then, when the saved optimizer state
    was remapped, that fact (:func:`optimizer_line`), wrapped at 80 columns."""
    lines = [_written(result)]
    fact = optimizer_line(result)
    if fact is not None:
        lines += textwrap.wrap(fact, width=79, subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines)


def _written(result: EditResult) -> str:
    if result.dry_run:
        return "dry run: nothing was written."
    if result.output is None:
        return f"nothing changed; {result.source} was left as it was."
    size = _size(result.output_bytes or 0)
    if not result.changes and not result.bn_config_changes:
        return f"wrote {result.output} ({size}), a copy of the input: no flag changed."
    return f"wrote {result.output} ({size}; input {_size(result.input_bytes)})."


def _bn_config(result: EditResult) -> str:
    verb = "would get" if result.dry_run else "got"
    return (
        f"{result.bn_config_changes} BN layer(s) {verb} a new class or synchronized value "
        "(config only)."
    )


def optimizer_line(result: EditResult) -> str | None:
    """A fact for stderr, not a warning: the saved optimizer state was remapped, and a plain
    ``keras.models.load_model`` restores it (measured on Keras 3.15: the iteration count and
    every kept slot load as written, with no message, and ``fit()`` continues from them)."""
    plan = result.optimizer_plan
    if result.optimizer_state is not OptimizerState.REMAPPED or plan is None:
        return None
    would = "would be" if result.dry_run else "were"
    return (
        f"optimizer state: the {result.optimizer_variables} saved optimizer variables {would} "
        f"remapped to the new trainable set ({plan.expected} now: {plan.kept} slots kept, "
        f"{plan.left_out} left out, {plan.created} zero-filled); load_model restores them and "
        "fit() continues from them."
    )


def change_dict(change: Change) -> dict[str, Any]:
    return {"path": change.path, "before": change.before, "after": change.after}


def edit_dict(result: EditResult, command: str = "freeze") -> dict[str, Any]:
    """The ``--json`` document of ``freeze``, ``unfreeze`` (and ``apply``): ``model`` and
    ``runtime`` are those of ``report``, the result (the written file, or on a dry run the
    input with the edit planned); ``input`` is the path given, ``output`` the file written
    (``null`` when nothing was)."""
    report = result.report
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "model": model_dict(report.model),
        "runtime": runtime_dict(report.runtime),
        "input": result.source,
        "output": result.output,
        "dry_run": result.dry_run,
        # A fact, not a warning: what happened to the saved optimizer variables.
        "optimizer_state": {
            "state": result.optimizer_state.value,
            "saved": result.optimizer_variables,
            "written": report.model.optimizer_variables,
        },
        "changes": [change_dict(c) for c in result.changes],
        "report": report_dict(result.report),
        "warnings": [finding_dict(f) for f in result.warnings],
    }


def render_edit(result: EditResult, command: str = "freeze") -> str:
    return dumps(edit_dict(result, command))
