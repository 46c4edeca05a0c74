"""What :class:`~bnfreeze.runtime.guard.BatchNormGuard` reports, and the parts of it that
need no model: the records (:class:`GuardReport`, :class:`StaleFlags`), its errors and
warnings, the expectations it takes, and :func:`stale_flags`, which tells what ``fit()`` does
with a trainable set that changed since its optimizer was built. The callback, which measures
a live model, is in :mod:`bnfreeze.runtime.guard`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnfreeze.errors import BnfreezeError
from bnfreeze.model.expectations import (
    Expectation,
    Failure,
    parse_expectation,
)
from bnfreeze.model.measured import Disagreement, LayerMeasurement
from bnfreeze.model.records import Finding, Normalization, Report, WarningCode
from bnfreeze.runtime import replicas as data_parallel

#: The inspect warnings that are Keras 3 traps in a training script.
TRAPS = (
    WarningCode.CALL_SITE_TRAINING_IGNORED,
    WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER,
    WarningCode.MODEL_NOT_TRAINABLE,
)


class GuardError(BnfreezeError):
    """``BatchNormGuard(strict=True)`` stopped ``fit()`` before its first step."""


class GuardWarning(UserWarning):
    """What ``BatchNormGuard`` found: an expectation that fails, a measurement that differs
    from the prediction, a Keras 3 trap."""


class StaleEffect(enum.Enum):
    """What ``fit()`` does with a trainable set that changed since its optimizer was built."""

    #: TF, step traced earlier: ignored for batches of the traced shape; a new shape is traced
    #: anew and raises ``Unknown variable``.
    IGNORED_THEN_UNKNOWN_VARIABLE = "ignored-then-unknown-variable"
    #: TF, step traced earlier, variables only stopped training: ignored for batches of the
    #: traced shape; a batch of a new shape trains with the new flags.
    IGNORED_BUT_NEW_SHAPES = "ignored-but-new-shapes"
    #: TF, no step traced: the first step raises ``Unknown variable``.
    UNKNOWN_VARIABLE = "unknown-variable"
    #: JAX: the first step raises; the model's variables are left unreadable.
    RAISES = "raises"


@dataclass(frozen=True)
class StaleFlags:
    """The trainable set that ``fit()`` was built for and the one the flags say now."""

    backend: str
    effect: StaleEffect
    #: Layer paths whose variables became trainable / stopped training since the build.
    gained: tuple[str, ...]
    lost: tuple[str, ...]
    built_for: int  # trainable variables the optimizer was built for
    now: int  # trainable variables now

    @property
    def message(self) -> str:
        def names(paths: tuple[str, ...]) -> str:
            shown = ", ".join(paths[:5])
            return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")

        what = []
        if self.gained:
            what.append(f"became trainable: {names(self.gained)}")
        if self.lost:
            what.append(f"stopped training: {names(self.lost)}")
        head = (
            "trainable flags changed after this model's optimizer was built (after fit(), "
            f"without compile()): it was built for {self.built_for} trainable variables, the "
            f"flags now give {self.now} ({'; '.join(what)}). "
        )
        effect = {
            StaleEffect.IGNORED_THEN_UNKNOWN_VARIABLE: (
                "This fit() reuses the training step traced by the earlier fit(): batches of "
                "the traced shape train with the old flags and ignore the change; data of "
                "another batch shape (a last batch smaller than the others makes the whole "
                "dataset's shape differ) is traced anew and raises 'Unknown variable'."
            ),
            StaleEffect.IGNORED_BUT_NEW_SHAPES: (
                "This fit() reuses the training step traced by the earlier fit(): batches of "
                "the traced shape train with the old flags and ignore the change; only data of "
                "another batch shape is traced anew and sees it."
            ),
            StaleEffect.UNKNOWN_VARIABLE: (
                "This fit() raises 'Unknown variable' at its first step."
            ),
            StaleEffect.RAISES: (
                "On JAX this fit() raises at its first step (the optimizer's variables no "
                "longer match the trainable variables), and leaves the model's variables "
                "unreadable; BatchNormGuard(strict=True) stops before that step."
            ),
        }[self.effect]
        return (
            f"{head}{effect} Call compile() again with a new optimizer "
            "(bnfreeze.recompile(model)) before fit()."
        )


@dataclass(frozen=True)
class GuardReport:
    """What a :class:`BatchNormGuard` found in one ``fit()``.

    ``measured`` is empty until the first batch has run. ``predicted`` holds each expectation
    judged on the prediction, ``expectations`` the same judged on the measurement.
    """

    model: str
    backend: str
    strict: bool
    stale: StaleFlags | None
    traps: tuple[Finding, ...]
    prediction: Report | None = dataclasses.field(repr=False)
    predicted: tuple[tuple[Expectation, tuple[Failure, ...]], ...]
    measured: tuple[LayerMeasurement, ...] = ()
    checks: int = 0
    disagreements: tuple[Disagreement, ...] = ()
    expectations: tuple[tuple[Expectation, tuple[Failure, ...]], ...] = ()
    #: True when strict=True stopped fit() (before the first step or after the first batch).
    stopped: bool = False
    replicas: data_parallel.ReplicaReport | None = None  # runtime/replicas.py

    @property
    def measured_batch(self) -> bool:
        return bool(self.measured)

    @property
    def batch_branch(self) -> tuple[str, ...]:
        """BN layers measured taking the batch branch (training mode) in the first batch."""
        return tuple(m.path for m in self.measured if m.normalizes_with is Normalization.BATCH)

    @property
    def inference_branch(self) -> tuple[str, ...]:
        return tuple(m.path for m in self.measured if m.normalizes_with is Normalization.MOVING)

    @property
    def stats_moved(self) -> tuple[str, ...]:
        """BN layers whose moving statistics changed in the first batch."""
        return tuple(m.path for m in self.measured if m.stats_moved)

    @property
    def weights_trained(self) -> tuple[str, ...]:
        """Layers whose trainable weights the first batch trained (moved, or a zero update)."""
        return tuple(m.path for m in self.measured if m.trains_weights)

    @property
    def problems(self) -> tuple[str, ...]:
        """One line per problem found, for people."""
        lines: list[str] = []
        if self.stale is not None:
            lines.append(self.stale.message)
        lines += [f"{f.path or 'model'}: {f.message}" for f in self.traps]
        lines += failure_lines(self.predicted, "predicted")
        lines += [d.message for d in self.disagreements]
        lines += failure_lines(self.expectations, "measured")
        return tuple(lines) + (self.replicas.problems if self.replicas is not None else ())

    @property
    def ok(self) -> bool:
        return not self.problems


def failure_lines(judged: Sequence[tuple[Expectation, tuple[Failure, ...]]], how: str) -> list[str]:
    """One line per expectation that fails, its layers grouped by what they do instead."""
    lines = []
    for e, failures in judged:
        groups: dict[tuple[str, str], list[str]] = {}
        for f in failures:
            groups.setdefault((f.expected, f.actual), []).append(f.path or "the model")
        for (expected, actual), paths in groups.items():
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            count = f"{len(paths)} layer{'s' if len(paths) != 1 else ''}"
            lines.append(f"expect {e.name} fails: {count} {how} {actual}, not {expected} ({shown})")
    return lines


def expectations_of(expect: Any) -> tuple[Expectation, ...]:
    if expect is None:
        return ()
    items = [expect] if isinstance(expect, str | Expectation) else list(expect)
    out = []
    for item in items:
        if isinstance(item, Expectation):
            out.append(item)
        elif isinstance(item, str):
            out.append(dataclasses.replace(parse_expectation(item), source="expect="))
        else:
            raise TypeError(
                f"expect= takes expectation strings such as 'bn-inference', not "
                f"{type(item).__name__}"
            )
    return tuple(out)


# --------------------------------------------------------------------------- the pure parts


def stale_flags(
    *,
    backend: str,
    built_for: Sequence[Any],
    now: Sequence[Any],
    owner: dict[int, str],
    traced: bool,
) -> StaleFlags | None:
    """Compare the variables an optimizer was built for with today's trainable variables.

    ``owner`` maps ``id(variable)`` to its layer path; ``traced`` says whether ``fit()``
    reuses a training step traced earlier (TensorFlow). None when nothing changed."""
    old = {id(v) for v in built_for}
    new = {id(v) for v in now}
    if old == new:
        return None

    def layers(ids: set[int], order: Sequence[Any]) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for v in order:
            if id(v) in ids:
                seen.setdefault(owner.get(id(v), str(getattr(v, "path", v))), None)
        return tuple(seen)

    gained = layers(new - old, now)
    lost = layers(old - new, built_for)
    if backend == "jax":
        effect = StaleEffect.RAISES
    elif traced:
        effect = (
            StaleEffect.IGNORED_THEN_UNKNOWN_VARIABLE
            if gained
            else StaleEffect.IGNORED_BUT_NEW_SHAPES
        )
    elif gained:
        effect = StaleEffect.UNKNOWN_VARIABLE
    else:
        return None  # variables only stopped training, and the first step traces anew
    return StaleFlags(backend, effect, gained, lost, len(old), len(new))
