"""Renderers for ``apply``: the plan's rules and what each selected, then the edit itself in
the ``freeze`` style (:mod:`bnfreeze.render.edit`), and the JSON contract."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.text import Text

from bnfreeze.ops.plans import PlanApplication, RuleMatch, ShippedPlan
from bnfreeze.render.columns import Column, ColumnTable, Kind
from bnfreeze.render.edit import edit_dict, edit_view
from bnfreeze.render.json import dumps
from bnfreeze.render.table import STYLE_NONE, Trimmed


def rules_table(matches: tuple[RuleMatch, ...]) -> ColumnTable:
    """One row per rule, in order (later rules win): where, what, how many layers."""
    rows = []
    for number, match in enumerate(matches, start=1):
        rule = match.rule
        text = Text(rule.name or rule.describe())
        if rule.name:
            text.append(f"\n{rule.describe()}", style=STYLE_NONE)
        if rule.where is not None and rule.where.line is not None:
            text.append(f"  (line {rule.where.line})", style=STYLE_NONE)
        rows.append((Text(str(number)), text, Text(str(match.selected))))
    columns = (
        Column("#", justify="right"),
        Column("rule", Kind.WRAP, wrap_first=True),
        Column("layers", justify="right"),
    )
    return ColumnTable(columns, rows)


def apply_view(application: PlanApplication) -> Trimmed:
    plan = application.plan
    title = Text("Plan ", style="bold")
    title.append(plan.name or plan.path)
    if plan.name:
        title.append(f"  {plan.path}", style=STYLE_NONE)
    params = ", ".join(f"{k}={v}" for k, v in plan.params)
    parts: list[Any] = [title]
    if params:
        parts.append(Text(f"Parameters: {params}", style=STYLE_NONE))
    parts += [rules_table(application.matches), Text(""), edit_view(application.result)]
    return Trimmed(Group(*parts))


def rule_dict(number: int, match: RuleMatch) -> dict[str, Any]:
    rule = match.rule
    return {
        "rule": number,
        "line": rule.where.line if rule.where is not None else None,
        "name": rule.name,
        "selects": rule.selector.describe(),
        "trainable": rule.trainable,
        "bn": rule.bn.value,
        "synchronized": rule.synchronized,
        "selected": match.selected,
    }


def apply_dict(application: PlanApplication) -> dict[str, Any]:
    """The ``freeze --json`` document, plus ``plan``: its path, parameters and rules."""
    document = edit_dict(application.result, command="apply")
    plan = application.plan
    document["plan"] = {
        "path": plan.path,
        "name": plan.name,
        "params": dict(plan.params),
        "rules": [rule_dict(i, m) for i, m in enumerate(application.matches, start=1)],
    }
    return document


def render_apply(application: PlanApplication) -> str:
    return dumps(apply_dict(application))


def plans_text(plans: tuple[ShippedPlan, ...], width: int = 80) -> str:
    """``bnfreeze plans``: each shipped plan's name, then its description indented and
    wrapped to ``width`` (names stay whole, on a line of their own, for ``grep``)."""
    import textwrap

    lines: list[str] = []
    for plan in plans:
        lines.append(plan.name)
        lines.extend(
            textwrap.wrap(
                plan.description or "(no description)",
                width=max(width, 40),
                initial_indent="    ",
                subsequent_indent="    ",
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)
