"""The ``check`` gate: do a saved model's predicted ``fit()`` behaviour and flags hold what a
plan or ``--expect`` says? No Keras needed: the prediction comes from ``inspect``.

Three kinds of outcome, each a list of failures (layer, expected, actual):

* **expectations**, from ``--expect`` or a plan's ``[[expect]]`` tables
  (:mod:`bnfreeze.model.expectations`, the same vocabulary ``verify --expect`` measures);
* **plan flags**: with a plan, every leaf layer's ``trainable`` must be what the plan's rules
  would set, i.e. applying the plan would change no layer's behaviour (containers' own flags
  are not compared: Keras 3 ignores them, docs/semantics.md, rule 3);
* **strict**: with ``strict=True``, the two Keras 3 traps that ``inspect`` warns about fail
  the check too: a call-site ``training=False`` relied on to keep BN layers in inference mode
  (Keras 3 overrides it in ``fit()``), and a trainable BN layer under a frozen container (on
  Keras 3 only a layer's own flag counts).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from bnfreeze.model.assignments import current_flags
from bnfreeze.model.expectations import Expectation, Failure, evaluate, observed_from_states
from bnfreeze.model.records import LayerRecord, Report, Runtime, WarningCode
from bnfreeze.model.selection import is_leaf
from bnfreeze.ops.inspect import inspect_file
from bnfreeze.ops.plans import Plan, apply_rules, flagless, resolve_bn_config

#: The warning codes ``--strict`` turns into failures.
STRICT_CODES = (
    WarningCode.CALL_SITE_TRAINING_IGNORED,
    WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER,
)


@dataclass(frozen=True)
class Outcome:
    """One thing that was checked and its failures (none: it holds)."""

    name: str  # "bn-inference", "plan flags", "strict: call-site-training-ignored"
    source: str | None  # "--expect", "plans/x.toml:12: expect 1", "--strict"
    description: str | None
    failures: tuple[Failure, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class CheckResult:
    report: Report
    plan: Plan | None
    outcomes: tuple[Outcome, ...]
    strict: bool

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)

    @property
    def failures(self) -> tuple[Failure, ...]:
        return tuple(f for o in self.outcomes for f in o.failures)


def check_file(
    path: str | os.PathLike[str],
    *,
    plan: Plan | None = None,
    expectations: Sequence[Expectation] = (),
    strict: bool = False,
    runtime: Runtime = Runtime.KERAS3,
) -> CheckResult:
    """Check a saved model file, predicted with ``runtime``'s rules. Raises ``BnfreezeError``
    (exit 2) for bad input: an unreadable model, a plan rule or an expectation that matches
    nothing."""
    return check_report(
        inspect_file(path, runtime), plan=plan, expectations=expectations, strict=strict
    )


def check_report(
    report: Report,
    *,
    plan: Plan | None = None,
    expectations: Sequence[Expectation] = (),
    strict: bool = False,
) -> CheckResult:
    layers = tuple(s.layer for s in report.layers)
    observed = observed_from_states(report.layers)
    outcomes: list[Outcome] = []
    if plan is not None and plan.rules:
        outcomes.append(_plan_flags(plan, report))
    for expectation in (*(plan.expectations if plan is not None else ()), *expectations):
        outcomes.append(
            Outcome(
                name=expectation.name,
                source=expectation.source,
                description=expectation.label,
                failures=evaluate(expectation, layers, observed),
            )
        )
    if strict:
        for code in STRICT_CODES:
            findings = [f for f in report.warnings if f.code is code]
            outcomes.append(
                Outcome(
                    name=f"strict: {code.value}",
                    source="--strict",
                    description=_STRICT_DESCRIPTIONS[code],
                    failures=tuple(
                        Failure(
                            f"strict: {code.value}",
                            f.path,
                            *_strict_expected_actual(code, f.path, report),
                        )
                        for f in findings
                    ),
                )
            )
    return CheckResult(report=report, plan=plan, outcomes=tuple(outcomes), strict=strict)


_STRICT_DESCRIPTIONS = {
    WarningCode.CALL_SITE_TRAINING_IGNORED: (
        "no BN layer relies on a call-site training=False (Keras 3 overrides it in fit())"
    ),
    WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER: (
        "no trainable BN layer sits under a frozen container (it trains anyway on Keras 3)"
    ),
}


def _strict_expected_actual(code: WarningCode, path: str | None, report: Report) -> tuple[str, str]:
    if code is WarningCode.CALL_SITE_TRAINING_IGNORED:
        return ("BN in inference by trainable=False", "training=False, ignored in fit()")
    container = "its container"
    if path is not None:
        by_path = {s.layer.path: s.layer for s in report.layers}
        parent = by_path[path].parent if path in by_path else None
        while parent is not None:
            if by_path[parent].trainable is False:
                container = parent
                break
            parent = by_path[parent].parent
    return (f"frozen, like {container}", "trains in fit()")


def _plan_flags(plan: Plan, report: Report) -> Outcome:
    layers = tuple(s.layer for s in report.layers)
    before = current_flags(layers)
    skip = flagless(report.model.config, layers)
    after = apply_rules(plan, layers, before, without_flag=skip).flags
    failures = tuple(
        Failure(
            "plan flags",
            r.path,
            f"trainable={after[r.path]}",
            f"trainable={before[r.path]}",
        )
        for r in layers
        if is_leaf(r) and before.get(r.path) != after.get(r.path)
    )
    by_path = {r.path: r for r in layers}
    bn_config = resolve_bn_config(plan, layers)
    classes = tuple(
        Failure("plan flags", path, f"bn={want}", f"bn={_bn_class(by_path[path])}")
        for path, want in bn_config.classes
        if _bn_class(by_path[path]) != want
    )
    synchronized = tuple(
        Failure(
            "plan flags",
            path,
            f"synchronized={want}",
            f"synchronized={by_path[path].synchronized}",
        )
        for path, want in bn_config.synchronized
        if by_path[path].synchronized != want
    )
    return Outcome(
        name="plan flags",
        source=plan.path,
        description="every layer's trainable flag (and BN class and synchronized value) is "
        "what the plan's rules set",
        failures=failures + classes + synchronized,
    )


def _bn_class(record: LayerRecord) -> str:
    """A BN layer's class in a plan's words: "frozen-stats" or "batchnorm"."""
    return "frozen-stats" if record.frozen_stats else "batchnorm"
