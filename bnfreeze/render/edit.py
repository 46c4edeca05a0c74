"""Renderers for ``freeze`` / ``unfreeze``: pure functions from an
:class:`~bnfreeze.ops.edit.EditResult` to a Rich renderable or a JSON string.

The view is what changed (before → after per layer, then counts), then the new effective
modes in the ``inspect`` style (:func:`bnfreeze.render.table.inspect_view` of the result).
"""

from __future__ import annotations

from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from bnfreeze.model.assignments import Change
from bnfreeze.ops.edit import EditResult
from bnfreeze.render.json import SCHEMA_VERSION, dumps, finding_dict, report_dict
from bnfreeze.render.table import (
    STYLE_NONE,
    Trimmed,
    inspect_view,
    plain_columns,
    simple_table,
)
from bnfreeze.render.table import _flag as flag_text


def _before_after(change: Change) -> Text:
    cell = flag_text(change.before)
    cell.append(" → ")
    cell.append_text(flag_text(change.after))
    return cell


def change_table(changes: tuple[Change, ...]) -> Table:
    """One row per changed layer: path, class, trainable before → after (a Rich Table in the
    ``inspect`` look)."""
    table = simple_table()
    table.add_column("path", overflow="fold")
    table.add_column("class", overflow="ellipsis", no_wrap=True)
    table.add_column("trainable", no_wrap=True)
    for change in changes:
        table.add_row(change.path, change.class_name, _before_after(change))
    return table


class ChangeTable:
    """:func:`change_table`, drawn line by line when it fits the width: the same text, ten
    times faster than Rich's table layout for the hundreds of rows of a big model. When it
    does not fit, Rich's table folds the paths."""

    HEADERS = ("path", "class", "trainable")

    def __init__(self, changes: tuple[Change, ...]) -> None:
        self.changes = changes
        self.widths = [
            max([len(self.HEADERS[0])] + [cell_len(c.path) for c in changes]),
            max([len(self.HEADERS[1])] + [cell_len(c.class_name) for c in changes]),
            max([len(self.HEADERS[2])] + [_before_after(c).cell_len for c in changes]),
        ]

    @property
    def width(self) -> int:
        return sum(self.widths) + 2 * (len(self.widths) - 1)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.width > options.max_width:
            yield change_table(self.changes)
            return
        rows = ((Text(c.path), Text(c.class_name), _before_after(c)) for c in self.changes)
        yield from plain_columns(self.HEADERS, self.widths, rows)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(self.width, self.width)


def change_counts(result: EditResult) -> Text:
    """ "12 layers changed (10 BN, 2 other) of 14 selected.", or why nothing changed."""
    selected = len(result.selected)
    if not result.changes:
        return Text(
            f"No flag changed: the {selected} selected layer(s) already had these flags.",
            style=STYLE_NONE,
        )
    bn = sum(1 for c in result.changes if c.is_batchnorm)
    text = Text(f"{len(result.changes)} layer(s) changed ", style="bold")
    text.append(f"({bn} BN, {len(result.changes) - bn} other) of {selected} selected.")
    if result.dry_run:
        text.append(" Dry run: nothing was written.", style="bold")
    return text


def edit_view(result: EditResult, *, all_layers: bool = False) -> Trimmed:
    """Changes, counts, then the result in the ``inspect`` style."""
    parts: list[Any] = []
    if result.changes:
        parts += [ChangeTable(result.changes), Text("")]
    parts += [change_counts(result), Text(""), inspect_view(result.report, all_layers=all_layers)]
    return Trimmed(Group(*parts))


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def status_line(result: EditResult) -> str:
    """The one line for stderr that says what was written."""
    if result.dry_run:
        return "dry run: nothing was written."
    if result.output is None:
        return f"nothing changed; {result.source} was left as it was."
    size = _size(result.output_bytes or 0)
    return f"wrote {result.output} ({size}; input {_size(result.input_bytes)})."


def change_dict(change: Change) -> dict[str, Any]:
    return {"path": change.path, "before": change.before, "after": change.after}


def edit_dict(result: EditResult) -> dict[str, Any]:
    """The ``--json`` document (``schema_version`` 1)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "changes": [change_dict(c) for c in result.changes],
        "report": report_dict(result.report),
        "warnings": [finding_dict(f) for f in result.warnings],
    }


def render_edit(result: EditResult) -> str:
    return dumps(edit_dict(result))
