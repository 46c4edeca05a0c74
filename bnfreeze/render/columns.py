"""The column layout every table shares (``inspect``, ``freeze``/``unfreeze``, ``apply``,
``check``, ``verify``, ``diff``, ``explain``): a Rich renderable that lays itself out for the
width it is finally rendered at, and draws itself line by line.

When every cell fits, the table is drawn at its natural widths in the look of Rich's
``SIMPLE_HEAD`` box (a bold header, a rule, one line per row, two spaces between columns):
ten times faster than Rich's table layout for the hundreds of rows of a big model. When it
does not fit, columns give up room in this order, each only as much as needed:

1. a ``CLASS`` column shows ``BN`` for ``BatchNormalization``, and cuts names longer than 16
   columns with an ellipsis;
2. ``WRAP`` columns of free text (``wrap_first``) wrap at spaces, down to their
   ``min_width``;
3. a ``PATH`` column of full paths (``group``) shows each layer by its name, indented under a
   row for its container, as the ``inspect`` table does (the full path is the container's
   path, "/", the name);
4. a ``PATH`` column breaks its longest paths before a ``/`` (or at a space), onto a
   continuation line indented by two: every name stays whole;
5. the other ``WRAP`` columns wrap, rightmost first;
6. a ``CLASS`` column is cut with an ellipsis (down to 10 columns), then hidden;
7. as a last resort a ``PATH`` column narrows further, and a piece longer than the column is
   cut from the left with an ellipsis, ``…depthwise_BN``. A path never breaks mid-word.

No line ends with a space.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text

__all__ = [
    "CLASS_MIN_WIDTH",
    "PATH_MIN_WIDTH",
    "SHORT_CLASS",
    "Column",
    "ColumnTable",
    "Kind",
    "break_path",
]

#: Long class names are cut to this first ("DepthwiseConv2D", "GlobalAveragePo…")...
CLASS_SOFT_WIDTH = 16
#: ... and the class column is never cut below this ("Functional", "DepthwiseC…").
CLASS_MIN_WIDTH = 10
#: Nor a path column, unless the console is too narrow for anything.
PATH_MIN_WIDTH = 16
#: Two spaces between columns, as Rich's collapsed padding draws them.
GAP = 2
#: Spaces of indentation per level of nesting, as in the inspect table.
INDENT = 2
#: The short labels a narrow class column shows: every table says "BN layers".
SHORT_CLASS = {
    "BatchNormalization": "BN",
    "SyncBatchNormalization": "SyncBN",
    "FrozenStatsBatchNormalization": "FrozenStatsBN",
    "BatchNormalization(synchronized)": "SyncBN",
}
ELLIPSIS = "…"


class Kind(enum.Enum):
    """How a column gives up room when the table is too wide (see the module docstring)."""

    FIXED = "fixed"  # never narrowed: short words such as "True → False"
    WRAP = "wrap"  # wraps at spaces, down to its min_width
    CLASS = "class"  # a Keras class name: short label, then cut, then hidden
    PATH = "path"  # a layer path: breaks before "/", cut from the left as a last resort


@dataclass(frozen=True)
class Column:
    header: str
    kind: Kind = Kind.FIXED
    #: WRAP: the narrowest it wraps to (default: its longest word, header included).
    min_width: int | None = None
    justify: str = "left"  # or "right"
    #: WRAP: wrap before a path breaks (free text, such as a check's name).
    wrap_first: bool = False
    #: PATH: full layer paths, which may show as names under a row for their container.
    group: bool = False


def _pieces(text: Text) -> list[Text]:
    """``text`` split where a path may break: before each ``/`` and after each run of
    spaces (the spaces stay at the end of their piece and are dropped at a line end)."""
    plain = text.plain
    cuts = [0]
    for i in range(1, len(plain)):
        if (plain[i] == "/" and plain[i - 1] != "/") or (plain[i] != " " and plain[i - 1] == " "):
            cuts.append(i)
    cuts.append(len(plain))
    return [text[a:b] for a, b in itertools.pairwise(cuts) if b > a]


def _cut_left(piece: Text, width: int) -> Text:
    if piece.cell_len <= width:
        return piece
    if width <= 1:
        return Text(ELLIPSIS[:width])
    keep = piece[len(piece.plain) - (width - 1) :]
    while keep.cell_len > width - 1:  # wide characters
        keep = keep[1:]
    cut = Text(ELLIPSIS, style=piece.style)
    cut.append_text(keep)
    return cut


def break_path(text: Text, width: int) -> list[Text]:
    """A path (or an indented name) as lines of at most ``width`` cells.

    Lines break before a ``/`` or at a space; a piece longer than a line is cut from the left
    with an ellipsis. Leading indentation stays on the first line; later lines get it too,
    plus two spaces, so they read as the continuation of the row's path.
    """
    if text.cell_len <= width:
        return [text]
    plain = text.plain
    indent = len(plain) - len(plain.lstrip(" "))
    body = text[indent:]
    first_room = max(width - indent, 1)
    more = indent + 2 if width - indent - 2 >= 8 else indent
    more_room = max(width - more, 1)
    lines: list[Text] = []
    current = Text()
    for piece in _pieces(body):
        room = first_room if not lines else more_room
        if current.plain and current.cell_len + len(piece.plain.rstrip(" ")) > room:
            lines.append(current)
            current = Text()
            room = more_room
        if not current.plain:
            piece = _cut_left(piece, room) if len(piece.plain.rstrip(" ")) > room else piece
        current.append_text(piece)
    if current.plain:
        lines.append(current)
    out = []
    for number, line in enumerate(lines):
        pad = indent if number == 0 else more
        line.rstrip()
        out.append(Text(" " * pad).append_text(line) if pad else line)
    return out


def _words_width(text: Text) -> int:
    return max((len(word) for word in text.plain.split()), default=0)


class ColumnTable:
    """A table of :class:`Column` s and rows of :class:`~rich.text.Text` cells (a cell may
    hold several lines), laid out as the module docstring says.

    ``spaced``: a blank line between rows, for rows of several lines each.
    """

    def __init__(
        self, columns: Sequence[Column], rows: Iterable[Sequence[Text]], *, spaced: bool = False
    ) -> None:
        self.columns = tuple(columns)
        self.rows = [tuple(row) for row in rows]
        self.spaced = spaced
        self._naturals: dict[tuple[int, bool], int] = {}
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"a row has {len(row)} cells for {len(self.columns)} columns")

    # -- widths -----------------------------------------------------------------------------

    def _cells(self, index: int) -> Iterable[Text]:
        return (row[index] for row in self.rows)

    def _natural(self, index: int, short: bool = False) -> int:
        key = (index, short)
        if key not in self._naturals:  # a 1,000-row table is measured more than once
            widest = len(self.columns[index].header)
            for cell in self._cells(index):
                if short:
                    cell = _short(cell)
                plain = cell.plain
                if "\n" in plain:
                    widest = max(widest, *(cell_len(line) for line in plain.split("\n")))
                else:
                    widest = max(widest, cell.cell_len)
            self._naturals[key] = widest
        return self._naturals[key]

    def _wrap_floor(self, index: int) -> int:
        column = self.columns[index]
        if column.min_width is not None:
            return column.min_width
        return max(
            [_words_width(Text(column.header))] + [_words_width(c) for c in self._cells(index)]
        )

    def _unbreakable(self, index: int) -> int:
        """The narrowest a path column gets without cutting a name: its longest piece, with
        the indentation of continuation lines."""
        widest = len(self.columns[index].header)
        for cell in self._cells(index):
            for line in cell.plain.split("\n"):
                if cell_len(line) <= widest:
                    continue
                indent = len(line) - len(line.lstrip(" "))
                pieces = _pieces(Text(line[indent:]))
                first = cell_len(pieces[0].plain.rstrip(" ")) if pieces else 0
                rest = max((cell_len(p.plain.rstrip(" ")) for p in pieces[1:]), default=0)
                widest = max(widest, indent + first, indent + 2 + rest if rest else 0)
        return widest

    def natural_width(self) -> int:
        return sum(self._natural(i) for i in range(len(self.columns))) + GAP * (
            len(self.columns) - 1
        )

    def _grouped(self, index: int) -> ColumnTable:
        """This table with the full paths of column ``index`` shown as in ``inspect``: each
        layer's name, indented under a (bold) row for its container, which is added where the
        row above is not that container already."""
        columns = list(self.columns)
        columns[index] = Column(columns[index].header, Kind.PATH)
        rows: list[tuple[Text, ...]] = []
        above: list[str] = []
        for row in self.rows:
            cell = row[index]
            parts = cell.plain.split("/")
            ancestors = parts[:-1]
            common = 0
            while common < min(len(ancestors), len(above)) and ancestors[common] == above[common]:
                common += 1
            for level in range(common, len(ancestors)):
                header = [Text("") for _ in columns]
                header[index] = Text(" " * (INDENT * level) + ancestors[level], style="bold")
                rows.append(tuple(header))
            name = cell[len(cell.plain) - len(parts[-1]) :]
            if ancestors:
                name = Text(" " * (INDENT * len(ancestors))).append_text(name)
            rows.append((*row[:index], name, *row[index + 1 :]))
            above = parts
        return ColumnTable(columns, rows, spaced=self.spaced)

    def layout(self, max_width: int) -> tuple[ColumnTable, list[int], bool]:
        """The table to draw (this one, or :meth:`_grouped`), its column widths for
        ``max_width`` (0: hidden), and whether class names are shortened."""
        widths = [self._natural(i) for i in range(len(self.columns))]
        short = False

        def excess() -> int:
            shown = [w for w in widths if w]
            return sum(shown) + GAP * (len(shown) - 1) - max_width

        classes = [i for i, c in enumerate(self.columns) if c.kind is Kind.CLASS]
        # 1. Short class labels: "BN" says what "BatchNormalizat…" cannot.
        if classes and excess() > 0:
            short = True
            for i in classes:
                widths[i] = self._natural(i, short=True)
        # 2. Cut long class names ("GlobalAveragePo…"), down to CLASS_SOFT_WIDTH.
        for i in classes:
            if excess() > 0 and widths[i] > CLASS_SOFT_WIDTH:
                widths[i] = max(CLASS_SOFT_WIDTH, widths[i] - excess())
        wraps = [i for i in reversed(range(len(self.columns))) if self.columns[i].kind is Kind.WRAP]
        # 3. Wrap free text.
        for i in wraps:
            if self.columns[i].wrap_first and excess() > 0:
                widths[i] = max(min(widths[i], self._wrap_floor(i)), widths[i] - excess())
        paths = [i for i, c in enumerate(self.columns) if c.kind is Kind.PATH]
        # 4. Names under their containers, as inspect shows them (laid out afresh).
        for i in paths:
            if self.columns[i].group and excess() > 0:
                return self._grouped(i).layout(max_width)
        # 5. Break paths before a "/": every name stays whole.
        for i in paths:
            if excess() > 0:
                widths[i] = max(self._unbreakable(i), widths[i] - excess())
        # 6. Wrap the other WRAP columns, rightmost first.
        for i in wraps:
            if excess() > 0:
                widths[i] = max(min(widths[i], self._wrap_floor(i)), widths[i] - excess())
        # 7. Cut, then hide CLASS columns.
        for i in classes:
            if excess() > 0:
                widths[i] = max(CLASS_MIN_WIDTH, widths[i] - excess())
            if excess() > 0:
                widths[i] = 0
        # 8. Cut paths from the left.
        for i in paths:
            if excess() > 0:
                widths[i] = max(min(PATH_MIN_WIDTH, widths[i]), widths[i] - excess())
        return self, widths, short

    # -- drawing ----------------------------------------------------------------------------

    def _lines(self, console: Console, cell: Text, column: Column, width: int) -> list[Text]:
        plain = cell.plain
        if "\n" not in plain and (plain.isascii() and len(plain) <= width):
            return [cell]  # the common case, checked cheaply
        if column.kind is Kind.PATH:
            out: list[Text] = []
            for line in cell.split("\n"):
                out.extend(break_path(line, width))
            return out
        if column.kind is Kind.CLASS:
            return [
                line if line.cell_len <= width else _cut_right(line, width)
                for line in cell.split("\n")
            ]
        if column.kind is Kind.WRAP and cell.cell_len > width:
            return list(cell.wrap(console, width, overflow="fold"))
        return list(cell.split("\n"))

    def lines(self, console: Console, max_width: int) -> list[Text]:
        table, widths, short = self.layout(max_width)
        if table is not self:
            return table.lines(console, max_width)
        shown = [i for i, w in enumerate(widths) if w]
        header = [
            Text(self.columns[i].header).wrap(console, widths[i], overflow="fold") for i in shown
        ]
        out = self._draw(
            [list(lines) for lines in header], [widths[i] for i in shown], shown, bottom=True
        )
        for line in out:
            line.stylize("bold")
        out.append(Text("─" * (sum(widths[i] for i in shown) + GAP * (len(shown) - 1))))
        for number, row in enumerate(self.rows):
            if self.spaced and number:
                out.append(Text(""))
            cells = []
            for i in shown:
                cell = _short(row[i]) if short and self.columns[i].kind is Kind.CLASS else row[i]
                cells.append(self._lines(console, cell, self.columns[i], widths[i]))
            out.extend(self._draw(cells, [widths[i] for i in shown], shown))
        return out

    def _draw(
        self, cells: list[list[Text]], widths: list[int], shown: list[int], bottom: bool = False
    ) -> list[Text]:
        height = max((len(c) for c in cells), default=1)
        out = []
        for n in range(height):
            line = Text()
            for k, (lines, width) in enumerate(zip(cells, widths, strict=True)):
                offset = height - len(lines) if bottom else 0
                part = lines[n - offset] if 0 <= n - offset < len(lines) else Text("")
                if k:
                    line.append(" " * GAP)
                pad = " " * max(width - part.cell_len, 0)
                if self.columns[shown[k]].justify == "right":
                    line.append(pad)
                    line.append_text(part)
                else:
                    line.append_text(part)
                    line.append(pad)
            line.rstrip()
            out.append(line)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # Each line already fits (see layout): its segments go out as they are, without
        # Rich wrapping every line again (450 lines of EfficientNetV2L: 70 ms -> ~15 ms).
        for line in self.lines(console, options.max_width):
            if line.cell_len <= options.max_width:
                yield from line.render(console, end="\n")
            else:
                yield line

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        natural = self.natural_width()
        return Measurement(min(natural, options.max_width), min(natural, options.max_width))


def _short(cell: Text) -> Text:
    label = SHORT_CLASS.get(cell.plain)
    return Text(label, style=cell.style) if label is not None else cell


def _cut_right(line: Text, width: int) -> Text:
    line = line.copy()
    line.truncate(width, overflow="ellipsis")
    return line
