"""Renderers for ``explain``: the four measured cases, the rules, and the JSON contract.

Pure functions of an :class:`~bnfreeze.runtime.explain.ExplainReport`: they never print.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bnfreeze.model.records import Normalization
from bnfreeze.render.columns import Column, ColumnTable, Kind
from bnfreeze.render.json import SCHEMA_VERSION, dumps, measured_runtime_dict
from bnfreeze.render.table import STYLE_INFERENCE, STYLE_NONE, STYLE_TRAINING, Trimmed
from bnfreeze.runtime.explain import IMAGE_SHAPE, Case, ExplainReport


def numbers(values: Sequence[float], digits: int = 3) -> str:
    """``[9.995, 11.994, 19.99, 1.0]``: rounded for people (the JSON keeps every digit)."""
    return "[" + ", ".join(f"{round(v, digits):g}" for v in values) + "]"


def _nested(flat: Sequence[float], shape: tuple[int, ...]) -> Any:
    if len(shape) == 1:
        return list(flat)
    step = len(flat) // shape[0]
    return [_nested(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def setup_grid(report: ExplainReport) -> Table:
    s = report.setup
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    origin = f"whole numbers 0-9, seed {s.seed}" if s.seed is not None else "given"
    grid.add_row(
        "Image",
        f"shape {IMAGE_SHAPE} ({origin}); first pixel {numbers(s.first_pixel)}",
    )
    grid.add_row(
        "BN layer",
        f"gamma {numbers(s.gamma)}, beta {numbers(s.beta)}, moving mean "
        f"{numbers(s.moving_mean)}, moving variance {numbers(s.moving_variance)}, "
        f"momentum {s.momentum:g}, epsilon {s.epsilon:g}",
    )
    grid.add_row("Runtime", f"{report.runtime.label}, measured now")
    return grid


def _stats_cell(case: Case) -> Text:
    """Whether the moving statistics were updated."""
    if case.stats_updated:
        return Text("yes", style=STYLE_TRAINING)
    return Text("no", style=STYLE_INFERENCE)


def _mode_cell(case: Case) -> Text:
    if case.normalizes_with is Normalization.BATCH:
        return Text("batch", style=STYLE_TRAINING)
    if case.normalizes_with is Normalization.MOVING:
        return Text("moving", style=STYLE_INFERENCE)
    return Text("?", style=STYLE_NONE)


def cases_table(report: ExplainReport) -> ColumnTable:
    """One row per case: the flags, the first output pixel with what it means below it, which
    statistics the output was normalized with (moving or batch), and whether the moving
    statistics were updated."""
    rows = []
    for case in report.cases:
        cell = Text(numbers(case.first_row))
        cell.append(f"\n{case.meaning}", style="italic")
        rows.append(
            (
                Text(str(case.training)),
                Text(str(case.trainable)),
                cell,
                _mode_cell(case),
                _stats_cell(case),
            )
        )
    columns = (
        Column("training"),
        Column("trainable"),
        Column("output[0,0,0,:] and what it means", Kind.WRAP, min_width=32),
        Column("stats used"),
        Column("updated"),
    )
    return ColumnTable(columns, rows, spaced=True)


def updated_lines(report: ExplainReport) -> list[Text]:
    """The new moving statistics of every case that updated them."""
    lines = []
    for case in report.cases:
        if case.stats_updated:
            line = Text(f"training={case.training}, trainable={case.trainable}: ", style="bold")
            line.append(
                f"moving mean {numbers(report.setup.moving_mean, 4)} -> "
                f"{numbers(case.moving_mean, 4)}, moving variance "
                f"{numbers(report.setup.moving_variance, 4)} -> "
                f"{numbers(case.moving_variance, 4)}",
                style="",
            )
            lines.append(line)
    if not lines:
        lines.append(Text("No case updated the moving statistics.", style=STYLE_NONE))
    return lines


def rules_grid(report: ExplainReport) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for rule in report.rules:
        label, _, text = rule.partition(" ")
        grid.add_row(label, text)
    grid.add_row("", Text(report.rules_note, style=STYLE_NONE))
    return grid


def explain_view(report: ExplainReport) -> RenderableType:
    return Trimmed(
        Group(
            Text(
                "One BatchNormalization layer, called once per combination of training and "
                "trainable",
                style="bold",
            ),
            setup_grid(report),
            Text(""),
            cases_table(report),
            Text(""),
            *updated_lines(report),
            Text(""),
            Text(f"The rules on this runtime ({report.runtime.label})", style="bold"),
            rules_grid(report),
            Text(""),
            Text(report.historical_note, style="italic"),
        )
    )


def case_dict(case: Case) -> dict[str, Any]:
    return {
        "training": case.training,
        "trainable": case.trainable,
        "output_first_row": list(case.first_row),
        "output": _nested(case.output, IMAGE_SHAPE),
        "normalizes_with": case.normalizes_with.value if case.normalizes_with else None,
        "branch_recorded": case.branch is not None,
        "moving_stats_updated": case.stats_updated,
        "moving_mean": list(case.moving_mean),
        "moving_variance": list(case.moving_variance),
        "meaning": case.meaning,
    }


def explain_dict(report: ExplainReport) -> dict[str, Any]:
    s = report.setup
    info = report.runtime
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "explain",
        "runtime": measured_runtime_dict(info),
        "setup": {
            "image": _nested(s.image, IMAGE_SHAPE),
            "seed": s.seed,
            "gamma": list(s.gamma),
            "beta": list(s.beta),
            "moving_mean": list(s.moving_mean),
            "moving_variance": list(s.moving_variance),
            "momentum": s.momentum,
            "epsilon": s.epsilon,
        },
        "cases": [case_dict(c) for c in report.cases],
        "rules": list(report.rules),
        "rules_note": report.rules_note,
        "historical_note": report.historical_note,
    }


def render_explain(report: ExplainReport) -> str:
    return dumps(explain_dict(report))
