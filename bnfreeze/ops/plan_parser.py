"""Reading a TOML plan: ``tomllib`` for the syntax, then a validating pass that turns the
tables into :mod:`bnfreeze.ops.plan_schema` values, substitutes ``${param}`` references and
reports every problem as a :class:`~bnfreeze.errors.PlanError` with the file, line and key.

Plans ship inside the package, in ``bnfreeze/recipes/*.toml`` (package data, the one source):
``--plan keras-guide-finetune`` names one, ``bnfreeze plans`` lists them (:func:`shipped_plans`).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import BnfreezeError, PlanError
from bnfreeze.model.expectations import Expectation, ExpectKind
from bnfreeze.ops.phases import Phase, read_phase
from bnfreeze.ops.plan_reader import PARAM_NAME, PlanValues, table_label
from bnfreeze.ops.plan_schema import (
    EXPECT_ASSERTIONS,
    EXPECT_KEYS,
    OPTIMIZER_STATES,
    PLAN_KEYS,
    RULE_KEYS,
    SCHEMA,
    SELECTOR_KEYS,
    TOP_KEYS,
    BnAction,
    Only,
    Plan,
    Rule,
    Selector,
    Where,
)
from bnfreeze.ops.plan_schema import glob_problem as _check_glob
from bnfreeze.ops.plan_schema import regex_problem as _check_regex
from bnfreeze.ops.plan_schema import type_name as _type

#: The largest plan file read. Plans are a few hundred bytes; anything near this is a mistake.
MAX_PLAN_BYTES = 1 * 2**20


#: Where the hints send a user for the schema: what an installed bnfreeze has.
SCHEMA_HINT = "See the shipped plans (bnfreeze plans) and bnfreeze's docs/plans.md for the schema."

#: The folder of the shipped plans, inside the installed package.
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class ShippedPlan:
    """A plan that ships with bnfreeze: ``--plan NAME`` takes it by name."""

    name: str
    description: str
    path: Path


def shipped_plans() -> tuple[ShippedPlan, ...]:
    """The shipped plans, by name, read from ``bnfreeze/recipes/*.toml``."""
    found = []
    for path in sorted(RECIPES.glob("*.toml")):
        plan = parse_plan(path.read_text(encoding="utf-8"), str(path))
        found.append(ShippedPlan(path.stem, plan.description or "", path))
    return tuple(found)


def find_plan(spec: str | os.PathLike[str]) -> Path:
    """The file ``--plan SPEC`` names: a path to a TOML file, or the name of a shipped plan
    (``keras-guide-finetune``, with or without ``.toml``) when no such file exists."""
    p = Path(spec)
    if p.exists():
        return p
    text = os.fspath(spec)
    stem = text[: -len(".toml")] if text.endswith(".toml") else text
    if "/" not in stem and os.sep not in stem and stem:
        shipped = RECIPES / f"{stem}.toml"
        if shipped.is_file():
            return shipped
    names = ", ".join(path.stem for path in sorted(RECIPES.glob("*.toml")))
    raise PlanError(
        f"{p}: no such plan file.",
        hint=f"Shipped plans, taken by name (bnfreeze plans describes them): {names}.",
    )


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``--set name=value`` options as a dict."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not PARAM_NAME.match(name):
            raise PlanError(f"--set {item!r}: write NAME=VALUE, e.g. --set block=block_12_add.")
        out[name] = value
    return out


def load_plan(path: str | os.PathLike[str], params: Mapping[str, str] | None = None) -> Plan:
    """Read and validate a plan file, or a shipped plan by name (:func:`find_plan`);
    ``params`` override the plan's ``[params]`` defaults."""
    p = find_plan(path)
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_PLAN_BYTES + 1)
    except FileNotFoundError:
        raise PlanError(f"{p}: no such plan file.") from None
    except IsADirectoryError:
        raise PlanError(f"{p}: is a directory, not a plan file.") from None
    except OSError as exc:
        raise PlanError(f"{p}: cannot be read ({exc.strerror or exc}).") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError(f"{p}: larger than {MAX_PLAN_BYTES // 2**20} MiB; not a plan file.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{p}: not UTF-8 text (byte {exc.start}); a plan is a TOML file.") from None
    return parse_plan(text, str(p), params)


def load_phases(
    path: str | os.PathLike[str], params: Mapping[str, str] | None = None
) -> tuple[Phase, ...]:
    """The ``[[phase]]`` tables of a plan file or shipped plan, for ``bnfreeze.finetune``."""
    plan = load_plan(path, params)
    if not plan.phases:
        raise BnfreezeError(
            f"plan {plan.name or str(path)!r} has no [[phase]] tables; apply it with "
            "bnfreeze apply, or give finetune a plan with phases (bnfreeze plans)."
        )
    return plan.phases


def parse_plan(text: str, source: str = "<plan>", params: Mapping[str, str] | None = None) -> Plan:
    """Parse and validate plan text. Raises only :class:`PlanError`."""
    try:
        return _Parser(text, source, params or {}).plan()
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise PlanError(f"{source}: nested too deeply to be a plan.") from None


class _Parser(PlanValues):
    # top level ------------------------------------------------------------------------
    def plan(self) -> Plan:
        if len(self.text) > MAX_PLAN_BYTES:
            raise PlanError(f"{self.source}: larger than {MAX_PLAN_BYTES // 2**20} MiB.")
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            message = str(exc)
            match = re.search(r"\(at line (\d+), column (\d+)\)", message)
            text = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message)
            where = f"{self.source}:{match.group(1)}" if match else self.source
            raise PlanError(f"{where}: not valid TOML: {text}.") from None
        return self.plan_from(data)

    def plan_from(self, data: dict[str, Any]) -> Plan:
        self.unknown_keys(data, TOP_KEYS, None, None)
        meta = data.get("plan", {})
        if not isinstance(meta, dict):
            raise self.error("'plan' must be a table: [plan].", key="plan")
        self.unknown_keys(meta, PLAN_KEYS, "plan", None)
        name = self.opt_str(meta, "name", "plan", None)
        description = self.opt_str(meta, "description", "plan", None)
        optimizer_state = self.opt_str(meta, "optimizer_state", "plan", None)
        if optimizer_state is not None and optimizer_state not in OPTIMIZER_STATES:
            raise self.error(
                f"optimizer_state must be one of {', '.join(OPTIMIZER_STATES)}, not "
                f"{optimizer_state!r}.",
                table="plan",
                key="optimizer_state",
            )
        schema = meta.get("schema", SCHEMA)
        if schema != SCHEMA or isinstance(schema, bool):
            raise self.error(
                f"schema {schema!r} is not supported; this bnfreeze reads schema {SCHEMA}.",
                table="plan",
                key="schema",
            )
        self.read_params(data.get("params", {}))
        rules = tuple(self.rule(table, i) for i, table in enumerate(self.tables(data, "rule")))
        expectations = tuple(
            self.expectation(table, i) for i, table in enumerate(self.tables(data, "expect"))
        )
        phases = tuple(self.phase(table, i) for i, table in enumerate(self.tables(data, "phase")))
        if not rules and not expectations and not phases:
            raise self.error(
                "the plan has no [[rule]], [[expect]] or [[phase]] table.",
                hint=SCHEMA_HINT,
            )
        return Plan(
            path=self.source,
            name=name,
            description=description,
            params=tuple(sorted(self.params.items())),
            rules=rules,
            expectations=expectations,
            optimizer_state=optimizer_state,
            phases=phases,
        )

    def read_params(self, params: Any) -> None:
        if not isinstance(params, dict):
            raise self.error("'params' must be a table: [params].", key="params")
        for name, value in params.items():
            if not PARAM_NAME.match(name):
                raise self.error(
                    f"parameter name {name!r} must be letters, digits and underscores.",
                    table="params",
                    key=name,
                )
            if not isinstance(value, str):
                raise self.error(
                    f"parameter {name!r} must be a string, not {_type(value)}.",
                    table="params",
                    key=name,
                )
            self.params[name] = value
        for name, value in self.overrides.items():
            if name not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise PlanError(
                    f"--set {name}=...: {self.source} has no parameter {name!r} "
                    f"(its parameters: {known})."
                )
            self.params[name] = value

    def tables(self, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
        value = data.get(key, [])
        if isinstance(value, dict):
            raise self.error(
                f"write [[{key}]] (an array of tables), not [{key}].",
                table=key,
            )
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise self.error(f"'{key}' must be [[{key}]] tables.", key=key)
        return value

    # rules and expectations -----------------------------------------------------------
    def rule(self, table: dict[str, Any], index: int) -> Rule:
        self.unknown_keys(table, RULE_KEYS, "rule", index)
        selector = self.selector(table, "rule", index)
        name = self.opt_str(table, "name", "rule", index)
        trainable = self.opt_bool(table, "trainable", "rule", index)
        bn_value = table.get("bn")
        bn = (
            BnAction.FOLLOW
            if bn_value is None
            else self.enum(BnAction, bn_value, "rule", index, "bn")
        )
        synchronized = self.opt_bool(table, "synchronized", "rule", index)
        self.check_rule_actions(index, selector, trainable, bn_value, bn, synchronized)
        key_lines = tuple(
            (key, line)
            for key in ("trainable", "bn", "synchronized")
            if key in table and (line := self.lines.key(key, "rule", index)) is not None
        )
        label = table_label("rule", index)
        where = Where(self.source, self.lines.table("rule", index), label, key_lines)
        return Rule(
            selector=selector,
            trainable=trainable,
            bn=bn,
            name=name,
            where=where,
            synchronized=synchronized,
        )

    def check_rule_actions(
        self,
        index: int,
        selector: Selector,
        trainable: bool | None,
        bn_value: Any,
        bn: BnAction,
        synchronized: bool | None,
    ) -> None:
        """A rule does something, and nothing it cannot do."""
        if trainable is None and bn_value is None and synchronized is None:
            raise self.error(
                'the rule has no action: give trainable = true/false, bn = "inference" | '
                '"train" | "frozen-stats", synchronized = true/false, or several.',
                table="rule",
                index=index,
            )
        if trainable is None and bn_value is not None and bn is BnAction.FOLLOW:
            raise self.error(
                'bn = "follow" takes the rule\'s trainable value, but the rule sets none.',
                table="rule",
                index=index,
                key="bn",
            )
        if selector.only is Only.NON_BN and bn is not BnAction.FOLLOW:
            raise self.error(
                'the rule selects only non-BN layers (only = "non-bn"), so bn has no effect.',
                table="rule",
                index=index,
                key="bn",
            )
        if selector.only is Only.NON_BN and synchronized is not None:
            raise self.error(
                'the rule selects only non-BN layers (only = "non-bn"), so synchronized has '
                "no effect.",
                table="rule",
                index=index,
                key="synchronized",
            )

    def expectation(self, table: dict[str, Any], index: int) -> Expectation:
        self.unknown_keys(table, EXPECT_KEYS, "expect", index)
        selector = self.selector(table, "expect", index)
        name = self.opt_str(table, "name", "expect", index)
        given = [k for k in EXPECT_ASSERTIONS if k in table]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise self.error(
                f"an [[expect]] states exactly one of bn, trains, min_training, max_training "
                f"(found: {what}).",
                table="expect",
                index=index,
                key=given[1] if len(given) > 1 else None,
            )
        key = given[0]
        value = table[key]
        count = None
        if key == "bn":
            action = self.enum(BnAction, value, "expect", index, "bn")
            if action is BnAction.FOLLOW:
                raise self.error(
                    'an expectation\'s bn is "inference", "train" or "frozen-stats".',
                    table="expect",
                    index=index,
                    key="bn",
                )
            if selector.only is Only.NON_BN:
                raise self.error(
                    'only = "non-bn" selects no BN layer, so a bn expectation has nothing '
                    "to check.",
                    table="expect",
                    index=index,
                    key="bn",
                )
            kind = {
                BnAction.INFERENCE: ExpectKind.BN_INFERENCE,
                BnAction.TRAIN: ExpectKind.BN_TRAIN,
                BnAction.FROZEN_STATS: ExpectKind.BN_FROZEN_STATS,
            }[action]
        elif key == "trains":
            if not isinstance(value, bool):
                raise self.error(
                    f"must be true or false, not {_type(value)}.",
                    table="expect",
                    index=index,
                    key=key,
                )
            kind = ExpectKind.TRAINS if value else ExpectKind.FROZEN
        else:
            count = self.count(value, "expect", index, key)
            kind = ExpectKind.MIN_TRAINING if key == "min_training" else ExpectKind.MAX_TRAINING
        line = self.lines.table("expect", index)
        return Expectation(
            kind=kind,
            scope=None if selector.is_everything else selector,
            count=count,
            source=str(Where(self.source, line, table_label("expect", index))),
            label=name,
        )

    def phase(self, table: dict[str, Any], index: int) -> Phase:
        return read_phase(self, table, index)

    def selector(self, table: dict[str, Any], kind: str, index: int) -> Selector:
        label = table_label(kind, index)
        key_lines = tuple(
            (key, line)
            for key in SELECTOR_KEYS
            if key in table and (line := self.lines.key(key, kind, index)) is not None
        )
        layers = self.patterns(table, "layers", kind, index, _check_glob)
        regex = self.patterns(table, "regex", kind, index, _check_regex)
        classes = self.patterns(table, "class", kind, index, _check_glob)
        only = table.get("only")
        only_value = None if only is None else self.enum(Only, only, kind, index, "only")
        up_to_spec = self.layer_name(table, "up_to", kind, index)
        from_spec = self.layer_name(table, "from", kind, index)
        depth = self.opt_count(table, "depth", kind, index)
        min_depth = self.opt_count(table, "min_depth", kind, index)
        max_depth = self.opt_count(table, "max_depth", kind, index)
        if depth is not None and (min_depth is not None or max_depth is not None):
            raise self.error(
                "give depth, or min_depth / max_depth, not both.",
                table=kind,
                index=index,
                key="depth",
            )
        if min_depth is not None and max_depth is not None and min_depth > max_depth:
            raise self.error(
                f"min_depth {min_depth} is greater than max_depth {max_depth}.",
                table=kind,
                index=index,
                key="min_depth",
            )
        return Selector(
            layers=layers,
            regex=regex,
            classes=classes,
            only=only_value,
            up_to=up_to_spec,
            from_=from_spec,
            depth=depth,
            min_depth=min_depth,
            max_depth=max_depth,
            where=Where(self.source, self.lines.table(kind, index), label, key_lines),
        )
