"""Rich renderables for ``inspect``: the summary, the layer table, the tree.

Pure: every function returns a renderable and never prints. The layer table lays itself out
for the width it is finally rendered at, so it stays readable at 80-100 columns for a
1,000-layer model:

* a layer under a container shows its name, indented under the container's row, not its full
  path (the full path is the container's path, "/", the name; ``--json`` has it);
* when space runs out, the path column keeps priority: the "updates stats" header and long
  container summaries wrap, then the class column shows "BN" for BatchNormalization, is cut
  with an ellipsis (to 10 columns), then hidden; the path column breaks only as a last resort,
  before a "/", or cut from the left with an ellipsis (:mod:`bnfreeze.render.columns`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from bnfreeze.model.hub import KERAS_HUB_PREFIX, KerasHub, keras_hub
from bnfreeze.model.records import LayerKind, LayerRecord, LayerState, Normalization, Report
from bnfreeze.render.columns import CLASS_MIN_WIDTH, PATH_MIN_WIDTH, Column, ColumnTable, Kind
from bnfreeze.render.findings import WARNINGS_SHOWN_PER_CODE, warning_lines

__all__ = [
    "CLASS_MIN_WIDTH",
    "PATH_MIN_WIDTH",
    "WARNINGS_SHOWN_PER_CODE",
    "LayerTable",
    "Trimmed",
    "inspect_view",
    "layer_rows",
    "layer_table",
    "layer_tree",
    "mode_text",
    "simple_table",
    "summary",
    "warning_lines",
]

STYLE_TRAINING = "bold yellow"
STYLE_INFERENCE = "bold cyan"
STYLE_TRAINS = "green"
STYLE_FROZEN = "blue"
STYLE_NONE = "dim"

#: Spaces of indentation per level of nesting in the path column.
INDENT = 2
#: A container's "in fit()" summary wraps to at most this width ("1 training," / "50 inference").
SUMMARY_MAX_WIDTH = 13


def mode_text(state: LayerState) -> Text:
    """The "in fit()" cell: a BN's normalization mode, or whether other weights train."""
    fit = state.in_fit
    if fit.normalizes_with is Normalization.BATCH:
        return Text("training", style=STYLE_TRAINING)
    if fit.normalizes_with is Normalization.MOVING:
        return Text("inference", style=STYLE_INFERENCE)
    if state.layer.is_container:
        return Text("")
    if state.layer.is_batchnorm and state.layer.call_decided_by is not None:
        return Text("unknown", style=STYLE_NONE)  # called by a custom wrapper's own code
    if state.layer.is_batchnorm and state.layer.called_in_fit is False:
        return Text("not called", style=STYLE_NONE)  # held by the model, never called
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


def flag_text(value: bool | None) -> Text:
    if value is None:
        return Text("-", style=STYLE_NONE)
    return Text("True" if value else "False", style="" if value else STYLE_FROZEN)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _bn_counts(report: Report, state: LayerState) -> tuple[int, int]:
    """BN layers below a container: (training, inference) in fit()."""
    prefix = state.layer.path + "/"
    training = inference = 0
    for s in report.batchnorm:
        if s.layer.path.startswith(prefix):
            if s.in_fit.normalizes_with is Normalization.BATCH:
                training += 1
            elif s.in_fit.normalizes_with is Normalization.MOVING:
                inference += 1
    return training, inference


def _container_summary(report: Report, state: LayerState) -> Text:
    """What the BN layers below a container do in fit(): "51 inference", "1 training, 50
    inference"; empty when there are none."""
    training, inference = _bn_counts(report, state)
    text = Text()
    if training:
        text.append(f"{training} training", style=STYLE_TRAINING)
    if training and inference:
        text.append(", ")
    if inference:
        text.append(f"{inference} inference", style=STYLE_INFERENCE)
    return text


def summary(report: Report) -> Table:
    """File, format, Keras version, compiled or not, and what the BN layers do in fit()."""
    model = report.model
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("File", model.path)
    details = [model.format.json_name]
    details.append(f"Keras {model.keras_version}" if model.keras_version else "Keras unknown")
    details.append("compiled" if model.compiled else "not compiled")
    if model.optimizer_variables:
        details.append(f"{model.optimizer_variables} saved optimizer variables")
    grid.add_row("Format", ", ".join(details))
    hub = keras_hub(model)
    if hub is not None:
        grid.add_row("keras-hub", keras_hub_line(hub))
    asked = any(s.layer.from_keras for s in report.layers)
    grid.add_row(
        "Runtime",
        f"{report.runtime.value} (predicted from the file"
        + ("; layers built by code asked of Keras)" if asked else ")"),
    )
    _batchnorm_rows(grid, report)
    grid.add_row("Weights", _weights_line(report))
    if not report.model_trainable:
        grid.add_row("Model", Text("trainable=False: fit() trains no weights", style=STYLE_FROZEN))
    return grid


def _batchnorm_rows(grid: Table, report: Report) -> None:
    """What the BN layers do in fit(), and how many were built by code."""
    bn_line = Text(f"{_plural(len(report.batchnorm), 'BN layer')}: ")
    bn_line.append(f"{report.bn_training_in_fit} training", style=STYLE_TRAINING)
    bn_line.append(", ")
    bn_line.append(f"{report.bn_inference_in_fit} inference", style=STYLE_INFERENCE)
    bn_line.append(" in fit()")
    grid.add_row("BatchNorm", bn_line)
    from_weights = sum(1 for s in report.batchnorm if s.layer.from_weights)
    if from_weights:
        grid.add_row(
            "",
            Text(
                f"{from_weights} read from the weights (marked {MARK}): built by code, "
                "not in the config",
                style=STYLE_NONE,
            ),
        )
    from_keras = sum(1 for s in report.batchnorm if s.layer.from_keras)
    if from_keras:
        grid.add_row(
            "",
            Text(
                f"{from_keras} asked of Keras (marked {MARK_KERAS}): built by code, "
                f"as {_loader(report)} rebuilds them",
                style=STYLE_NONE,
            ),
        )


def _loader(report: Report) -> str:
    """What loads the model whose code-built rows Keras was asked about: ``from_preset`` for
    a keras-hub task's preset folder, else ``load_model``."""
    return "from_preset" if report.model.preset_task is not None else "load_model"


def _weights_line(report: Report) -> Text:
    """How many layers train their weights in fit(), and how many stay frozen."""
    trains = sum(1 for s in report.layers if s.in_fit.trains_weights)
    frozen = sum(1 for s in report.layers if s.in_fit.trains_weights is False)
    weights = Text()
    weights.append(
        f"{_plural(trains, 'layer')} {'trains' if trains == 1 else 'train'}",
        style=STYLE_TRAINS if trains else "",
    )
    weights.append(", ")
    weights.append(f"{frozen} frozen", style=STYLE_FROZEN if frozen else "")
    weights.append(f" in fit() ({_plural(len(report.layers), 'layer')} in all)")
    return weights


def keras_hub_line(hub: KerasHub) -> str:
    """What makes the file a keras-hub model: "preset folder, keras_hub 0.32.0,
    ImageClassifier, ResNetBackbone"; for a task's preset folder, "task preset folder
    (save_to_preset), the task as from_preset loads it, ..."."""
    parts = []
    if hub.task is not None:
        parts.append("task preset folder (save_to_preset), the task as from_preset loads it")
    elif hub.preset:
        parts.append("preset folder (save_to_preset)")
    if hub.version:
        parts.append(f"keras_hub {hub.version}")
    names = [c.removeprefix(KERAS_HUB_PREFIX) for c in hub.classes]
    if names:
        parts.append(
            ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        )
    return ", ".join(parts)


#: The class cell of a BatchNormalization saved with synchronized=True.
SYNCHRONIZED_BN = "BatchNormalization(synchronized)"


def _class_text(state: LayerState) -> Text:
    layer = state.layer
    if layer.code_built:
        return Text(layer.shown_class + _mark(layer))
    if layer.synchronized and layer.class_name == "BatchNormalization" and not layer.frozen_stats:
        return Text(SYNCHRONIZED_BN)
    return Text(layer.shown_class)


def layer_rows(report: Report, all_layers: bool) -> list[LayerState]:
    """The rows of the default view: BN layers and the containers above them."""
    if all_layers:
        return list(report.layers)
    by_path = {s.layer.path: s for s in report.layers}
    wanted: set[str] = set()
    for state in report.batchnorm:
        wanted.add(state.layer.path)
        parent = state.layer.parent
        while parent is not None and parent not in wanted:
            wanted.add(parent)
            parent = by_path[parent].layer.parent
    return [s for s in report.layers if s.layer.path in wanted]


def _display_path(state: LayerState) -> str:
    """The name under its container's row, indented by depth; the path at the top level."""
    layer = state.layer
    if layer.parent is None:
        return layer.path
    prefix = layer.parent + "/"
    relative = layer.path[len(prefix) :] if layer.path.startswith(prefix) else layer.path
    return " " * (INDENT * layer.depth) + relative


@dataclass(frozen=True)
class _Row:
    path: Text
    class_name: Text
    trainable: Text
    in_fit: Text
    updates_stats: Text


#: The layer table's columns, and how each gives up room (see :mod:`bnfreeze.render.columns`).
COLUMNS = (
    Column("path", Kind.PATH),
    Column("class", Kind.CLASS),
    Column("trainable"),
    Column("in fit()", Kind.WRAP, min_width=SUMMARY_MAX_WIDTH),
    Column("updates stats", Kind.WRAP),
)
HEADERS = tuple(c.header for c in COLUMNS)


def simple_table() -> Table:
    """An empty Rich table in the look :class:`~bnfreeze.render.columns.ColumnTable` draws
    (``SIMPLE_HEAD``, no edge, collapsed padding), for a table of free text."""
    return Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        padding=(0, 1),
        header_style="bold",
    )


def _cells(row: _Row) -> tuple[Text, ...]:
    return (row.path, row.class_name, row.trainable, row.in_fit, row.updates_stats)


class LayerTable(ColumnTable):
    """The table of layers: path, class, trainable, "in fit()" mode, "updates stats".

    Picks its column widths when rendered (see the module docstring)."""

    def __init__(self, rows: list[_Row]) -> None:
        super().__init__(COLUMNS, (_cells(row) for row in rows))


def layer_table(report: Report, all_layers: bool = False) -> LayerTable:
    """The BN layers and the containers above them (``all_layers``: every layer)."""
    rows = []
    for state in layer_rows(report, all_layers):
        layer = state.layer
        if layer.is_container:
            rows.append(
                _Row(
                    Text(_display_path(state), style="bold"),
                    Text(layer.class_name),
                    flag_text(layer.trainable),
                    _container_summary(report, state),
                    Text(""),
                )
            )
            continue
        rows.append(
            _Row(
                Text(_display_path(state)),
                _class_text(state),
                flag_text(layer.trainable),
                mode_text(state),
                _yes_no(state.in_fit.updates_moving_stats),
            )
        )
    return LayerTable(rows)


def layer_tree(report: Report, all_layers: bool = False) -> Tree:
    """The nesting as a tree: name (class), a False flag, and the mode in fit()."""
    root = Tree(Text(f"{report.model.path}", style="bold"))
    nodes: dict[str | None, Tree] = {None: root}
    for state in layer_rows(report, all_layers):
        layer = state.layer
        label = Text(layer.name, style="bold" if layer.is_container else "")
        label.append(f" ({layer.shown_class}{_mark(layer)})", style=STYLE_NONE)
        if layer.trainable is False:
            label.append(" trainable=False", style=STYLE_FROZEN)
        if layer.is_container:
            summary_text = _container_summary(report, state)
            if summary_text.plain:
                label.append("  ")
                label.append_text(summary_text)
        else:
            mode = mode_text(state)
            if mode.plain != "-":
                label.append("  ")
                label.append_text(mode)
        parent = nodes.get(layer.parent, root)
        nodes[layer.path] = parent.add(label)
    return root


#: What the mode words mean, under the table (each line fits 80 columns).
LEGEND = (
    "training:  in fit() normalizes with batch statistics, updates moving statistics\n"
    "inference: in fit() normalizes with moving statistics, leaves them unchanged"
)


#: Marks a row read from the weights file (``source: "weights"`` in JSON).
MARK = "*"
LEGEND_WEIGHTS = (
    f"{MARK}:         read from the weights: flag not saved, Keras rebuilds it trainable"
)
#: Marks a row asked of Keras (``source: "keras"``): a layer load_model rebuilt by code.
MARK_KERAS = "+"
LEGEND_KERAS = f"{MARK_KERAS}:         built by code: the flag load_model gives it (asked of Keras)"


def _mark(layer: LayerRecord) -> str:
    if layer.from_weights:
        return MARK
    return MARK_KERAS if layer.from_keras else ""


class Trimmed:
    """Renders another renderable without the trailing spaces Rich pads lines with, so the
    output piped to a file or compared with a golden file has no trailing whitespace."""

    def __init__(self, renderable: RenderableType) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in console.render_lines(self.renderable, options, pad=False, new_lines=False):
            while line and not line[-1].control and not line[-1].text.rstrip(" "):
                line.pop()
            if line and not line[-1].control and line[-1].text.endswith(" "):
                last = line.pop()
                line.append(Segment(last.text.rstrip(" "), last.style))
            yield from line
            yield Segment.line()

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.renderable)


def inspect_view(report: Report, *, all_layers: bool = False, tree: bool = False) -> Trimmed:
    """The whole ``inspect`` view: the summary, then the table (or tree), then a legend."""
    parts: list[RenderableType] = [summary(report), Text("")]
    if not report.batchnorm and not all_layers and not tree:
        parts.append(
            Text("No BatchNormalization layers. Use --all to list every layer.", style=STYLE_NONE)
        )
        return Trimmed(Group(*parts))
    parts.append(layer_tree(report, all_layers) if tree else layer_table(report, all_layers))
    if report.batchnorm:
        parts.extend([Text(""), Text(LEGEND, style=STYLE_NONE)])
    if any(s.layer.from_weights for s in report.layers):
        parts.append(Text(LEGEND_WEIGHTS, style=STYLE_NONE))
    if any(s.layer.from_keras for s in report.layers):
        legend = LEGEND_KERAS.replace("load_model", _loader(report))
        parts.append(Text(legend, style=STYLE_NONE))
    return Trimmed(Group(*parts))
