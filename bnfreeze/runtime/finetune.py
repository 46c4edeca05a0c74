"""Running a fine-tuning schedule: one ``fit()`` per :class:`~bnfreeze.ops.phases.Phase`, a
new ``compile()`` and a new optimizer between phases, the optimizer state carried or reset,
and :class:`~bnfreeze.runtime.guard.BatchNormGuard` in every phase.

``bnfreeze.finetune`` (:mod:`bnfreeze.api`) sets each phase's flags through the in-memory
edit path of ``bnfreeze.freeze`` / ``bnfreeze.unfreeze`` and hands them to :func:`run` as
``set_flags``; this module does what needs Keras.

Between two phases (docs/semantics.md, rule 4): a flag change after ``fit()`` is ignored by
TensorFlow until ``compile()`` runs again, and on JAX it makes the next ``fit()`` raise;
``compile(optimizer=model.optimizer)`` raises ``Unknown variable``. So every phase compiles
again with the model's own compile arguments and a **new** optimizer of the class and
settings the model was compiled with (``from_config(get_config())``), at the phase's learning
rate.

Optimizer state, measured on Keras 3.15.1 (TensorFlow and JAX): a built optimizer keeps one
list per kind of slot, in the order of the variables it was built for
(``optimizer._trainable_variables``): Adam and AdamW ``_momentums``, ``_velocities`` (and
``_velocity_hats`` with ``amsgrad``), SGD with momentum ``momentums``, RMSprop
``_velocities``, ``_momentums``, ``_average_gradients``, ``use_ema=True``
``_model_variables_moving_average``. A ``MultiOptimizer`` holds one such optimizer per group
(``.optimizers``). With :attr:`~bnfreeze.ops.phases.OptimizerStateMode.CARRY` the new
optimizer is built for the new trainable variables and every slot of a variable that trained
before and still trains gets its old value, found by the variable's path and the slot's kind;
the other slots stay zero as Keras creates them; ``iterations`` continues (on every inner
optimizer of a ``MultiOptimizer`` too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bnfreeze.errors import BnfreezeError
from bnfreeze.model.records import LayerRecord
from bnfreeze.ops.phases import (
    Declaration,
    OptimizerStateMode,
    Phase,
    PhaseError,
    phase_label,
    rate_groups,
)

#: What ``fit()`` arguments finetune sets itself.
OWN_FIT_ARGUMENTS = ("epochs", "initial_epoch")


class FinetuneStopped(BnfreezeError):
    """``finetune(strict=True)`` stopped: the guard found a phase doing something other than
    what it declares. ``result`` holds the phases run so far, the stopped one last."""

    def __init__(self, message: str, result: FinetuneResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class SlotCarry:
    """What happened to the optimizer state at the start of a phase (carry mode)."""

    carried: int  # slot variables that kept their value from the previous phase
    zeroed: int  # slot variables of variables that start training: zero
    dropped: int  # slot variables of variables that stopped training: left behind
    iterations: int  # the iteration count the phase starts from


@dataclass(frozen=True)
class PhaseResult:
    """One phase as it ran."""

    index: int
    label: str
    phase: Phase
    first_epoch: int  # the phase's initial_epoch (0-based)
    epochs_run: int
    history: tuple[tuple[str, tuple[float, ...]], ...]
    declaration: Declaration
    optimizer: str  # class name of the optimizer the phase compiled with
    carry: SlotCarry | None
    guard: Any = dataclasses.field(repr=False)  # the phase's GuardReport (None if none ran)

    @property
    def problems(self) -> tuple[str, ...]:
        """The guard's findings in this phase, one line each (empty: all as declared)."""
        return tuple(self.guard.problems) if self.guard is not None else ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class FinetuneResult:
    """A whole schedule: the phases in order and their merged ``fit()`` history."""

    model: str
    optimizer_state: OptimizerStateMode
    phases: tuple[PhaseResult, ...]

    @property
    def history(self) -> dict[str, list[float]]:
        """Every metric over every epoch of every phase, as ``History.history`` spells it."""
        merged: dict[str, list[float]] = {}
        for p in self.phases:
            for key, values in p.history:
                merged.setdefault(key, []).extend(values)
        return merged

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The first epoch (0-based) of each phase."""
        return tuple(p.first_epoch for p in self.phases)

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(f"{p.label}: {line}" for p in self.phases for line in p.problems)

    @property
    def ok(self) -> bool:
        return not self.problems


#: set_flags(model, phase, label) -> the phase's declaration and the model's layer records.
SetFlags = Callable[[Any, Phase, str], tuple[Declaration, Sequence[LayerRecord]]]


def run(
    model: Any,
    phases: Sequence[Phase],
    x: Any,
    y: Any,
    *,
    optimizer_state: OptimizerStateMode,
    strict: bool,
    set_flags: SetFlags,
    fit_kwargs: Mapping[str, Any],
) -> FinetuneResult:
    import keras

    from bnfreeze.runtime.guard import BatchNormGuard, GuardError

    arguments, base = _compile_arguments(keras, model)
    for key in OWN_FIT_ARGUMENTS:
        if key in fit_kwargs:
            raise PhaseError(
                f"finetune sets fit()'s {key} itself (from each phase's epochs); leave it out."
            )
    fit_kwargs = dict(fit_kwargs)
    callbacks = list(fit_kwargs.pop("callbacks", None) or ())
    done: list[PhaseResult] = []
    epoch = 0
    for index, phase in enumerate(phases):
        label = phase_label(phase, index)
        declaration, optimizer, carry = _start_phase(
            keras, model, phase, index, label, arguments, base, optimizer_state, set_flags
        )
        guard = BatchNormGuard(expect=declaration.expectations(), strict=strict)
        try:
            history = model.fit(
                x,
                y,
                epochs=epoch + phase.epochs,
                initial_epoch=epoch,
                callbacks=[*callbacks, guard],
                **fit_kwargs,
            )
        except GuardError as exc:
            done.append(
                _result(index, label, phase, epoch, {}, declaration, optimizer, carry, guard)
            )
            result = FinetuneResult(model.name, optimizer_state, tuple(done))
            raise FinetuneStopped(f"{label}: {exc}", result) from None
        logged = {k: tuple(float(v) for v in vs) for k, vs in history.history.items()}
        done.append(
            _result(index, label, phase, epoch, logged, declaration, optimizer, carry, guard)
        )
        report = guard.report
        if report is not None and report.stopped:
            result = FinetuneResult(model.name, optimizer_state, tuple(done))
            raise FinetuneStopped(
                f"finetune(strict=True) stopped in {label}: " + " | ".join(report.problems),
                result,
            )
        epoch += phase.epochs
    return FinetuneResult(model.name, optimizer_state, tuple(done))


def _start_phase(
    keras: Any,
    model: Any,
    phase: Phase,
    index: int,
    label: str,
    arguments: dict[str, Any],
    base: Any,
    optimizer_state: OptimizerStateMode,
    set_flags: SetFlags,
) -> tuple[Declaration, Any, Any]:
    """Set the phase's flags and compile the model with a new optimizer at the phase's
    learning rate, carrying the previous phase's slots with ``carry``: the phase's
    declaration, its optimizer and what was carried (None: nothing)."""
    old = model.optimizer if index else None
    old_slots = _slot_values(keras, model.optimizer) if old is not None else None
    old_iterations = int(_value(old.iterations)) if old is not None else 0
    declaration, records = set_flags(model, phase, label)
    optimizer = _new_optimizer(keras, base, phase, model, records)
    model.compile(**{**arguments, "optimizer": optimizer})
    carry = None
    if optimizer_state is OptimizerStateMode.CARRY and old_slots is not None:
        carry = _carry(keras, model, optimizer, old_slots, old_iterations)
    return declaration, optimizer, carry


def _result(
    index: int,
    label: str,
    phase: Phase,
    epoch: int,
    logged: Mapping[str, tuple[float, ...]],
    declaration: Declaration,
    optimizer: Any,
    carry: SlotCarry | None,
    guard: Any,
) -> PhaseResult:
    runs = max((len(v) for v in logged.values()), default=0)
    return PhaseResult(
        index=index,
        label=label,
        phase=phase,
        first_epoch=epoch,
        epochs_run=runs,
        history=tuple(logged.items()),
        declaration=declaration,
        optimizer=type(optimizer).__name__,
        carry=carry,
        guard=guard.report,
    )


def _compile_arguments(keras: Any, model: Any) -> tuple[dict[str, Any], Any]:
    """The model's own ``compile()`` arguments and the optimizer it was compiled with."""
    from bnfreeze.runtime.environment import is_compiled
    from bnfreeze.runtime.live import runtime_of

    if runtime_of(model).value != "keras3":
        raise PhaseError("finetune runs Keras 3 models; this is a tf_keras model.")
    optimizer = getattr(model, "optimizer", None)
    arguments = dict(getattr(getattr(model, "_compile_config", None), "config", {}) or {})
    if not is_compiled(model) or optimizer is None or not arguments:
        raise PhaseError(
            f"model {model.name!r} is not compiled. Call compile() once with the optimizer, "
            "loss and metrics to fine-tune with; finetune compiles again for every phase with "
            "those, and a new optimizer of that class and settings."
        )
    multi = getattr(keras.optimizers, "MultiOptimizer", None)
    if multi is not None and isinstance(optimizer, multi):
        raise PhaseError(
            f"model {model.name!r} is compiled with a MultiOptimizer; compile it with one "
            "optimizer and give the phases learning_rates for per-layer rates."
        )
    return arguments, optimizer


def _new_optimizer(
    keras: Any, base: Any, phase: Phase, model: Any, records: Sequence[LayerRecord]
) -> Any:
    """A new optimizer of ``base``'s class and settings, at the phase's rate(s)."""
    config = base.get_config()

    def make(rate: float | None, suffix: str = "") -> Any:
        settings = dict(config)
        if rate is not None:
            settings["learning_rate"] = rate
        if suffix:
            settings["name"] = f"{config.get('name', 'optimizer')}_{suffix}"
        return type(base).from_config(settings)

    if not phase.learning_rates:
        return make(phase.learning_rate)
    multi = getattr(keras.optimizers, "MultiOptimizer", None)
    if multi is None:
        raise PhaseError(
            f"{phase.name or 'phase'}: learning_rates needs keras.optimizers.MultiOptimizer, "
            f"which Keras {keras.__version__} does not have; Keras 3.15 has it. Upgrade Keras "
            "or give the phase one learning_rate."
        )
    from bnfreeze.runtime.measure import layer_paths, own_variables

    rates = rate_groups(phase, records)
    per_rate: dict[float, Any] = {}
    default = make(phase.learning_rate, "default")
    chosen: dict[int, Any] = {}
    for path, variables in own_variables(layer_paths(keras, model)).items():
        rate = rates.get(path)
        if rate is None:
            continue
        if rate not in per_rate:
            per_rate[rate] = make(rate, f"group{len(per_rate)}")
        for v in variables:
            chosen[id(v)] = per_rate[rate]

    def select(variable: Any) -> Any:
        return chosen.get(id(variable), default)

    return multi(select)


def _value(variable: Any) -> Any:
    import numpy as np

    return np.array(variable.numpy(), copy=True)


def _inner(keras: Any, optimizer: Any) -> list[Any]:
    multi = getattr(keras.optimizers, "MultiOptimizer", None)
    if multi is not None and isinstance(optimizer, multi):
        return list(optimizer.optimizers)
    return [optimizer]


def _slots(keras: Any, optimizer: Any) -> dict[tuple[str, str], Any]:
    """Every slot variable of a built optimizer by (variable path, slot kind): the lists of
    one variable per trainable variable, in ``_trainable_variables`` order (measured)."""
    out: dict[tuple[str, str], Any] = {}
    for opt in _inner(keras, optimizer):
        built_for = list(getattr(opt, "_trainable_variables", None) or ())
        if not built_for or not getattr(opt, "built", False):
            continue
        paths = _paths(built_for)
        for kind, value in vars(opt).items():
            if kind == "_trainable_variables" or not isinstance(value, list):
                continue
            if len(value) != len(built_for) or not all(
                isinstance(s, keras.Variable) for s in value
            ):
                continue
            for path, slot in zip(paths, value, strict=True):
                out[(path, kind)] = slot
    return out


def _paths(variables: Sequence[Any]) -> list[str]:
    """Variable paths, made unique by a ``#n`` suffix should two variables share one."""
    seen: dict[str, int] = {}
    out = []
    for v in variables:
        path = str(v.path)
        n = seen.get(path, 0)
        seen[path] = n + 1
        out.append(path if n == 0 else f"{path}#{n}")
    return out


def _slot_values(keras: Any, optimizer: Any) -> dict[tuple[str, str], Any]:
    return {key: _value(slot) for key, slot in _slots(keras, optimizer).items()}


def _carry(
    keras: Any,
    model: Any,
    optimizer: Any,
    old: Mapping[tuple[str, str], Any],
    iterations: int,
) -> SlotCarry:
    """Build ``optimizer`` for the model's trainable variables and give it the old state."""
    optimizer.build(model.trainable_variables)
    new = _slots(keras, optimizer)
    carried = 0
    for key, slot in new.items():
        if key in old:
            if tuple(old[key].shape) != tuple(slot.shape):
                raise PhaseError(
                    f"optimizer slot {key[1]} of {key[0]} changed shape between phases "
                    f"({tuple(old[key].shape)} -> {tuple(slot.shape)}); use "
                    "optimizer_state='reset'."
                )
            slot.assign(old[key])
            carried += 1
    dropped_vars = {path for path, _ in old} - {path for path, _ in new}
    for opt in {id(o): o for o in [optimizer, *_inner(keras, optimizer)]}.values():
        opt.iterations.assign(iterations)
    return SlotCarry(
        carried=carried,
        zeroed=len(new) - carried,
        dropped=sum(1 for path, _ in old if path in dropped_vars),
        iterations=iterations,
    )
