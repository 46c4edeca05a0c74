"""The in-memory route: set ``trainable`` flags on a live ``keras.Model`` (or
``tf_keras.Model``) the caller holds, in place, and save it when asked.

Changing ``trainable`` on a compiled model (docs/semantics.md, rule 4; measured on Keras 3.15 /
TF 2.21): before the first training step, the change takes effect in the next ``fit()``; once
``fit()`` or ``train_on_batch()`` has traced a training step, ``fit()`` keeps using it for
inputs of the same kind and shape, so the change has **no effect on fit() until compile() is
called again with a new optimizer**; once the optimizer is built, ``fit()`` raises "Unknown
variable" for every variable that became trainable. On tf_keras, ``compile()`` records the
flags and ``fit()`` trains with those. Keras itself does not warn: this route emits a
:class:`~bnfreeze.errors.RecompileWarning` worded for the case at hand
(:func:`recompile_message`).
"""

from __future__ import annotations

import enum
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bnfreeze.errors import BnfreezeError, RecompileWarning
from bnfreeze.formats.recorded_flags import RecordedFlags
from bnfreeze.model.records import Finding, ModelFormat, Runtime, WarningCode
from bnfreeze.ops.edit_warnings import edit_warnings
from bnfreeze.ops.optimizer_state import OptimizerState, optimizer_decision
from bnfreeze.ops.request import EditRequest, EditResult, Engine
from bnfreeze.runtime import environment, loading
from bnfreeze.runtime.keras_route import LiveEdit, edit_live
from bnfreeze.runtime.live import LiveModel, live_model, live_report, runtime_of
from bnfreeze.runtime.saving import Saved, recorded_flags_findings, save, save_format

#: The frame a warning points at: the caller of bnfreeze.freeze / unfreeze, above the
#: helper that warns, MemoryRoute.edit, bnfreeze.runtime.routes.edit, routes.edit_model and
#: the API function.
_STACKLEVEL = 6


class TrainingState(enum.Enum):
    """How far a live model got towards training; decides what a flag change does."""

    UNCOMPILED = "uncompiled"  # flags take effect at compile()
    COMPILED = "compiled"  # compiled, no training step traced, optimizer not built
    OPTIMIZER_BUILT = "optimizer-built"  # its optimizer knows only the old trainable variables
    TRACED = "traced"  # fit()/train_on_batch() traced a training step since compile()


def training_state(model: Any) -> TrainingState:
    """Where ``model`` stands. ``model.train_function`` is what ``fit()`` and
    ``train_on_batch()`` set and ``compile()`` resets (on tf_keras too); ``optimizer.built``
    is set by the first step, by ``load_model`` of a compiled model and by
    ``compile_from_config`` (Keras 3; a tf_keras optimizer has no such flag)."""
    from bnfreeze.runtime.environment import is_compiled

    if not is_compiled(model):
        return TrainingState.UNCOMPILED
    if getattr(model, "train_function", None) is not None:
        return TrainingState.TRACED
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        return TrainingState.OPTIMIZER_BUILT
    return TrainingState.COMPILED


def recompile_message(
    name: str,
    changed: int,
    state: TrainingState,
    *,
    gained_trainable: bool,
    runtime: Runtime = Runtime.KERAS3,
) -> str | None:
    """The :class:`RecompileWarning` text for a change of ``changed`` flags, or None."""
    if state is TrainingState.UNCOMPILED or not changed:
        return None
    head = f"bnfreeze changed {changed} trainable flag(s) of model {name!r}, which is compiled"
    fix = "Call bnfreeze.recompile(model) (or compile() with a new optimizer) before fit()."
    if runtime is Runtime.TF_KERAS:
        # Measured on tf_keras 2.21 (docs/semantics.md, rule 4): fit() trains with the flags
        # recorded by compile(), before the first fit() and after it, for any batch shape.
        when = (
            " and has already been trained (fit() or train_on_batch() ran since its last compile())"
            if state is TrainingState.TRACED
            else ""
        )
        return (
            f"{head}{when}. tf_keras trains with the trainable flags the model had when "
            "compile() ran: fit() ignores this change, for the weights and for "
            "BatchNormalization's mode alike, until compile() is called again with a new "
            f"optimizer. {fix}"
        )
    if state is TrainingState.TRACED:
        return (
            f"{head} and has already traced a training step (fit() or train_on_batch() ran "
            "since its last compile()). fit() reuses a traced step while its inputs keep "
            "their kind and shape, and that step ignores the change; Keras traces a new one, "
            "which sees it, for a new batch shape or for fit() after train_on_batch(), so part "
            "of training may run with the old flags. Take it that the change has no effect on "
            f"fit() until compile() is called again with a new optimizer. {fix}"
        )
    if state is TrainingState.OPTIMIZER_BUILT and gained_trainable:
        return (
            f"{head} and whose optimizer is already built for the old trainable variables (it "
            "was loaded compiled, or has evaluated): fit() raises 'Unknown variable' for the "
            "layers that became trainable until compile() is called again with a new "
            f"optimizer. {fix}"
        )
    return (
        f"{head}. Keras fixes the trainable variables of a training step when it first traces "
        "it: this change still reaches the next fit(), but a change made after that fit() "
        f"would not. {fix}"
    )


@dataclass(frozen=True)
class MemoryRoute:
    """The route for an in-memory model: the flags are set on its live layers."""

    def edit(self, request: EditRequest) -> EditResult:
        model: Any = request.model
        output = request.output.path
        state = training_state(model)
        runtime = runtime_of(model)
        _check_output(model, output, runtime)
        live = live_model(model)
        done = edit_live(
            live, request.assignment, request.selection.apply, dry_run=request.output.dry_run
        )
        optimizer = getattr(model, "optimizer", None)
        built = getattr(optimizer, "built", False) or getattr(
            optimizer, "_built", False
        )  # tf_keras
        optimizer_variables = len(optimizer.variables) if optimizer is not None and built else None
        decision = optimizer_decision(
            optimizer_variables, done.trainable_set_changed, request.loading.optimizer_state
        )
        findings = list(_recompile_findings(model, done, state, runtime, request.output.dry_run))
        saved = None
        if output is not None and not request.output.dry_run:
            saved = _save(request, live, output, decision)
            findings += _saved_findings(saved.recorded, output, done, decision, optimizer_variables)
        written = os.fspath(output) if saved is not None and output is not None else None
        report = live_report(
            model,
            path=written,
            fmt=save_format(written) if written else ModelFormat.MEMORY,
        )
        dropped = optimizer_variables or 0
        return EditResult(
            source=f"<in-memory model {model.name!r}>",
            output=written,
            dry_run=request.output.dry_run,
            engine=Engine.KERAS,
            selected=done.selected,
            changes=done.changes,
            report=report,
            warnings=tuple(findings),
            optimizer_state=decision,
            optimizer_variables=optimizer_variables,
            optimizer_variables_dropped=dropped
            if written and decision is OptimizerState.DROPPED
            else 0,
            input_bytes=0,
            output_bytes=saved.size if saved is not None else None,
        )


def _check_output(model: Any, output: str | None, runtime: Runtime) -> None:
    """A bad name or folder fails before anything changes."""
    if output is not None and runtime is Runtime.TF_KERAS:
        raise BnfreezeError(
            f"output=: bnfreeze saves only Keras 3 models; model {model.name!r} is a tf_keras "
            "model. Nothing was changed. Edit it without output= and save it with its own "
            "model.save()."
        )
    if output is not None:
        from pathlib import Path

        from bnfreeze.formats.atomic import check_destination

        save_format(output)
        check_destination(Path(output))


def _recompile_findings(
    model: Any, done: LiveEdit, state: TrainingState, runtime: Runtime, dry_run: bool
) -> tuple[Finding, ...]:
    text = recompile_message(
        model.name,
        len(done.changes),
        state,
        gained_trainable=done.gained_trainable,
        runtime=runtime,
    )
    if text is None:
        return ()
    if not dry_run:
        warnings.warn(text, RecompileWarning, stacklevel=_STACKLEVEL)
    return (Finding(WarningCode.RECOMPILE_REQUIRED, None, text),)


def _save(request: EditRequest, live: LiveModel, output: str, decision: OptimizerState) -> Saved:
    import functools

    objects = _custom_objects_for(live, request.loading.custom_objects)
    keep = decision in (OptimizerState.UNCHANGED, OptimizerState.KEPT)
    reload = functools.partial(
        loading.load_model, unsafe=request.loading.unsafe, custom_objects=objects, compile=False
    )
    with environment.quiet():
        return save(live.model, output, keep_optimizer=keep, reload=reload, live=live)


def _saved_findings(
    recorded: RecordedFlags | None,
    output: str,
    done: LiveEdit,
    decision: OptimizerState,
    optimizer_variables: int | None,
) -> list[Finding]:
    findings = list(recorded_flags_findings(recorded, output))
    for finding in findings:
        warnings.warn(finding.message, UserWarning, stacklevel=_STACKLEVEL)
    findings.extend(
        f
        for f in edit_warnings(
            done.changes, decision, optimizer_variables, output=output, dry_run=False
        )
        if f.code is WarningCode.OPTIMIZER_STATE
    )
    return findings


def _custom_objects_for(
    live: LiveModel, given: str | Mapping[str, object] | None
) -> dict[str, Any]:
    """What reloading a saved in-memory model needs: the classes it is made of (they are
    already loaded in this process), plus whatever the caller names."""
    objects: dict[str, Any] = {type(live.model).__name__: type(live.model)}
    for layer in live.layers.values():
        objects.setdefault(type(layer).__name__, type(layer))
    if isinstance(given, str):
        objects.update(loading.load_custom_objects(given))
    elif given:
        objects.update(given)
    return objects
