"""Warnings as lines of text for stderr. Pure, and free of Rich so ``--json`` stays lean."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

from bnfreeze.model.records import Finding, WarningCode

#: Up to this many warnings of one kind are shown in full. A larger group shows its first
#: warning in full and names the other layers on one summary line.
WARNINGS_SHOWN_PER_CODE = 3

#: At most this many further layer paths are named on a group's summary line.
PATHS_NAMED = 4

PREFIX = "warning: "


def warning_lines(findings: Iterable[Finding], width: int | None = None) -> list[str]:
    """One entry per warning to print, grouped by code in order of first appearance.

    With ``width``, each entry is wrapped to it with a hanging indent under the message, so an
    entry may contain newlines; without, each entry is one line.
    """
    groups: dict[WarningCode, list[Finding]] = {}
    for finding in findings:
        groups.setdefault(finding.code, []).append(finding)
    lines: list[str] = []
    for code, group in groups.items():
        if len(group) <= WARNINGS_SHOWN_PER_CODE:
            lines.extend(PREFIX + f.message for f in group)
            continue
        lines.append(PREFIX + group[0].message)
        rest = group[1:]
        paths = [f.path for f in rest if f.path]
        line = f"{PREFIX}{len(rest)} more {code.value} warnings"
        if paths:
            named = ", ".join(paths[:PATHS_NAMED])
            more = len(paths) - PATHS_NAMED
            line += f", for {named}" + (f" and {more} more" if more > 0 else "")
        lines.append(line + " (all listed by --json).")
    if width is None:
        return lines
    return [_wrap(line, width) for line in lines]


def warning_text(message: str, width: int | None = None) -> str:
    """One warning that is not a :class:`Finding` (a measured report's problem), prefixed and
    wrapped like :func:`warning_lines`."""
    line = PREFIX + message
    return line if width is None else _wrap(line, width)


def _wrap(line: str, width: int) -> str:
    return textwrap.fill(
        line,
        width=max(width, 40),
        subsequent_indent=" " * len(PREFIX),
        break_long_words=False,
        break_on_hyphens=False,
    )
