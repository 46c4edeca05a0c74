"""Renderers for ``recalibrate``: pure functions from a
:class:`~bnfreeze.runtime.recalibrate_file.RecalibrateResult` to a Rich renderable or a JSON
string."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from bnfreeze.render.json import SCHEMA_VERSION, dumps, runtime_dict
from bnfreeze.runtime.recalibrate_file import RecalibrateResult


def recalibrate_view(result: RecalibrateResult) -> Group:
    """One row per recalibrated layer (the largest change of its moving mean and variance),
    then the counts."""
    table = Table(box=None, show_edge=False, pad_edge=False)
    table.add_column("path", overflow="fold")
    table.add_column("calls", justify="right")
    table.add_column("mean max |Δ|", justify="right")
    table.add_column("variance max |Δ|", justify="right")
    for layer in result.layers:
        table.add_row(
            layer.path,
            str(layer.calls),
            f"{layer.mean_change:.4g}",
            f"{layer.variance_change:.4g}",
        )
    verb = "would recalibrate" if result.dry_run else "recalibrated"
    lines: list[Table | Text] = [
        table,
        Text(
            f"{len(result.layers)} BN layer(s) {verb} from {result.batches} batch(es), "
            f"{result.samples} sample(s) of {result.data}."
        ),
    ]
    if result.not_called:
        lines.append(
            Text(
                f"{len(result.not_called)} selected BN layer(s) never called on this data, "
                f"left unchanged: {', '.join(result.not_called[:3])}"
                + (" ..." if len(result.not_called) > 3 else "")
            )
        )
    return Group(*lines)


def status_line(result: RecalibrateResult) -> str:
    if result.output is None:
        return "dry run: nothing written."
    return (
        f"wrote {result.output} ({result.output_bytes} bytes): {result.patched_datasets} "
        "statistics datasets rewritten, every other byte as in the input."
    )


def recalibrate_dict(result: RecalibrateResult, info: Any | None = None) -> dict[str, Any]:
    from bnfreeze.model.records import Runtime

    runtime = runtime_dict(Runtime.KERAS3) if info is None else _measured(info)
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "recalibrate",
        "runtime": runtime,
        "source": result.source,
        "output": result.output,
        "dry_run": result.dry_run,
        "data": result.data,
        "batches": result.batches,
        "samples": result.samples,
        "layers": [
            {
                "path": layer.path,
                "calls": layer.calls,
                "mean_change": layer.mean_change,
                "variance_change": layer.variance_change,
            }
            for layer in result.layers
        ],
        "not_called": list(result.not_called),
        "patched_datasets": result.patched_datasets,
        "input_bytes": result.input_bytes,
        "output_bytes": result.output_bytes,
    }


def _measured(info: Any) -> dict[str, Any]:
    from bnfreeze.render.json import measured_runtime_dict

    return measured_runtime_dict(info)


def render_recalibrate(result: RecalibrateResult, info: Any | None = None) -> str:
    return dumps(recalibrate_dict(result, info))
