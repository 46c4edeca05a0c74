"""TOML freeze plans: a recipe of ordered rules (later rules win) plus expectations.

A plan is read with the standard library's ``tomllib`` and validated into frozen values:
:class:`Plan` holds :class:`Rule` values, each a :class:`Selector` (which layers) and an
action (``trainable`` and ``bn``), and :class:`~bnfreeze.model.expectations.Expectation` values for
``bnfreeze check``. The schema is documented in ``docs/plans.md``; in short::

    [plan]
    name = "freeze-up-to"

    [params]                     # defaults, overridden with --set block=...
    block = "block_12_add"

    [[rule]]                     # no selector: every layer
    trainable = true
    bn = "inference"             # "inference" | "train" | "follow" (the default)

    [[rule]]
    up_to = "${block}"
    trainable = false

    [[expect]]
    bn = "inference"

Each rule maps onto an :class:`~bnfreeze.model.assignments.Assignment` and is applied with
:func:`~bnfreeze.model.assignments.assign` in file order, so a later rule overrides an earlier
one for the layers both select. Selecting a container selects every layer below it: a
container's own flag does not propagate when Keras loads a saved model (docs/semantics.md,
rule 6), so every leaf is edited.

Every problem raises :class:`~bnfreeze.errors.PlanError` naming the file, the line where it
can be recovered (``tomllib`` reports lines for syntax errors; for semantic errors the line of
the offending key or table header is found by scanning the text) and the key. Parsing never
raises anything else.

The schema is in :mod:`bnfreeze.ops.plan_schema` and the parser in
:mod:`bnfreeze.ops.plan_parser`; this module applies a plan to a model.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from bnfreeze.errors import PlanError
from bnfreeze.model.assignments import Assignment, Flags, assign, current_flags, stores_flag
from bnfreeze.model.records import LayerKind, LayerRecord
from bnfreeze.model.selection import is_leaf
from bnfreeze.ops.optimizer_state import parse_mode

# The parser's entry points, re-exported: callers read and apply plans from one module.
from bnfreeze.ops.plan_parser import SCHEMA_HINT
from bnfreeze.ops.plan_parser import ShippedPlan as ShippedPlan
from bnfreeze.ops.plan_parser import find_plan as find_plan
from bnfreeze.ops.plan_parser import load_plan as load_plan
from bnfreeze.ops.plan_parser import parse_plan as parse_plan
from bnfreeze.ops.plan_parser import parse_sets as parse_sets
from bnfreeze.ops.plan_parser import shipped_plans as shipped_plans
from bnfreeze.ops.plan_schema import Plan, Rule, Where
from bnfreeze.ops.request import (
    BnConfig,
    EditRequest,
    EditResult,
    LayerSelection,
    Loading,
    Output,
)


@dataclass(frozen=True)
class RuleMatch:
    """How many leaves a rule selected when the plan met a model."""

    rule: Rule
    selected: int


@dataclass(frozen=True)
class PlanOutcome:
    """The flags a plan gives a model's layers, and what each rule selected."""

    flags: Flags
    matches: tuple[RuleMatch, ...]


def apply_rules(
    plan: Plan,
    layers: Sequence[LayerRecord],
    flags: Flags,
    *,
    without_flag: Collection[str] = (),
) -> PlanOutcome:
    """Apply every rule in order to ``flags`` (later rules win). A rule that selects nothing
    raises :class:`PlanError` with its file and line. ``without_flag`` names layers whose
    saved config stores no flag (see :func:`bnfreeze.model.assignments.stores_flag`): never set."""
    if not plan.rules and plan.phases:
        raise PlanError(
            f"{plan.path}: the plan holds [[phase]] tables and no [[rule]]: it is a "
            "fine-tuning schedule, not an edit.",
            hint="Run it with bnfreeze.finetune(model, PLAN, x, y) (docs/finetune.md).",
        )
    if not plan.rules:
        raise PlanError(
            f"{plan.path}: the plan has no [[rule]] table, so it changes nothing.",
            hint="Add a [[rule]], or use the plan with bnfreeze check. " + SCHEMA_HINT,
        )
    matches = []
    for rule in plan.rules:
        selected = rule.selector.leaves(layers)
        flags = assign(layers, flags, selected, rule.assignment(), without_flag=without_flag)
        matches.append(RuleMatch(rule, len(selected)))
    return PlanOutcome(flags=flags, matches=tuple(matches))


# --------------------------------------------------------------------------------- parsing


# ------------------------------------------------------------------------------- applying


@dataclass(frozen=True)
class PlanSelection(LayerSelection):
    """A plan resolved against one model, as the selection the edit applies:
    every layer a rule selected, plus every container whose flag the plan changes."""

    paths: tuple[str, ...] = ()

    def apply(self, records: Sequence[LayerRecord]) -> tuple[LayerRecord, ...]:
        wanted = set(self.paths)
        chosen = tuple(r for r in records if r.path in wanted)
        if len(chosen) != len(wanted):
            missing = sorted(wanted - {r.path for r in chosen})[:3]
            raise PlanError(
                f"the model changed while the plan was applied: no layer {', '.join(missing)}."
            )
        return chosen


@dataclass(frozen=True)
class PlanAssignment(Assignment):
    """A plan resolved against one model, as the assignment the edit applies:
    each selected layer's final flag after every rule, later rules winning.

    ``others`` and ``batchnorm`` are None, so :func:`~bnfreeze.model.assignments.assign` sets
    exactly these flags and applies no container rule of its own (the plan's rules already did).
    """

    flags: tuple[tuple[str, bool | None], ...] = ()

    def value_for(self, record: LayerRecord) -> bool | None:
        return dict(self.flags).get(record.path)


def flagless(config: dict[str, Any], layers: Sequence[LayerRecord]) -> set[str]:
    """Leaves whose saved config stores no ``trainable`` (operations recorded as layers):
    a plan never sets them (see :func:`bnfreeze.model.assignments.stores_flag`)."""
    return {r.path for r in layers if is_leaf(r) and not stores_flag(config, r)}


def resolve_plan(
    plan: Plan, layers: Sequence[LayerRecord], *, without_flag: Collection[str] = ()
) -> tuple[PlanSelection, PlanAssignment, PlanOutcome]:
    """The plan as one selection and one assignment for an :class:`EditRequest`.

    Refuses (``PlanError``) a plan that treats BN and other layers differently in a rule
    that selects a custom layer class: only a loaded model can tell whether it subclasses
    BatchNormalization (docs/semantics.md, rule 7), and a plan is resolved from the file.
    """
    before = current_flags(layers)
    outcome = apply_rules(plan, layers, before, without_flag=without_flag)
    touched: set[str] = set()
    for rule in plan.rules:
        picked = rule.selector.leaves(layers)
        touched.update(r.path for r in picked)
        assignment = rule.assignment()
        custom = sorted({r.class_name for r in picked if r.kind is LayerKind.UNKNOWN})
        if custom and assignment.batchnorm != assignment.others:
            where = rule.where or Where(plan.path, None)
            raise PlanError(
                f"{where}: the rule gives BN layers and other layers different flags, and it "
                f"selects custom layer classes ({', '.join(custom[:3])}) that may subclass "
                "BatchNormalization, which only a loaded model can tell.",
                hint="Exclude them with a selector, or use bnfreeze freeze --engine keras.",
            )
    touched.update(p for p in outcome.flags if outcome.flags[p] != before.get(p))
    paths = tuple(r.path for r in layers if r.path in touched)
    flags = tuple((p, outcome.flags[p]) for p in paths)
    return (
        PlanSelection(paths=paths),
        PlanAssignment(others=None, batchnorm=None, flags=flags),
        outcome,
    )


def resolve_bn_config(plan: Plan, layers: Sequence[LayerRecord]) -> BnConfig:
    """The BN class (``bn = "frozen-stats"``, and plain BN again for ``"inference"`` and
    ``"train"``) and ``synchronized`` values the plan's rules give, later rules winning. A
    rule with ``bn = "frozen-stats"`` or ``synchronized`` that selects no BN layer is an error."""
    classes: dict[str, str] = {}
    synchronized: dict[str, bool] = {}
    for rule in plan.rules:
        if rule.bn_class is None and rule.synchronized is None:
            continue
        bns = [r for r in rule.selector.leaves(layers) if r.is_batchnorm]
        for key, given in (
            ("bn", rule.bn_class == "frozen-stats"),
            ("synchronized", rule.synchronized is not None),
        ):
            if given and not bns:
                where = rule.where or Where(plan.path, None)
                raise PlanError(
                    f"{where.at(key)}: the rule selects no BatchNormalization layer, so "
                    f"{key} has nothing to change."
                )
        for record in bns:
            if rule.bn_class is not None:
                classes[record.path] = rule.bn_class
            if rule.synchronized is not None:
                synchronized[record.path] = rule.synchronized
    order = [r.path for r in layers]
    return BnConfig(
        classes=tuple((p, classes[p]) for p in order if p in classes),
        synchronized=tuple((p, synchronized[p]) for p in order if p in synchronized),
    )


@dataclass(frozen=True)
class PlannedEdit:
    """A plan resolved against one model: the edit request it makes, and how many layers
    each rule selected."""

    plan: Plan
    matches: tuple[RuleMatch, ...]
    request: EditRequest


@dataclass(frozen=True)
class PlanApplication:
    """What ``apply`` did: the plan, how many layers each rule selected, and the
    :class:`~bnfreeze.ops.request.EditResult` of the write (or of the dry run)."""

    plan: Plan
    matches: tuple[RuleMatch, ...]
    result: EditResult


def plan_edit_request(
    path: str | os.PathLike[str],
    plan: Plan,
    output: Output,
    *,
    optimizer_state: str | None = None,
) -> PlannedEdit:
    """Resolve ``plan`` against the saved model at ``path`` into one :class:`EditRequest`.

    It is applied like ``freeze`` (:func:`bnfreeze.runtime.routes.apply_plan`): the output is
    checked before any work, written atomically and verified by re-reading; every byte but
    the config is kept; when the set of trainable variables changes, saved optimizer state is
    remapped, dropped or kept as ``optimizer_state`` says (else the plan's ``[plan]
    optimizer_state``, else remap); a dry run writes nothing.
    """
    from bnfreeze.formats.readers import read_model
    from bnfreeze.model.walk import walk

    mode = parse_mode(optimizer_state if optimizer_state is not None else plan.optimizer_state)
    model = read_model(path, weights=False)
    walked = walk(model.config, model.path)
    selection, assignment, outcome = resolve_plan(
        plan, walked.layers, without_flag=flagless(model.config, walked.layers)
    )
    request = EditRequest(
        model=os.fspath(path),
        assignment=assignment,
        selection=selection,
        output=output,
        loading=Loading(optimizer_state=mode),
        bn_config=resolve_bn_config(plan, walked.layers),
    )
    return PlannedEdit(plan=plan, matches=outcome.matches, request=request)
