"""Renderers for ``check``: the failures (or, verbosely, every outcome) and the JSON contract."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from bnfreeze.model.expectations import Failure
from bnfreeze.ops.check import CheckResult, Outcome
from bnfreeze.render.columns import Column, ColumnTable, Kind
from bnfreeze.render.json import SCHEMA_VERSION, dumps, model_dict, runtime_dict
from bnfreeze.render.table import Trimmed

STYLE_PASS = "bold green"
STYLE_FAIL = "bold red"


def headline(result: CheckResult) -> Text:
    """One line: what was checked and whether it all holds."""
    model = result.report.model.path
    total = len(result.outcomes)
    failed = [o for o in result.outcomes if not o.passed]
    if not failed:
        text = Text("PASS", style=STYLE_PASS)
        text.append(f"  {model}: all {total} checks hold.")
        return text
    text = Text("FAIL", style=STYLE_FAIL)
    failures = sum(len(o.failures) for o in failed)
    text.append(
        f"  {model}: {len(failed)} of {total} checks fail, "
        f"{failures} failure{'s' if failures != 1 else ''}."
    )
    return text


def outcomes_table(result: CheckResult) -> ColumnTable:
    """Every check and whether it holds (the ``-v`` view)."""
    rows = []
    for outcome in result.outcomes:
        name = Text(outcome.name)
        if outcome.description:
            name.append(f"\n{outcome.description}", style="dim")
        if outcome.passed:
            verdict = Text("holds", style=STYLE_PASS)
        else:
            count = len(outcome.failures)
            verdict = Text(f"{count} failure{'s' if count != 1 else ''}", style=STYLE_FAIL)
        rows.append((name, verdict, Text(outcome.source or "", style="dim")))
    columns = (
        Column("check", Kind.WRAP, wrap_first=True),
        Column("result"),
        Column("from", Kind.PATH),
    )
    return ColumnTable(columns, rows)


def failures_table(failures: tuple[Failure, ...]) -> ColumnTable:
    """Each failure of one check: the layer, what was expected and what the model does."""
    columns = (
        Column("layer", Kind.PATH, group=True),
        Column("expected", Kind.WRAP),
        Column("actual", Kind.WRAP),
    )
    rows = (
        (
            Text(f.path or "(model)"),
            Text(f.expected),
            Text(f.actual, style="red"),
        )
        for f in failures
    )
    return ColumnTable(columns, rows)


def failures_view(failures: tuple[Failure, ...]) -> Group:
    """The failures grouped by check: the check's name on a line of its own, whole (names
    such as ``strict: trainable-bn-under-frozen-container`` never wrap), then its table."""
    by_check: dict[str, list[Failure]] = {}
    for failure in failures:
        by_check.setdefault(failure.expectation, []).append(failure)
    parts: list[RenderableType] = []
    for name, found in by_check.items():
        if parts:
            parts.append(Text(""))
        parts += [Text(name, style="bold", no_wrap=True), failures_table(tuple(found))]
    return Group(*parts)


def check_view(result: CheckResult, *, verbose: bool = False) -> RenderableType:
    """Nothing worth printing on success unless ``verbose``: the CLI stays quiet then."""
    parts: list[RenderableType] = [headline(result)]
    if verbose:
        parts += [Text(""), outcomes_table(result)]
    if result.failures:
        parts += [Text(""), failures_view(result.failures)]
    return Trimmed(Group(*parts))


def failure_dict(failure: Failure) -> dict[str, Any]:
    return {
        "check": failure.expectation,
        "path": failure.path,
        "expected": failure.expected,
        "actual": failure.actual,
    }


def outcome_dict(outcome: Outcome) -> dict[str, Any]:
    return {
        "check": outcome.name,
        "source": outcome.source,
        "description": outcome.description,
        "passed": outcome.passed,
        "failures": len(outcome.failures),
    }


def check_dict(result: CheckResult) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "check",
        "model": model_dict(result.report.model),
        "runtime": runtime_dict(result.report.runtime),
        "plan": result.plan.path if result.plan is not None else None,
        "strict": result.strict,
        "passed": result.passed,
        "checks": [outcome_dict(o) for o in result.outcomes],
        "failures": [failure_dict(f) for f in result.failures],
    }


def render_check(result: CheckResult) -> str:
    return dumps(check_dict(result))
