"""The plan schema: the keys a TOML plan may hold, and the frozen values it is validated into
(:class:`Plan`, :class:`Rule`, :class:`Selector`). The format is documented in
``docs/plans.md``; :mod:`bnfreeze.ops.plan_parser` reads text into these values and
:mod:`bnfreeze.ops.plans` applies them."""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnfreeze.errors import BnfreezeError, PlanError
from bnfreeze.model.assignments import Assignment
from bnfreeze.model.expectations import Expectation
from bnfreeze.model.records import LayerRecord
from bnfreeze.model.selection import find_layer, is_leaf, layers_from, layers_up_to, match_glob

if TYPE_CHECKING:
    from bnfreeze.ops.phases import Phase

SCHEMA = 1


TOP_KEYS = ("plan", "params", "rule", "expect", "phase")


PLAN_KEYS = ("name", "description", "schema", "optimizer_state")
#: The values of ``[plan] optimizer_state`` (what ``--optimizer-state`` takes).
OPTIMIZER_STATES = ("remap", "drop", "keep")


SELECTOR_KEYS = (
    "layers",
    "regex",
    "class",
    "only",
    "up_to",
    "from",
    "depth",
    "min_depth",
    "max_depth",
)


RULE_KEYS = ("name", *SELECTOR_KEYS, "trainable", "bn", "synchronized")


EXPECT_ASSERTIONS = ("bn", "trains", "min_training", "max_training")


EXPECT_KEYS = ("name", *SELECTOR_KEYS, *EXPECT_ASSERTIONS)


#: A ``[[phase]]`` table: its selector names what trains (bnfreeze.finetune, docs/finetune.md).
PHASE_KEYS = ("name", *SELECTOR_KEYS, "epochs", "bn", "learning_rate", "learning_rates")


class Only(enum.Enum):
    """The "BN only" / "non-BN only" selector."""

    BN = "bn"
    NON_BN = "non-bn"


class BnAction(enum.Enum):
    """What a rule does to the BN layers it selects."""

    INFERENCE = "inference"  # trainable=False: moving statistics in fit(), nothing updates
    TRAIN = "train"  # trainable=True: batch statistics in fit(), statistics update
    FOLLOW = "follow"  # whatever the rule's ``trainable`` gives the other layers
    #: FrozenStatsBatchNormalization, trainable=True: moving statistics in fit(), never
    #: updated, gamma/beta train (``freeze --bn-frozen-stats``; a change of class).
    FROZEN_STATS = "frozen-stats"


@dataclass(frozen=True)
class Where:
    """Where something is in a plan file, for error messages: ``file:line: rule 2``."""

    file: str
    line: int | None
    table: str | None = None  # "rule 2", "expect 1", "[params]"
    key_lines: tuple[tuple[str, int], ...] = ()  # the line of each key in the table

    def __str__(self) -> str:
        text = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{text}: {self.table}" if self.table else text

    def at(self, key: str | None) -> str:
        """``file:line: rule 2, key 'up_to'``, with the key's own line when known."""
        if key is None:
            return str(self)
        line = dict(self.key_lines).get(key, self.line)
        return f"{Where(self.file, line, self.table)}, key {key!r}"


@dataclass(frozen=True)
class Selector:
    """Which layers a rule or an expectation is about: the intersection of every given
    selector, restricted to leaves (layers whose own flag can be set)."""

    layers: tuple[str, ...] = ()  # globs on path or name
    regex: tuple[str, ...] = ()  # re.search on the path
    classes: tuple[str, ...] = ()  # globs on the class name
    only: Only | None = None
    up_to: str | None = None
    from_: str | None = None
    depth: int | None = None
    min_depth: int | None = None
    max_depth: int | None = None
    where: Where | None = field(default=None, compare=False)

    @property
    def is_everything(self) -> bool:
        return self == Selector()

    def leaves(self, layers: Sequence[LayerRecord]) -> tuple[LayerRecord, ...]:
        """The selected leaves in model order; a selector that matches nothing is an error."""
        chosen = {r.path for r in layers}
        for key, patterns in (
            ("layers", self.layers),
            ("regex", self.regex),
            ("class", self.classes),
        ):
            if not patterns:
                continue
            union: set[str] = set()
            for pattern in patterns:
                hit = _pattern_hits(layers, key, pattern)
                if not hit:
                    raise self._error(f"{key} {pattern!r} matches no layer.", key)
                union |= hit
            chosen &= union
        for key, spec, resolve in (
            ("up_to", self.up_to, layers_up_to),
            ("from", self.from_, layers_from),
        ):
            if spec is None:
                continue
            try:
                find_layer(layers, spec)
                chosen &= resolve(layers, spec)
            except BnfreezeError as exc:
                raise self._error(str(exc), key) from None
        result = tuple(r for r in layers if r.path in chosen and is_leaf(r) and self._keeps(r))
        if not result:
            raise self._error(f"{self.describe()} matches no layer whose flag can be set.", None)
        return result

    def paths(self, layers: Sequence[LayerRecord]) -> set[str]:
        """The :class:`~bnfreeze.model.expectations.Scope` protocol."""
        return {r.path for r in self.leaves(layers)}

    def _keeps(self, record: LayerRecord) -> bool:
        if self.only is Only.BN and not record.is_batchnorm:
            return False
        if self.only is Only.NON_BN and record.is_batchnorm:
            return False
        if self.depth is not None and record.depth != self.depth:
            return False
        if self.min_depth is not None and record.depth < self.min_depth:
            return False
        return not (self.max_depth is not None and record.depth > self.max_depth)

    def describe(self) -> str:
        parts: list[str] = []
        for key, values in (
            ("layers", self.layers),
            ("regex", self.regex),
            ("class", self.classes),
        ):
            if values:
                parts.append(f"{key}={'|'.join(values)}")
        if self.only is not None:
            parts.append(f"only={self.only.value}")
        if self.up_to is not None:
            parts.append(f"up_to={self.up_to}")
        if self.from_ is not None:
            parts.append(f"from={self.from_}")
        for key in ("depth", "min_depth", "max_depth"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value}")
        return ",".join(parts) if parts else "every layer"

    def _error(self, message: str, key: str | None) -> PlanError:
        if self.where is None:
            return PlanError(message)
        return PlanError(f"{self.where.at(key)}: {message}")


def _pattern_hits(layers: Sequence[LayerRecord], key: str, pattern: str) -> set[str]:
    """Paths a ``layers`` glob, a ``regex`` or a ``class`` glob hits, plus every layer below
    a hit container."""
    if key == "layers":
        return match_glob(layers, pattern)
    if key == "regex":
        compiled = re.compile(pattern)
        hits = {r.path for r in layers if compiled.search(r.path)}
    else:
        hits = {r.path for r in layers if fnmatch.fnmatchcase(r.class_name, pattern)}
    if not hits:
        return set()
    prefixes = tuple(p + "/" for p in hits)
    return {r.path for r in layers if r.path in hits or r.path.startswith(prefixes)}


@dataclass(frozen=True)
class Rule:
    """Give the selected layers ``trainable`` and, for BN layers, ``bn`` and
    ``synchronized``.

    ``bn = "frozen-stats"`` makes the selected BN layers ``FrozenStatsBatchNormalization``
    with ``trainable = True``; ``"inference"`` and ``"train"`` make any of them plain
    ``BatchNormalization`` again (each names the whole mode). ``synchronized`` sets the
    BN layers' ``synchronized`` config value, as ``bnfreeze sync-bn`` does."""

    selector: Selector
    trainable: bool | None
    bn: BnAction
    name: str | None = None
    where: Where | None = field(default=None, compare=False)
    synchronized: bool | None = None

    @property
    def bn_class(self) -> str | None:
        """The class the rule gives its BN layers: "frozen-stats", "batchnorm" or None (kept)."""
        if self.bn is BnAction.FROZEN_STATS:
            return "frozen-stats"
        if self.bn in (BnAction.INFERENCE, BnAction.TRAIN):
            return "batchnorm"
        return None

    def assignment(self) -> Assignment:
        """The rule as an :class:`~bnfreeze.model.assignments.Assignment` (None: left as it is)."""
        batchnorm = {
            BnAction.INFERENCE: False,
            BnAction.TRAIN: True,
            BnAction.FOLLOW: self.trainable,
            BnAction.FROZEN_STATS: True,
        }[self.bn]
        others = self.trainable
        if self.selector.only is Only.BN:
            others = None  # do not let the container rule touch containers of BN-only picks
        if self.selector.only is Only.NON_BN:
            batchnorm = None
        return Assignment(others=others, batchnorm=batchnorm)

    def describe(self) -> str:
        action = []
        if self.trainable is not None:
            action.append(f"trainable={str(self.trainable).lower()}")
        if self.bn is not BnAction.FOLLOW or (self.trainable is None and self.synchronized is None):
            action.append(f"bn={self.bn.value}")
        if self.synchronized is not None:
            action.append(f"synchronized={str(self.synchronized).lower()}")
        return f"{self.selector.describe()}: {', '.join(action)}"


@dataclass(frozen=True)
class Plan:
    """A parsed, validated plan with its parameters substituted."""

    path: str
    name: str | None
    description: str | None
    params: tuple[tuple[str, str], ...]
    rules: tuple[Rule, ...]
    expectations: tuple[Expectation, ...]
    #: ``[plan] optimizer_state``: "remap", "drop" or "keep"; None when the plan leaves it to
    #: the command line (default remap).
    optimizer_state: str | None = None
    #: ``[[phase]]`` tables, as :class:`bnfreeze.ops.phases.Phase` values: a fine-tuning
    #: schedule for ``bnfreeze.finetune``; ``apply`` and ``check`` ignore them.
    phases: tuple[Phase, ...] = ()


def type_name(value: Any) -> str:
    """A TOML value as an error message names it: ``the string 'x'``, ``a table``."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def glob_problem(pattern: str) -> str | None:
    """A glob is bad when it is empty or opens a ``[...]`` class it never closes."""
    if not pattern:
        return "an empty pattern matches nothing."
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] in "!^":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            close = pattern.find("]", j)
            if close == -1:
                return f"bad glob {pattern!r}: '[' at position {i} is never closed."
            i = close + 1
            continue
        i += 1
    return None


def regex_problem(pattern: str) -> str | None:
    """A regex is bad when it is empty or does not compile."""
    if not pattern:
        return "an empty regex matches every layer; leave regex out instead."
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"bad regex {pattern!r}: {exc}."
    except (OverflowError, RecursionError, ValueError) as exc:
        return f"bad regex {pattern!r}: {exc}."
    return None
