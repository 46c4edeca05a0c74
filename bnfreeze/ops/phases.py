"""Phases of a fine-tuning schedule: what trains, what BatchNormalization does and at which
learning rate, for how many epochs. :func:`bnfreeze.finetune` runs them; a plan's
``[[phase]]`` tables hold them (docs/plans.md); docs/finetune.md is the user's guide.

A phase names what trains; every other layer is frozen. Which layers train uses the selection
vocabulary of ``freeze`` and ``unfreeze`` (globs on layer paths or names, ``up_to``,
``from_``; in a plan also ``regex``, ``class``, ``only`` and the depths), through the plan
:class:`~bnfreeze.ops.plan_schema.Selector`. ``bn`` says what the BatchNormalization layers do
in the phase's ``fit()``, in Keras's own words (the ``BatchNormalization`` docstring): with
``trainable = False`` "the layer will be subsequently run in inference mode (meaning that it
will use the moving mean and the moving variance to normalize the current batch, rather than
using the mean and variance of the current batch)".

This module is pure: it never imports Keras.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from bnfreeze.errors import BnfreezeError
from bnfreeze.model.expectations import Expectation, ExpectKind
from bnfreeze.model.records import LayerRecord
from bnfreeze.model.selection import is_leaf, match_glob
from bnfreeze.ops.plan_schema import PHASE_KEYS, Selector, glob_problem, type_name


class PhaseError(BnfreezeError):
    """A phase or a schedule that cannot run as written."""


class BnMode(enum.Enum):
    """What every BatchNormalization layer does in a phase's ``fit()``."""

    #: ``trainable = False`` on every BN layer: moving statistics, nothing updates, even
    #: inside the layers that train (the Keras transfer-learning guide's advice, done right
    #: on Keras 3).
    INFERENCE = "inference"
    #: ``trainable = True`` on every BN layer, selected or not (fastai's ``train_bn``): batch
    #: statistics, gamma/beta train, the moving statistics update.
    TRAIN = "train"
    #: BN layers are like any other: those the phase selects train, the others run in
    #: inference mode.
    FLAGS = "flags"
    #: The BN layers the phase selects run in frozen-statistics mode
    #: (``FrozenStatsBatchNormalization``, as ``freeze --bn-frozen-stats``): they normalize
    #: with their moving statistics in ``fit()``, never update them, and gamma/beta train.
    #: The other BN layers run in inference mode. Every other phase gives them back the class
    #: ``BatchNormalization``, so the mode never outlives its phase.
    FROZEN_STATS = "frozen-stats"


class OptimizerStateMode(enum.Enum):
    """What the optimizer's state does at a phase boundary."""

    #: Every slot of a variable that trained before and still trains keeps its value; a
    #: variable that starts training gets zero slots; the iteration count continues.
    CARRY = "carry"
    #: A fresh optimizer of the same class and settings: what a correct hand-written script
    #: does.
    RESET = "reset"


def _choice(cls: Any, value: Any, what: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise PhaseError(f"{what} {value!r} is not one of {allowed}.") from None


def _rate(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PhaseError(f"{what} must be a number, not {type(value).__name__}.")
    if not math.isfinite(value) or value <= 0:
        raise PhaseError(f"{what} must be a positive number, not {value!r}.")
    return float(value)


@dataclass(frozen=True)
class Phase:
    """One ``fit()`` of a fine-tuning schedule.

    ``trains`` globs, ``up_to`` and ``from_`` choose the layers that train, as ``--layers``,
    ``--up-to`` and ``--from`` do (their intersection; none of them: every layer). ``bn``
    is ``"inference"``, ``"train"``, ``"flags"`` or ``"frozen-stats"`` (:class:`BnMode`).
    ``learning_rate`` None keeps the learning rate the model was compiled with.
    ``learning_rates`` maps globs to rates for the layers they match (discriminative
    learning rates, e.g. ``{"block_1*": 1e-5, "*": 1e-4}``); the first glob that matches a
    layer's path or name gives its rate, and the
    layers no glob matches use ``learning_rate``.
    """

    epochs: int
    #: Globs; a list, a tuple or one string; stored as a tuple.
    trains: Sequence[str] = ()
    #: A :class:`BnMode` or its value; stored as a BnMode.
    bn: BnMode | str = BnMode.INFERENCE
    learning_rate: float | None = None
    #: A mapping or (glob, rate) pairs; stored as a tuple of pairs, in order.
    learning_rates: Mapping[str, float] | Sequence[tuple[str, float]] = ()
    up_to: str | None = None
    from_: str | None = None
    name: str | None = None
    #: A plan's full selector; set by the plan reader instead of trains / up_to / from_.
    selector: Selector | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        label = self.name or "phase"
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise PhaseError(f"{label}: epochs must be a whole number >= 1, not {self.epochs!r}.")
        trains = (self.trains,) if isinstance(self.trains, str) else tuple(self.trains)
        for pattern in trains:
            if not isinstance(pattern, str) or not pattern:
                raise PhaseError(f"{label}: trains takes non-empty globs, not {pattern!r}.")
        object.__setattr__(self, "trains", trains)
        object.__setattr__(self, "bn", _choice(BnMode, self.bn, f"{label}: bn"))
        if self.learning_rate is not None:
            object.__setattr__(
                self, "learning_rate", _rate(self.learning_rate, f"{label}: learning_rate")
            )
        rates = self.learning_rates
        items = list(rates.items()) if isinstance(rates, Mapping) else list(rates)
        checked = []
        for item in items:
            if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
                raise PhaseError(f"{label}: learning_rates maps globs to numbers, not {item!r}.")
            checked.append((item[0], _rate(item[1], f"{label}: learning_rates[{item[0]!r}]")))
        object.__setattr__(self, "learning_rates", tuple(checked))
        if self.selector is not None and (trains or self.up_to or self.from_):
            raise PhaseError(f"{label}: give either selector or trains/up_to/from_, not both.")

    def chosen(self, layers: Sequence[LayerRecord]) -> tuple[LayerRecord, ...]:
        """The leaves this phase selects, in model order (an error when nothing matches)."""
        selector = self.selector or Selector(
            layers=tuple(self.trains), up_to=self.up_to, from_=self.from_
        )
        try:
            return selector.leaves(layers)
        except BnfreezeError as exc:
            raise PhaseError(f"{self.name or 'phase'}: {exc}") from None


@dataclass(frozen=True)
class PathScope:
    """An expectation scope of exact layer paths (the :class:`Scope` protocol)."""

    chosen: frozenset[str]
    label: str

    def paths(self, layers: Sequence[LayerRecord]) -> set[str]:
        return set(self.chosen)

    def describe(self) -> str:
        return self.label


@dataclass(frozen=True)
class Declaration:
    """What a phase declares about each leaf: it trains (weights and, for a BN layer, batch
    statistics) or it does not. The guard checks it in the phase's first batch."""

    phase: str
    trains: frozenset[str]  # leaves whose weights train
    frozen: frozenset[str]  # leaves whose weights stay
    bn_train: frozenset[str]  # BN leaves that normalize with batch statistics
    bn_inference: frozenset[str]  # BN leaves that normalize with moving statistics
    #: BN leaves in frozen-statistics mode: moving statistics, left unchanged, gamma/beta train.
    bn_frozen_stats: frozenset[str] = frozenset()

    def expectations(self) -> tuple[Expectation, ...]:
        out = []
        for kind, paths, what in (
            (ExpectKind.TRAINS, self.trains, "declared to train"),
            (ExpectKind.FROZEN, self.frozen, "declared frozen"),
            (ExpectKind.BN_TRAIN, self.bn_train, "BN declared in training mode"),
            (ExpectKind.BN_INFERENCE, self.bn_inference, "BN declared in inference mode"),
            (
                ExpectKind.BN_FROZEN_STATS,
                self.bn_frozen_stats,
                "BN declared in frozen-statistics mode",
            ),
        ):
            if paths:
                scope = PathScope(frozenset(paths), f"{self.phase}: {what}")
                out.append(Expectation(kind, scope=scope, source=self.phase))
        return tuple(out)


def declare(phase: Phase, label: str, layers: Sequence[LayerRecord]) -> Declaration:
    """What ``phase`` makes each leaf of ``layers`` do."""
    chosen = {r.path for r in phase.chosen(layers)}
    leaves = [r for r in layers if is_leaf(r)]
    bn = {r.path for r in leaves if r.is_batchnorm}
    if phase.bn is BnMode.INFERENCE:
        trains = chosen - bn
    elif phase.bn is BnMode.TRAIN:
        trains = chosen | bn
    else:
        trains = set(chosen)
    every = {r.path for r in leaves}
    frozen_stats = bn & chosen if phase.bn is BnMode.FROZEN_STATS else set()
    return Declaration(
        phase=label,
        trains=frozenset(trains),
        frozen=frozenset(every - trains),
        bn_train=frozenset((bn & trains) - frozen_stats),
        bn_inference=frozenset(bn - trains),
        bn_frozen_stats=frozenset(frozen_stats),
    )


def rate_groups(phase: Phase, layers: Sequence[LayerRecord]) -> dict[str, float]:
    """Each layer path's learning rate from ``phase.learning_rates`` (first glob wins); a
    glob that matches no layer is an error."""
    out: dict[str, float] = {}
    for pattern, rate in cast(tuple[tuple[str, float], ...], phase.learning_rates):
        hit = match_glob(layers, pattern)
        if not hit:
            raise PhaseError(
                f"{phase.name or 'phase'}: learning_rates glob {pattern!r} matches no layer "
                "path or name.",
                hint="Run bnfreeze inspect --all to list layer paths.",
            )
        for path in hit:
            out.setdefault(path, rate)
    return out


def phase_label(phase: Phase, index: int) -> str:
    """``phase 2`` or ``phase 2 (unfreeze the top)``."""
    return f"phase {index + 1}" + (f" ({phase.name})" if phase.name else "")


def check_phases(phases: Sequence[Phase]) -> tuple[Phase, ...]:
    out = tuple(phases)
    if not out:
        raise PhaseError("a schedule needs at least one phase.")
    for p in out:
        if not isinstance(p, Phase):
            raise PhaseError(f"phases holds bnfreeze.Phase values, not {type(p).__name__}.")
    return out


# ------------------------------------------------------------ [[phase]] tables in plans


def read_phase(parser: Any, table: dict[str, Any], index: int) -> Phase:
    """A ``[[phase]]`` table: its selector names what trains (none: every layer)."""
    parser.unknown_keys(table, PHASE_KEYS, "phase", index)
    selector = parser.selector(table, "phase", index)
    name = parser.opt_str(table, "name", "phase", index)
    if "epochs" not in table:
        raise parser.error(
            "a phase needs epochs = N (how many epochs its fit() runs).",
            table="phase",
            index=index,
        )
    epochs = parser.count(table["epochs"], "phase", index, "epochs")
    if epochs < 1:
        raise parser.error(
            "must be a whole number >= 1, not 0.", table="phase", index=index, key="epochs"
        )
    bn = parser.enum(BnMode, table.get("bn", "inference"), "phase", index, "bn")
    rate = table.get("learning_rate")
    if rate is not None:
        rate = _plan_rate(parser, rate, "phase", index, "learning_rate")
    rates = table.get("learning_rates", {})
    if not isinstance(rates, dict):
        raise parser.error(
            'must be a table of globs and rates, e.g. { "block_1*" = 1e-5, "*" = 1e-4 }, '
            f"not {type_name(rates)}.",
            table="phase",
            index=index,
            key="learning_rates",
        )
    checked = []
    for pattern, value in rates.items():
        pattern = parser.substitute(pattern, "phase", index, "learning_rates")
        problem = glob_problem(pattern)
        if problem:
            raise parser.error(problem, table="phase", index=index, key="learning_rates")
        checked.append((pattern, _plan_rate(parser, value, "phase", index, "learning_rates")))
    return Phase(
        epochs=epochs,
        bn=bn,
        learning_rate=rate,
        learning_rates=tuple(checked),
        name=name,
        selector=None if selector.is_everything else selector,
    )


def _plan_rate(parser: Any, value: Any, kind: str, index: int, key: str) -> float:
    """A learning rate in a plan: a positive, finite number."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        or value == float("inf")
    ):
        raise parser.error(
            f"must be a positive number, not {type_name(value)}.", table=kind, index=index, key=key
        )
    return float(value)
