"""The expectation vocabulary: what must hold about a model in ``fit()``.

One vocabulary serves two commands:

* ``bnfreeze check`` judges expectations against the behaviour **predicted** from the file
  (:func:`observed_from_states` over an ``inspect`` report);
* ``bnfreeze verify --expect`` judges the same expectations against the behaviour
  **measured** in a real training step (build one :class:`Observed` per layer from the
  measurement: ``normalizes_with`` is ``BATCH`` exactly when the BN layer's moving statistics
  moved, ``trains_weights`` is whether any of the layer's trainable weights moved).

On the command line an expectation is spelled ``NAME`` or ``NAME=ARG``:

- ``bn-inference[=GLOB]``: every BN layer (or every BN layer GLOB matches) normalizes with
  its moving statistics in ``fit()`` and leaves them unchanged;
- ``bn-train[=GLOB]``: every such BN layer normalizes with batch statistics in ``fit()`` and
  updates its moving statistics;
- ``bn-frozen-stats[=GLOB]``: every such BN layer normalizes with its moving statistics in
  ``fit()``, leaves them unchanged, and trains its gamma/beta (what
  ``FrozenStatsBatchNormalization`` does);
- ``trains[=GLOB]``: every layer with weights (that GLOB matches) trains them in ``fit()``;
- ``frozen[=GLOB]``: every layer with weights (that GLOB matches) keeps them in ``fit()``;
- ``min-training=N`` / ``max-training=N``: at least / at most N layers train weights in
  ``fit()``.

GLOB matches layer paths or names as ``--layers`` does (a container selects every layer below
it). A plan's ``[[expect]]`` tables say the same with the full plan selector (see
``docs/plans.md``): their scope is any object with the :class:`Scope` protocol.

Keras's own rule, which "inference" and "training" refer to (the ``BatchNormalization``
docstring, "About setting ``layer.trainable = False`` on a ``BatchNormalization`` layer"):
"setting ``trainable = False`` on the layer means that the layer will be subsequently run in
inference mode (meaning that it will use the moving mean and the moving variance to normalize
the current batch, rather than using the mean and variance of the current batch)."
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bnfreeze.errors import ExpectationError
from bnfreeze.model.records import LayerRecord, LayerState, Normalization
from bnfreeze.model.selection import is_leaf, match_glob


class ExpectKind(enum.Enum):
    """The closed set of expectations; the value is the command-line spelling."""

    BN_INFERENCE = "bn-inference"
    BN_TRAIN = "bn-train"
    BN_FROZEN_STATS = "bn-frozen-stats"
    TRAINS = "trains"
    FROZEN = "frozen"
    MIN_TRAINING = "min-training"
    MAX_TRAINING = "max-training"

    @property
    def takes_count(self) -> bool:
        return self in (ExpectKind.MIN_TRAINING, ExpectKind.MAX_TRAINING)

    @property
    def about_batchnorm(self) -> bool:
        return self in (ExpectKind.BN_INFERENCE, ExpectKind.BN_TRAIN, ExpectKind.BN_FROZEN_STATS)


#: One line per kind, for ``--help`` texts and error messages.
KIND_HELP: dict[ExpectKind, str] = {
    ExpectKind.BN_INFERENCE: "every BN layer normalizes with its moving statistics in fit()",
    ExpectKind.BN_TRAIN: "every BN layer normalizes with batch statistics in fit()",
    ExpectKind.BN_FROZEN_STATS: (
        "every BN layer normalizes with its moving statistics in fit() and trains gamma/beta"
    ),
    ExpectKind.TRAINS: "every layer with weights trains them in fit()",
    ExpectKind.FROZEN: "every layer with weights keeps them unchanged in fit()",
    ExpectKind.MIN_TRAINING: "at least N layers train weights in fit()",
    ExpectKind.MAX_TRAINING: "at most N layers train weights in fit()",
}

VOCABULARY_HELP = (
    "bn-inference[=GLOB], bn-train[=GLOB], bn-frozen-stats[=GLOB], trains[=GLOB], frozen[=GLOB], "
    "min-training=N, max-training=N"
)


class Scope(Protocol):
    """Which layers an expectation is about. Raise a ``BnfreezeError`` when it matches
    nothing: an expectation about no layer is a mistake, not a pass."""

    def paths(self, layers: Sequence[LayerRecord]) -> set[str]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class GlobScope:
    """A glob on layer paths or names, expanded below containers (as ``--layers``)."""

    pattern: str

    def paths(self, layers: Sequence[LayerRecord]) -> set[str]:
        hit = match_glob(layers, self.pattern)
        if not hit:
            raise ExpectationError(
                f"--expect: {self.pattern!r} matches no layer path or name.",
                hint="Run bnfreeze inspect --all to list layer paths.",
            )
        return hit

    def describe(self) -> str:
        return self.pattern


@dataclass(frozen=True)
class Expectation:
    """One thing that must hold. ``scope`` None means every layer of the model."""

    kind: ExpectKind
    scope: Scope | None = None
    count: int | None = None
    source: str | None = field(default=None, compare=False)  # "--expect", "plan.toml:12"
    label: str | None = field(default=None, compare=False)  # a plan's own name for it

    @property
    def name(self) -> str:
        """The expectation as spelled on the command line, e.g. ``trains=head``; a plan's
        scope follows in brackets: ``frozen [min_depth=1]``."""
        if self.kind.takes_count:
            return f"{self.kind.value}={self.count}"
        if isinstance(self.scope, GlobScope):
            return f"{self.kind.value}={self.scope.pattern}"
        if self.scope is not None:
            return f"{self.kind.value} [{self.scope.describe()}]"
        return self.kind.value


@dataclass(frozen=True)
class Observed:
    """What one layer does in ``fit()``, predicted or measured.

    ``trains_weights`` None: the layer has no weights (or it cannot be known).
    ``normalizes_with`` is for BN layers only; None elsewhere or when unknown.
    """

    path: str
    is_batchnorm: bool
    trains_weights: bool | None
    normalizes_with: Normalization | None


@dataclass(frozen=True)
class Failure:
    """An expectation that does not hold, for one layer (``path``) or the whole model."""

    expectation: str
    path: str | None
    expected: str
    actual: str


def observed_from_states(states: Iterable[LayerState]) -> dict[str, Observed]:
    """The behaviour ``inspect`` predicts from the file, as observations."""
    return {
        s.layer.path: Observed(
            path=s.layer.path,
            is_batchnorm=s.layer.is_batchnorm,
            trains_weights=s.in_fit.trains_weights,
            normalizes_with=s.in_fit.normalizes_with,
        )
        for s in states
        if is_leaf(s.layer)
    }


def parse_expectation(spec: str) -> Expectation:
    """Parse ``NAME`` or ``NAME=ARG`` from the command line."""
    name, sep, arg = spec.partition("=")
    name = name.strip()
    try:
        kind = ExpectKind(name)
    except ValueError:
        raise ExpectationError(
            f"--expect {spec!r}: unknown expectation {name!r}.",
            hint=f"Use one of: {VOCABULARY_HELP}.",
        ) from None
    if kind.takes_count:
        if not sep or not arg.strip().isdigit():
            raise ExpectationError(
                f"--expect {spec!r}: {name} needs a whole number, e.g. {name}=1."
            )
        return Expectation(kind, count=int(arg.strip()), source="--expect")
    if sep and not arg:
        raise ExpectationError(
            f"--expect {spec!r}: the glob after '=' is empty.",
            hint=f"Write {name} alone for every layer, or {name}=GLOB.",
        )
    scope = GlobScope(arg) if sep else None
    return Expectation(kind, scope=scope, source="--expect")


def _mode(value: Normalization | None) -> str:
    """A BN layer's mode in fit(): inference normalizes with the moving statistics,
    training with the batch's (and updates the moving statistics)."""
    if value is Normalization.MOVING:
        return "inference"
    if value is Normalization.BATCH:
        return "training"
    return "unknown"


def _frozen_stats_mode(observed: Observed) -> str:
    gamma_beta = "train" if observed.trains_weights else "frozen"
    return f"{_mode(observed.normalizes_with)}, gamma/beta {gamma_beta}"


def evaluate(
    expectation: Expectation,
    layers: Sequence[LayerRecord],
    observed: Mapping[str, Observed],
) -> tuple[Failure, ...]:
    """The failures of one expectation: empty when it holds.

    ``layers`` are the walk's records (for resolving the scope); ``observed`` maps leaf paths
    to their behaviour. Raises :class:`ExpectationError` when an explicit scope contains no
    layer the expectation could be judged on (``trains=pool`` where pool has no weights).
    """
    if expectation.scope is None:
        in_scope = [p for p in (r.path for r in layers) if p in observed]
    else:
        wanted = expectation.scope.paths(layers)
        in_scope = [r.path for r in layers if r.path in wanted and r.path in observed]
    if expectation.kind.about_batchnorm:
        return _evaluate_batchnorm(expectation, [observed[p] for p in in_scope])
    weighted = [observed[p] for p in in_scope if observed[p].trains_weights is not None]
    if expectation.kind in (ExpectKind.TRAINS, ExpectKind.FROZEN):
        return _evaluate_trains(expectation, weighted)
    return _evaluate_count(expectation, weighted)


def _evaluate_batchnorm(expectation: Expectation, in_scope: list[Observed]) -> tuple[Failure, ...]:
    """``bn-inference``, ``bn-train``, ``bn-frozen-stats``: each BN layer in scope."""
    kind, name = expectation.kind, expectation.name
    bns = [o for o in in_scope if o.is_batchnorm]
    if expectation.scope is not None and not bns:
        raise ExpectationError(
            f"{_where(expectation)}{name}: the layers it names include no BatchNormalization layer."
        )
    if kind is ExpectKind.BN_FROZEN_STATS:
        return tuple(
            Failure(name, o.path, "inference, gamma/beta train", _frozen_stats_mode(o))
            for o in bns
            if o.normalizes_with is not Normalization.MOVING or o.trains_weights is not True
        )
    want = Normalization.MOVING if kind is ExpectKind.BN_INFERENCE else Normalization.BATCH
    return tuple(
        Failure(name, o.path, _mode(want), _mode(o.normalizes_with))
        for o in bns
        if o.normalizes_with is not want
    )


def _evaluate_trains(expectation: Expectation, weighted: list[Observed]) -> tuple[Failure, ...]:
    """``trains=...``, ``frozen=...``: each layer with weights in scope."""
    name = expectation.name
    if expectation.scope is not None and not weighted:
        raise ExpectationError(
            f"{_where(expectation)}{name}: the layers it names have no weights, so they "
            "neither train nor stay frozen."
        )
    want_trains = expectation.kind is ExpectKind.TRAINS
    return tuple(
        Failure(
            name,
            o.path,
            "trains" if want_trains else "frozen",
            "trains" if o.trains_weights else "frozen",
        )
        for o in weighted
        if o.trains_weights is not want_trains
    )


def _evaluate_count(expectation: Expectation, weighted: list[Observed]) -> tuple[Failure, ...]:
    """``min-training=N``, ``max-training=N``: how many layers with weights train."""
    kind, name = expectation.kind, expectation.name
    training = sum(1 for o in weighted if o.trains_weights)
    count = expectation.count if expectation.count is not None else 0
    if kind is ExpectKind.MIN_TRAINING and training < count:
        return (Failure(name, None, f"at least {count} layers train", f"{training} train"),)
    if kind is ExpectKind.MAX_TRAINING and training > count:
        return (Failure(name, None, f"at most {count} layers train", f"{training} train"),)
    return ()


def _where(expectation: Expectation) -> str:
    if expectation.source and expectation.source != "--expect":
        return f"{expectation.source}: "
    return "--expect "
