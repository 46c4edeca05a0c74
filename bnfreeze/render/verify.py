"""Renderers for ``verify``: the measured table, the verdict, and the JSON contract.

Pure functions of a :class:`~bnfreeze.model.measured.VerifyReport`: they never print.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from bnfreeze.model.expectations import Failure
from bnfreeze.model.measured import (
    CompileSource,
    DataSource,
    LayerMeasurement,
    Movement,
    TrainingSetup,
    VerifyReport,
)
from bnfreeze.model.records import LayerState, Normalization
from bnfreeze.render.columns import Column, ColumnTable, Kind
from bnfreeze.render.json import SCHEMA_VERSION, dumps, measured_runtime_dict, model_dict
from bnfreeze.render.table import (
    STYLE_FROZEN,
    STYLE_INFERENCE,
    STYLE_NONE,
    STYLE_TRAINING,
    Trimmed,
)

STYLE_AGREE = "bold green"
STYLE_DISAGREE = "bold red"

_MOVEMENT_TEXT = {
    Movement.MOVED: ("moved", STYLE_TRAINING),
    Movement.ZERO_UPDATE: ("trained, zero update", "yellow"),
    Movement.UNCHANGED: ("unchanged", STYLE_INFERENCE),
    Movement.NONE: ("-", STYLE_NONE),
}


def movement_text(movement: Movement) -> Text:
    words, style = _MOVEMENT_TEXT[movement]
    return Text(words, style=style)


def mode_text(m: LayerMeasurement) -> Text:
    """What the layer did in ``fit()``, as measured."""
    if m.is_batchnorm:
        if m.not_called:
            return Text("not called", style=STYLE_NONE)
        if m.normalizes_with is Normalization.BATCH:
            return Text("training", style=STYLE_TRAINING)
        if m.normalizes_with is Normalization.MOVING:
            return Text("inference", style=STYLE_INFERENCE)
        return Text("not measured", style=STYLE_NONE)
    if m.trains_weights is True:
        return Text("trains", style="green")
    if m.trains_weights is False:
        return Text("frozen", style=STYLE_FROZEN)
    return Text("-", style=STYLE_NONE)


def data_words(setup: TrainingSetup) -> str:
    if setup.data_source is DataSource.FILE:
        return f"data from {setup.data_path}"
    from bnfreeze.runtime.batches import SYNTHETIC_MEAN, SYNTHETIC_STD

    return (
        f"synthetic data (normal, mean {SYNTHETIC_MEAN:g}, std {SYNTHETIC_STD:g}, "
        f"seed {setup.seed})"
    )


def compile_words(setup: TrainingSetup) -> str:
    what = f"{setup.optimizer}, loss {setup.loss}"
    if setup.compile_source is CompileSource.MODEL:
        return f"{what} (the model's own compile config)"
    if setup.compile_source is CompileSource.DEFAULT:
        return f"{what} (the model was saved without a compile config)"
    return f"{what} (instead of the model's own: {setup.reason})"


def summary(report: VerifyReport) -> Table:
    setup = report.setup
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("File", report.path)
    grid.add_row("Runtime", f"{report.runtime.label}, measured")
    steps = f"{setup.steps} step{'s' if setup.steps != 1 else ''}"
    grid.add_row(
        "Training",
        f"{steps} of train_on_batch, batch {setup.batch_size}, {data_words(setup)}, run eagerly",
    )
    grid.add_row("Compile", compile_words(setup))
    bns = report.batchnorm
    moved = report.bn_stats_moved
    unmeasured = sum(1 for m in bns if not m.mode_measured)
    batch = sum(1 for m in bns if m.normalizes_with is Normalization.BATCH)
    inference = sum(1 for m in bns if m.normalizes_with is Normalization.MOVING)
    line = Text(f"{len(bns)} BN layer{'s' if len(bns) != 1 else ''}: ")
    line.append(f"{batch} in training mode", style=STYLE_TRAINING if batch else "")
    line.append(", ")
    line.append(f"{inference} in inference mode", style=STYLE_INFERENCE)
    line.append(f"; {moved} moved their moving statistics")
    not_called = len(report.bn_not_called)
    unmeasured -= not_called
    if unmeasured:
        line.append(f" ({unmeasured} custom: mode not measured)", style=STYLE_NONE)
    if not_called:
        line.append(f"; {not_called} never called in fit()", style=STYLE_NONE)
    grid.add_row("BatchNorm", line)
    weighted = [m for m in report.layers if m.trains_weights is not None]
    trained = sum(1 for m in weighted if m.trains_weights)
    grid.add_row("Weights", f"{trained} layers trained, {len(weighted) - trained} frozen in fit()")
    return grid


def layer_table(report: VerifyReport, all_layers: bool = False) -> ColumnTable:
    """BN layers (every measured layer with ``all_layers``), and any layer that disagrees.

    The path gets the room: short headers, no class column unless every layer is listed
    (without --all the rows are BN layers and disagreements, which name their class below);
    the words wrap at narrow widths (:mod:`bnfreeze.render.columns`)."""
    disagreeing = {d.path for d in report.disagreements}
    not_compared = set(report.bn_not_compared)
    predicted = {s.layer.path for s in report.prediction.layers} if report.prediction else set()
    columns = [
        Column("path", Kind.PATH, group=True),
        *([Column("class", Kind.CLASS)] if all_layers else []),
        Column("stats", Kind.WRAP, min_width=9),
        Column("gamma/beta", Kind.WRAP, min_width=10),
        Column("other", Kind.WRAP, min_width=9),
        Column("in fit()", Kind.WRAP, min_width=9),
        Column("vs file", Kind.WRAP, min_width=9),
    ]
    rows = []
    for m in report.layers:
        if not (all_layers or m.is_batchnorm or m.path in disagreeing):
            continue
        if m.path in disagreeing:
            verdict = Text("disagrees", style=STYLE_DISAGREE)
        elif m.not_called:
            verdict = Text("not called", style=STYLE_NONE)
        elif m.path in not_compared:
            verdict = Text("not compared", style=STYLE_DISAGREE)
        elif m.path in predicted:
            verdict = Text("agrees", style="green")
        elif report.prediction is None:
            verdict = Text("-", style=STYLE_NONE)
        else:
            verdict = Text("not in file", style=STYLE_NONE)
        rows.append(
            (
                Text(m.path),
                *([Text(m.class_name)] if all_layers else []),
                movement_text(m.moving_stats),
                movement_text(m.gamma_beta),
                movement_text(m.other_weights),
                mode_text(m),
                verdict,
            )
        )
    return ColumnTable(columns, rows)


def verdict(report: VerifyReport) -> Text:
    """One line: does the measurement agree with what ``inspect`` predicted from the file?"""
    if report.prediction is None:
        return Text(
            "No prediction to compare: the report was built without one (compare() with "
            "prediction=None); the table is the measurement alone.",
            style=STYLE_NONE,
        )
    layers = report.layers_compared
    measured = len(report.layers)
    missing = report.bn_not_compared
    if missing and not report.disagreements:
        text = Text("NOT COMPARED", style=STYLE_DISAGREE)
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        text.append(
            f"  {len(missing)} of {len(report.batchnorm)} measured BN layers were not "
            f"predicted by inspect, so nothing was compared for them: {shown}. "
            f"{report.checks} checks on {layers} of {measured} measured layers."
        )
        return text
    if not report.checks:
        return Text(
            "Nothing to compare: inspect lists none of the measured layers, so it predicts "
            f"nothing for them ({measured} layers measured).",
            style=STYLE_NONE,
        )
    if report.agree:
        text = Text("AGREE", style=STYLE_AGREE)
        text.append(
            f"  inspect's prediction matches the measurement: "
            f"{report.checks} checks on {layers} of {measured} measured layers."
        )
        return text
    text = Text("DISAGREE", style=STYLE_DISAGREE)
    count = len(report.disagreements)
    text.append(
        f"  {count} of {report.checks} checks differ from inspect's prediction "
        f"({layers} of {measured} measured layers compared"
    )
    if missing:
        text.append(f"; {len(missing)} measured BN layers not predicted")
    text.append("):")
    return text


def _predicted_paths(report: VerifyReport) -> set[str]:
    return {s.layer.path for s in report.prediction.layers} if report.prediction else set()


def expectation_lines(report: VerifyReport) -> list[Text]:
    lines = []
    for expectation, failures in report.expectations:
        if not failures:
            line = Text("HOLDS", style=STYLE_AGREE)
            line.append(f"  --expect {expectation.name}")
        else:
            line = Text("FAILS", style=STYLE_DISAGREE)
            line.append(
                f"  --expect {expectation.name}: {len(failures)} "
                f"layer{'s' if len(failures) != 1 else ''} measured otherwise"
            )
        lines.append(line)
    return lines


def failures_table(failures: list[Failure]) -> ColumnTable:
    return ColumnTable(
        (
            Column("expectation", Kind.WRAP, wrap_first=True),
            Column("layer", Kind.PATH, group=True),
            Column("expected", Kind.WRAP),
            Column("measured", Kind.WRAP),
        ),
        (
            (
                Text(f.expectation),
                Text(f.path or "(model)"),
                Text(f.expected),
                Text(f.actual, style="red"),
            )
            for f in failures
        ),
    )


def verify_view(report: VerifyReport, *, all_layers: bool = False) -> RenderableType:
    parts: list[RenderableType] = [summary(report), Text("")]
    if report.layers and (all_layers or report.batchnorm or report.disagreements):
        parts += [layer_table(report, all_layers), Text("")]
    elif not report.batchnorm:
        parts += [
            Text("No BatchNormalization layers. Use --all to list every layer.", style=STYLE_NONE),
            Text(""),
        ]
    parts.append(verdict(report))
    for d in report.disagreements:
        # Indented, and so is every line it wraps to.
        parts.append(Padding(Text(d.message, style="red"), (0, 0, 0, 2)))
    if report.expectations:
        parts += [Text(""), *expectation_lines(report)]
        failures = [f for _, fs in report.expectations for f in fs]
        if failures:
            parts += [Text(""), failures_table(failures)]
    return Trimmed(Group(*parts))


def note_lines(report: VerifyReport) -> list[str]:
    """Lines for stderr: what the run had to adapt, and what Keras itself warned about."""
    lines = [f"note: {n}" for n in report.notes]
    if report.not_in_file:
        shown = ", ".join(report.not_in_file[:5])
        more = f" and {len(report.not_in_file) - 5} more" if len(report.not_in_file) > 5 else ""
        lines.append(
            "note: measured layers that inspect does not list (inside a container whose "
            "layers code builds, it lists only the BN layers, from the weights file), so "
            f"inspect could not predict them: {shown}{more}."
        )
    if report.not_measured:
        shown = ", ".join(report.not_measured[:5])
        more = f" and {len(report.not_measured) - 5} more" if len(report.not_measured) > 5 else ""
        lines.append(
            f"note: layers the file lists with weights but Keras did not show: {shown}{more}."
        )
    return lines


# --------------------------------------------------------------------------- JSON


def layer_dict(m: LayerMeasurement, state: LayerState | None) -> dict[str, Any]:
    """One measured layer, with what ``inspect`` predicted for it (None: not in the file)."""
    return {
        "path": m.path,
        "class_name": m.class_name,
        "is_batchnorm": m.is_batchnorm,
        "in_file": m.in_file,
        "moving_stats": m.moving_stats.value,
        "gamma_beta": m.gamma_beta.value,
        "other_weights": m.other_weights.value,
        "trains_weights": m.trains_weights,
        "normalizes_with": m.normalizes_with.value if m.normalizes_with is not None else None,
        "branch_recorded": m.branch is not None,
        "mode_measured": m.mode_measured,
        "called": m.called,
        "predicted": None
        if state is None
        else {
            "trains_weights": state.in_fit.trains_weights,
            "updates_moving_stats": state.in_fit.updates_moving_stats,
        },
    }


def verify_dict(report: VerifyReport) -> dict[str, Any]:
    """The ``verify --json`` document (``bnfreeze/schemas/verify.schema.json``)."""
    states = {s.layer.path: s for s in report.prediction.layers} if report.prediction else {}
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "verify",
        "model": model_dict(
            report.prediction.model if report.prediction is not None else None, report.path
        ),
        "runtime": measured_runtime_dict(report.runtime),
        "run": run_dict(report.setup),
        "summary": summary_dict(report),
        "layers": [layer_dict(m, states.get(m.path)) for m in report.layers],
        "disagreements": [
            {
                "path": d.path,
                "aspect": d.aspect.value,
                "predicted": d.predicted,
                "measured": d.measured.value,
                "message": d.message,
            }
            for d in report.disagreements
        ],
        "expectations": [
            {
                "expectation": e.name,
                "holds": not failures,
                "failures": [
                    {"path": f.path, "expected": f.expected, "actual": f.actual} for f in failures
                ],
            }
            for e, failures in report.expectations
        ],
        "not_in_file": list(report.not_in_file),
        "not_measured": list(report.not_measured),
        "bn_not_compared": list(report.bn_not_compared),
        "bn_not_called": list(report.bn_not_called),
        "notes": list(report.notes),
    }


def run_dict(setup: TrainingSetup) -> dict[str, Any]:
    """How the measured steps ran: their number and batch size, the data, the compile."""
    return {
        "steps": setup.steps,
        "batch_size": setup.batch_size,
        "execution": setup.execution,
        "data": {
            "source": setup.data_source.value,
            "path": setup.data_path,
            "seed": setup.seed,
            "input_shapes": [list(s) for s in setup.input_shapes],
        },
        "compile": {
            "source": setup.compile_source.value,
            "optimizer": setup.optimizer,
            "loss": setup.loss,
            "reason": setup.reason,
        },
    }


def summary_dict(report: VerifyReport) -> dict[str, Any]:
    """The counts of the measurement and of its comparison with the prediction."""
    bns = report.batchnorm
    weighted = [m for m in report.layers if m.trains_weights is not None]
    return {
        "batchnorm": len(bns),
        "bn_stats_moved": report.bn_stats_moved,
        "bn_stats_unchanged": sum(1 for m in bns if m.moving_stats is Movement.UNCHANGED),
        "bn_mode_not_measured": sum(1 for m in bns if not m.mode_measured),
        "bn_training": sum(1 for m in bns if m.normalizes_with is Normalization.BATCH),
        "bn_inference": sum(1 for m in bns if m.normalizes_with is Normalization.MOVING),
        "layers_trained": sum(1 for m in weighted if m.trains_weights),
        "layers_frozen": sum(1 for m in weighted if not m.trains_weights),
        "compared": report.prediction is not None,
        "layers_measured": len(report.layers),
        "layers_compared": report.layers_compared,
        "bn_not_compared": len(report.bn_not_compared),
        "checks": report.checks,
        "disagreements": len(report.disagreements),
        "agree": report.agree,
        "expectations_hold": report.expectations_hold,
    }


def render_verify(report: VerifyReport) -> str:
    return dumps(verify_dict(report))
