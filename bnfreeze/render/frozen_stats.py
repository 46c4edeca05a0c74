"""Renderers for ``freeze --bn-frozen-stats``: pure functions from a
:class:`~bnfreeze.ops.frozen_stats.ConvertResult` to a Rich renderable or a JSON string.

The view is each layer's class before → after, the counts, then the result in the
``inspect`` style. The JSON document is ``freeze``'s (``bnfreeze/schemas/freeze.schema.json``)
with no flag ``changes`` and the ``class_changes``."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.text import Text

from bnfreeze.ops.frozen_stats import ConvertResult
from bnfreeze.render.columns import Column, ColumnTable, Kind
from bnfreeze.render.json import (
    SCHEMA_VERSION,
    dumps,
    finding_dict,
    model_dict,
    report_dict,
    runtime_dict,
)
from bnfreeze.render.table import STYLE_NONE, Trimmed, inspect_view

CLASS_COLUMNS = (Column("path", Kind.PATH, group=True), Column("class"))


def convert_view(result: ConvertResult) -> Trimmed:
    parts: list[Any] = []
    if result.changes:
        parts += [
            ColumnTable(
                CLASS_COLUMNS,
                ((Text(c.path), Text(f"{c.before} → {c.after}")) for c in result.changes),
            ),
            Text(""),
        ]
    verb = "would change" if result.dry_run else "changed"
    if result.changes:
        counts = Text(f"{len(result.changes)} BN layer(s) {verb} class ", style="bold")
        counts.append(f"of {len(result.selected)} selected; no flag changed.")
    else:
        counts = Text(
            f"No class changed: the {len(result.selected)} selected BN layer(s) already had it.",
            style=STYLE_NONE,
        )
    parts += [counts, Text(""), inspect_view(result.report)]
    return Trimmed(Group(*parts))


def convert_dict(result: ConvertResult) -> dict[str, Any]:
    report = result.report
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "freeze",
        "model": model_dict(report.model),
        "runtime": runtime_dict(report.runtime),
        "input": result.source,
        "output": result.output,
        "dry_run": result.dry_run,
        "changes": [],
        "class_changes": [
            {"path": c.path, "before": c.before, "after": c.after} for c in result.changes
        ],
        "report": report_dict(report),
        "warnings": [finding_dict(f) for f in result.warnings],
    }


def render_convert(result: ConvertResult) -> str:
    return dumps(convert_dict(result))


def status_line(result: ConvertResult) -> str:
    if result.dry_run:
        return "dry run: nothing was written."
    if result.output is None:
        return f"nothing changed; {result.source} was left as it was."
    return (
        f"wrote {result.output} ({result.output_bytes} bytes): config.json rewritten, every "
        "other member copied byte for byte."
    )
