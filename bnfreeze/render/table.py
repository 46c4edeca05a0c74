"""Rich renderables for ``inspect``: the summary, the layer table, the tree, the warnings."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Group
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from bnfreeze.records import Finding, LayerKind, LayerState, Normalization, Report

STYLE_TRAINING = "bold yellow"
STYLE_INFERENCE = "bold cyan"
STYLE_TRAINS = "green"
STYLE_FROZEN = "blue"
STYLE_NONE = "dim"

#: At most this many warnings of one kind are shown in full; the rest are counted.
WARNINGS_SHOWN_PER_CODE = 3


def mode_text(state: LayerState) -> Text:
    """The "in fit()" cell: a BN's normalization mode, or whether other weights train."""
    fit = state.in_fit
    if fit.normalizes_with is Normalization.BATCH:
        return Text("training", style=STYLE_TRAINING)
    if fit.normalizes_with is Normalization.MOVING:
        return Text("inference", style=STYLE_INFERENCE)
    if state.layer.is_container:
        return Text("")
    if fit.trains_weights is True:
        return Text("trains", style=STYLE_TRAINS)
    if fit.trains_weights is False:
        return Text("frozen", style=STYLE_FROZEN)
    if state.layer.kind is LayerKind.UNKNOWN:
        return Text("unknown", style=STYLE_NONE)
    return Text("-", style=STYLE_NONE)


def _yes_no(value: bool | None) -> Text:
    if value is None:
        return Text("-", style=STYLE_NONE)
    return Text("yes", style=STYLE_TRAINING) if value else Text("no", style=STYLE_INFERENCE)


def _flag(value: bool | None) -> Text:
    if value is None:
        return Text("-", style=STYLE_NONE)
    return Text("True" if value else "False", style="" if value else STYLE_FROZEN)


def _container_summary(report: Report, state: LayerState) -> Text:
    prefix = state.layer.path + "/"
    bns = [s for s in report.batchnorm if s.layer.path.startswith(prefix)]
    if not bns:
        return Text("")
    training = sum(1 for s in bns if s.in_fit.normalizes_with is Normalization.BATCH)
    text = Text()
    text.append(f"{training} training", style=STYLE_TRAINING if training else STYLE_NONE)
    text.append(" / ")
    text.append(f"{len(bns) - training} inference", style=STYLE_INFERENCE)
    return text


def summary(report: Report) -> Table:
    model = report.model
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("File", model.path)
    details = [model.format.json_name]
    if model.keras_version:
        details.append(f"Keras {model.keras_version}")
    details.append("compiled" if model.compiled else "not compiled")
    if model.optimizer_variables:
        details.append(f"{model.optimizer_variables} saved optimizer variables")
    grid.add_row("Format", ", ".join(details))
    grid.add_row("Runtime", f"{report.runtime.value} (predicted from the file)")
    bn_line = Text(f"{len(report.batchnorm)} BN layers: ")
    bn_line.append(f"{report.bn_training_in_fit} training", style=STYLE_TRAINING)
    bn_line.append(", ")
    bn_line.append(f"{report.bn_inference_in_fit} inference", style=STYLE_INFERENCE)
    bn_line.append(" in fit()")
    grid.add_row("BatchNorm", bn_line)
    trains = sum(1 for s in report.layers if s.in_fit.trains_weights)
    frozen = sum(1 for s in report.layers if s.in_fit.trains_weights is False)
    grid.add_row("Weights", f"{trains} layers train, {frozen} frozen in fit() ({len(report.layers)} layers)")
    return grid


def layer_rows(report: Report, all_layers: bool) -> list[LayerState]:
    """The rows of the default view: BN layers and the containers above them."""
    if all_layers:
        return list(report.layers)
    wanted: set[str] = set()
    for state in report.batchnorm:
        wanted.add(state.layer.path)
        parent = state.layer.parent
        while parent is not None:
            wanted.add(parent)
            parent = report.state(parent).layer.parent
    return [s for s in report.layers if s.layer.path in wanted]


def layer_table(report: Report, all_layers: bool = False) -> Table:
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("path", overflow="fold")
    table.add_column("class", overflow="fold")
    table.add_column("trainable")
    table.add_column("in fit()")
    table.add_column("updates stats")
    for state in layer_rows(report, all_layers):
        layer = state.layer
        if layer.is_container:
            table.add_row(
                Text(layer.path, style="bold"),
                layer.class_name,
                _flag(layer.trainable),
                _container_summary(report, state),
                Text(""),
            )
            continue
        table.add_row(
            layer.path,
            layer.class_name,
            _flag(layer.trainable),
            mode_text(state),
            _yes_no(state.in_fit.updates_moving_stats),
        )
    return table


def layer_tree(report: Report, all_layers: bool = False) -> Tree:
    root = Tree(Text(f"{report.model.path}", style="bold"))
    nodes: dict[str | None, Tree] = {None: root}
    for state in layer_rows(report, all_layers):
        layer = state.layer
        label = Text(layer.name, style="bold" if layer.is_container else "")
        label.append(f" ({layer.class_name})", style=STYLE_NONE)
        if layer.trainable is False:
            label.append(" trainable=False", style=STYLE_FROZEN)
        if layer.is_container:
            summary_text = _container_summary(report, state)
            if summary_text.plain:
                label.append("  ")
                label.append_text(summary_text)
        else:
            label.append("  ")
            label.append_text(mode_text(state))
        parent = nodes.get(layer.parent, root)
        nodes[layer.path] = parent.add(label)
    return root


def inspect_view(report: Report, *, all_layers: bool = False, tree: bool = False) -> Group:
    body = layer_tree(report, all_layers) if tree else layer_table(report, all_layers)
    if not report.batchnorm and not all_layers and not tree:
        body = Text("No BatchNormalization layers. Use --all to list every layer.", style=STYLE_NONE)
    return Group(summary(report), Text(""), body)


def warning_lines(findings: tuple[Finding, ...]) -> list[str]:
    """One line per warning, at most a few per kind, then a count of the rest."""
    by_code: dict[object, list[Finding]] = defaultdict(list)
    for finding in findings:
        by_code[finding.code].append(finding)
    lines = []
    for code, group in by_code.items():
        for finding in group[:WARNINGS_SHOWN_PER_CODE]:
            lines.append(f"warning: {finding.message}")
        rest = len(group) - WARNINGS_SHOWN_PER_CODE
        if rest > 0:
            lines.append(f"warning: ... and {rest} more {code.value} warnings (see --json).")
    return lines
