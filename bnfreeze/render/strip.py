"""``inspect --strip``: the whole model as one line of cells, one per layer, in model order.

Each cell is coloured (and shaped, for terminals without colour) by what the layer does in
``fit()``: its weights train, they are frozen, it is a BN layer in inference mode, or it has
no weights. Containers are not cells (their layers are). The strip wraps to the console width
with the index of each line's first cell in front, so a 1,000-layer model is a dozen lines,
and the frozen boundary shows as the place where the cells change. Under it: a legend with
counts, and the runs of training / not-training layers named by their first and last layer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.text import Text

from bnfreeze.model.records import LayerState, Normalization, Report


class Cell(enum.Enum):
    """A layer's effective mode in ``fit()``, as the strip shows it."""

    TRAINING = "training"  # weights train (BN: batch statistics, statistics update)
    FROZEN = "frozen"  # weights do not train
    BN_INFERENCE = "bn-inference"  # BN normalizing with its moving statistics
    NO_WEIGHTS = "no-weights"
    UNKNOWN = "unknown"  # a custom layer whose weights the file cannot show


GLYPH = {
    Cell.TRAINING: "█",
    Cell.FROZEN: "░",
    Cell.BN_INFERENCE: "▒",
    Cell.NO_WEIGHTS: "·",
    Cell.UNKNOWN: "?",
}

#: Frozen is grey ("off"); BN inference keeps the table's cyan. Blue and cyan were tried for
#: frozen and BN inference: in Rich's SVG palette they are nearly the same colour.
STYLE = {
    Cell.TRAINING: "bold green",
    Cell.FROZEN: "grey62",
    Cell.BN_INFERENCE: "bold cyan",
    Cell.NO_WEIGHTS: "dim",
    Cell.UNKNOWN: "magenta",
}

LABEL = {
    Cell.TRAINING: "training",
    Cell.FROZEN: "frozen",
    Cell.BN_INFERENCE: "BN inference",
    Cell.NO_WEIGHTS: "no weights",
    Cell.UNKNOWN: "unknown",
}

#: At most this many runs are named under the strip; the rest are counted.
RUNS_SHOWN = 8


def cell_of(state: LayerState) -> Cell:
    fit = state.in_fit
    if fit.normalizes_with is Normalization.BATCH:
        return Cell.TRAINING
    if fit.normalizes_with is Normalization.MOVING:
        return Cell.BN_INFERENCE
    if fit.trains_weights is True:
        return Cell.TRAINING
    if fit.trains_weights is False:
        return Cell.FROZEN
    if state.has_weights is None:
        return Cell.UNKNOWN
    return Cell.NO_WEIGHTS


def strip_cells(report: Report) -> tuple[tuple[LayerState, Cell], ...]:
    """One cell per layer that is not a container or a wrapper, in model order."""
    return tuple((s, cell_of(s)) for s in report.layers if not s.layer.is_container)


@dataclass(frozen=True)
class Run:
    """Consecutive cells that all train, or all do not (cells without weights join the run
    they sit in)."""

    training: bool
    first: int  # 1-based cell index
    last: int
    first_path: str
    last_path: str


def runs(cells: Iterable[tuple[LayerState, Cell]]) -> tuple[Run, ...]:
    out: list[Run] = []
    current: list[tuple[int, str]] = []
    training: bool | None = None
    pending: list[tuple[int, str]] = []  # weightless cells between runs
    for index, (state, cell) in enumerate(cells, start=1):
        if cell in (Cell.NO_WEIGHTS, Cell.UNKNOWN):
            pending.append((index, state.layer.path))
            continue
        is_training = cell is Cell.TRAINING
        if training is None or is_training == training:
            current.extend(pending)
        else:
            out.append(_run(training, current))
            current = list(pending)
        pending = []
        training = is_training
        current.append((index, state.layer.path))
    if training is not None:
        current.extend(pending)
        out.append(_run(training, current))
    return tuple(out)


def _run(training: bool, members: list[tuple[int, str]]) -> Run:
    return Run(training, members[0][0], members[-1][0], members[0][1], members[-1][1])


class Strip:
    """The cells, wrapped to the width Rich gives it."""

    def __init__(self, cells: tuple[tuple[LayerState, Cell], ...]) -> None:
        self.cells = cells

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        total = len(self.cells)
        digits = len(str(max(total, 1)))
        per_line = max(10, options.max_width - digits - 1)
        if per_line > 10:
            per_line -= per_line % 10  # whole tens: line starts read 1, 101, 201...
        for start in range(0, total, per_line):
            line = Text(f"{start + 1:>{digits}} ", style="dim")
            for _, cell in self.cells[start : start + per_line]:
                line.append(GLYPH[cell], style=STYLE[cell])
            yield line

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        digits = len(str(max(len(self.cells), 1)))
        return Measurement(digits + 11, digits + 1 + max(len(self.cells), 10))


def legend(cells: tuple[tuple[LayerState, Cell], ...]) -> Text:
    counts = {c: 0 for c in Cell}
    for _, cell in cells:
        counts[cell] += 1
    text = Text()
    for cell in Cell:
        if cell is Cell.UNKNOWN and not counts[cell]:
            continue
        if text:
            text.append("   ")
        text.append(GLYPH[cell], style=STYLE[cell])
        text.append(f" {LABEL[cell]} {counts[cell]}")
    return text


def runs_text(found: tuple[Run, ...]) -> Text:
    text = Text()
    for run in found[:RUNS_SHOWN]:
        if text:
            text.append("\n")
        label = "training" if run.training else "not training"
        style = STYLE[Cell.TRAINING] if run.training else STYLE[Cell.FROZEN]
        span = f"{run.first}" if run.first == run.last else f"{run.first}-{run.last}"
        text.append(f"{span:>11}  ", style="dim")
        text.append(f"{label:<12}", style=style)
        names = run.first_path if run.first == run.last else f"{run.first_path} … {run.last_path}"
        text.append(f"  {names}")
    rest = len(found) - RUNS_SHOWN
    if rest > 0:
        text.append(f"\n{'':>11}  … and {rest} more runs (see --json or the table view)", "dim")
    return text


def strip_view(report: Report) -> Group:
    """The strip, its legend and its runs."""
    cells = strip_cells(report)
    if not cells:
        return Group(Text("The model lists no layers.", style="dim"))
    containers = len(report.layers) - len(cells)
    # The summary counts every layer; the strip leaves containers out, and says so.
    counted = f"{len(cells)} layers"
    if containers:
        counted = f"{len(cells)} of {len(report.layers)}: no containers"
    return Group(
        Text(f"In fit(), one cell per layer in model order ({counted}):", "bold"),
        Strip(cells),
        legend(cells),
        Text(""),
        runs_text(runs(cells)),
    )
