"""The values of a TOML plan, read with positions: the line of each table and key, found by
scanning the text (:class:`TomlLines`; ``tomllib`` has none), and the readers of one value
(a string with its ``${param}`` references substituted, a list of patterns, a member of an
Enum, a count) that raise a :class:`~bnfreeze.errors.PlanError` naming the file, the line,
the table and the key (:class:`PlanValues`). :mod:`bnfreeze.ops.plan_parser` reads the
tables with them; :func:`bnfreeze.ops.phases.read_phase` reads a ``[[phase]]``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from bnfreeze.errors import PlanError
from bnfreeze.ops.plan_schema import Where
from bnfreeze.ops.plan_schema import type_name as _type

#: A ``[params]`` name, and a ``--set`` one.
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PARAM_REF = re.compile(r"\$\{([^}]*)\}")


class TomlLines:
    """Find the line of a table header or a key by scanning the text (tomllib has no
    positions). Best effort: returns None when the layout is unusual (inline tables)."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([^\]]*?)\s*\]\]?")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str, bool]] = []  # (line number, name, is array)
        for number, line in enumerate(self.lines, start=1):
            match = self._HEADER.match(line)
            if match and not _inside_string(line, match.start(1)):
                array = line.lstrip().startswith("[[")
                self.headers.append((number, match.group(1).replace('"', "").strip(), array))

    def table(self, name: str, index: int | None = None) -> int | None:
        """The header line of ``[name]``, or of the index-th ``[[name]]`` (0-based)."""
        seen = 0
        for number, header, array in self.headers:
            if header != name:
                continue
            if index is None and not array:
                return number
            if index is not None and array:
                if seen == index:
                    return number
                seen += 1
        return None

    def key(self, key: str, table: str | None, index: int | None = None) -> int | None:
        """The line of ``key = ...`` inside a table (None: top level)."""
        if table is None:
            start, end = 1, (self.headers[0][0] - 1 if self.headers else len(self.lines))
        else:
            start_line = self.table(table, index)
            if start_line is None:
                return None
            later = [n for n, _, _ in self.headers if n > start_line]
            start, end = start_line, (later[0] - 1 if later else len(self.lines))
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*[=.]")
        for number in range(start, end + 1):
            if pattern.match(self.lines[number - 1]):
                return number
        return start if table is not None else None


def _inside_string(line: str, pos: int) -> bool:
    return line[:pos].count('"') % 2 == 1


class PlanValues:
    """Reads one value of a plan's tables, or says precisely where it is wrong."""

    def __init__(self, text: str, source: str, params: Mapping[str, str]) -> None:
        self.text = text
        self.source = source
        self.overrides = dict(params)
        self.lines = TomlLines(text)
        self.params: dict[str, str] = {}

    # errors ---------------------------------------------------------------------------
    def error(
        self,
        message: str,
        *,
        table: str | None = None,
        index: int | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> PlanError:
        line = None
        if key is not None:
            line = self.lines.key(key, table, index)
        elif table is not None:
            line = self.lines.table(table, index)
        label = table_label(table, index)
        where = str(Where(self.source, line, label))
        if key is not None:
            where += f", key {key!r}" if label else f": key {key!r}"
        return PlanError(f"{where}: {message}", hint=hint)

    # values ---------------------------------------------------------------------------
    def unknown_keys(
        self, table: dict[str, Any], allowed: Sequence[str], kind: str | None, index: int | None
    ) -> None:
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = (
                f"Did you mean {close[0]!r}?" if close else (f"Allowed keys: {', '.join(allowed)}.")
            )
            raise self.error(f"unknown key {key!r}.", table=kind, index=index, key=key, hint=hint)

    def substitute(self, value: str, kind: str | None, index: int | None, key: str) -> str:
        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.params:
                known = ", ".join(sorted(self.params)) or "none; declare them in [params]"
                raise self.error(
                    f"unknown parameter ${{{name}}} (parameters: {known}).",
                    table=kind,
                    index=index,
                    key=key,
                )
            return self.params[name]

        return _PARAM_REF.sub(replace, value)

    def opt_str(
        self, table: dict[str, Any], key: str, kind: str | None, index: int | None
    ) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(
                f"must be a string, not {_type(value)}.", table=kind, index=index, key=key
            )
        return self.substitute(value, kind, index, key)

    def opt_bool(
        self, table: dict[str, Any], key: str, kind: str | None, index: int | None
    ) -> bool | None:
        value = table.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.error(
                f"must be true or false, not {_type(value)}.", table=kind, index=index, key=key
            )
        return value

    def layer_name(self, table: dict[str, Any], key: str, kind: str, index: int) -> str | None:
        value = self.opt_str(table, key, kind, index)
        if value is not None and not value.strip():
            raise self.error("names no layer (empty).", table=kind, index=index, key=key)
        return value

    def patterns(
        self, table: dict[str, Any], key: str, kind: str, index: int, check: Any
    ) -> tuple[str, ...]:
        value = table.get(key)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            raise self.error(
                f"must be a string or a non-empty list of strings, not {_type(value)}.",
                table=kind,
                index=index,
                key=key,
            )
        out = []
        for item in items:
            pattern = self.substitute(item, kind, index, key)
            problem = check(pattern)
            if problem:
                raise self.error(problem, table=kind, index=index, key=key)
            out.append(pattern)
        return tuple(out)

    def enum(self, cls: Any, value: Any, kind: str, index: int, key: str) -> Any:
        choices = ", ".join(f'"{m.value}"' for m in cls)
        if not isinstance(value, str):
            raise self.error(
                f"must be one of {choices}, not {_type(value)}.", table=kind, index=index, key=key
            )
        try:
            return cls(value)
        except ValueError:
            raise self.error(
                f"{value!r} is not one of {choices}.", table=kind, index=index, key=key
            ) from None

    def count(self, value: Any, kind: str, index: int, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(
                f"must be a whole number >= 0, not {_type(value)}.",
                table=kind,
                index=index,
                key=key,
            )
        return value

    def opt_count(self, table: dict[str, Any], key: str, kind: str, index: int) -> int | None:
        if key not in table:
            return None
        return self.count(table[key], kind, index, key)


def table_label(table: str | None, index: int | None) -> str | None:
    if table is None:
        return None
    if index is None:
        return f"[{table}]"
    return f"{table} {index + 1}"
