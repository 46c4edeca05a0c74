"""The Python API for scripted pipelines: the CLI's recipes on saved files *and* on in-memory
``keras.Model`` objects.

::

    import bnfreeze

    report = bnfreeze.inspect(model)                          # or a path
    result = bnfreeze.unfreeze(model, keep_bn_inference=True)  # the guide's phase 2, done right
    bnfreeze.recompile(model)                                  # a fresh optimizer, same settings
    model.fit(...)

    bnfreeze.freeze(backbone, bn_inference=True, output="frozen.keras")  # a keras-hub model
    model = bnfreeze.load_model("frozen.keras")    # keras.models.load_model + the flags again

For a path, each function runs the same library code as the CLI command
(:mod:`bnfreeze.ops.inspect`, :mod:`bnfreeze.ops.edit`) and returns the same objects. For an
in-memory model, the flags are set on the live layers (:mod:`bnfreeze.runtime.keras_engine`); the
model is changed in place and also returned in the result's report.

Changing ``trainable`` on a compiled model (docs/semantics.md, rule 4; measured on Keras 3.15 /
TF 2.21):

* before the first training step, the change takes effect in the next ``fit()``;
* once ``fit()`` or ``train_on_batch()`` has traced a training step, ``fit()`` keeps using it
  for inputs of the same kind and shape: the change has **no effect on fit() until compile()
  is called again with a new optimizer**. A step traced anew sees it (a new batch shape, the
  first ``fit()`` after ``train_on_batch()``), so part of a training run can use the old
  flags and part the new: no reliable effect either way;
* once the optimizer is built (a model loaded compiled, say), ``fit()`` raises "Unknown
  variable" for every variable that became trainable, until the same.

On tf_keras (Keras 2, measured on tf_keras 2.21) ``compile()`` records the trainable flags and
``fit()`` trains with those: a change made after ``compile()`` is ignored by ``fit()`` (weights
and BatchNormalization's mode alike), before the first ``fit()`` and after it, whatever the
batch shape, until ``compile()`` is called again.

Keras itself does not warn. bnfreeze emits a :class:`RecompileWarning` whenever it changes a
flag of a compiled model, worded for the case at hand and the model's Keras, and
:func:`recompile` does the fix.

In-memory ``tf_keras.Model`` objects are accepted as well as ``keras.Model`` ones: they are
inspected with the tf_keras rules (:class:`bnfreeze.model.modes.TfKerasRules`) and edited on the
live layers; saving one (``output=``) is refused.

Importing :mod:`bnfreeze` or this module never imports TensorFlow or Keras.
"""

from __future__ import annotations

import enum
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from bnfreeze.errors import BnfreezeError, RecompileWarning
from bnfreeze.model.assignments import Assignment
from bnfreeze.model.records import Finding, ModelFormat, Report, Runtime, WarningCode

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing.TypeIs is Python 3.13+

    from bnfreeze.ops.edit import EditResult
    from bnfreeze.ops.phases import Declaration, Phase
    from bnfreeze.runtime.finetune import FinetuneResult


class KerasModel(Protocol):
    """What the API needs of an in-memory model: a ``keras.Model`` or a ``tf_keras.Model``.

    Keras ships no type information, so a type checker sees a real model as ``Any``, which
    fits; this protocol is what rules out a number or a list where a model belongs."""

    @property
    def name(self) -> str: ...

    @property
    def layers(self) -> Any: ...

    def compile(self, *args: Any, **kwargs: Any) -> Any: ...


#: A live model, or a ``str`` / ``os.PathLike`` naming a saved one.
ModelOrPath = str | os.PathLike[str] | KerasModel
ModelT = TypeVar("ModelT", bound=KerasModel)


class TrainingState(enum.Enum):
    """How far a live model got towards training; decides what a flag change does."""

    UNCOMPILED = "uncompiled"  # flags take effect at compile()
    COMPILED = "compiled"  # compiled, no training step traced, optimizer not built
    OPTIMIZER_BUILT = "optimizer-built"  # its optimizer knows only the old trainable variables
    TRACED = "traced"  # fit()/train_on_batch() traced a training step since compile()


def _runtime_of(model: Any) -> Runtime:
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and isinstance(model, tf_keras.Model):
        return Runtime.TF_KERAS
    return Runtime.KERAS3


def training_state(model: Any) -> TrainingState:
    """Where ``model`` stands. ``model.train_function`` is what ``fit()`` and
    ``train_on_batch()`` set and ``compile()`` resets (on tf_keras too); ``optimizer.built``
    is set by the first step, by ``load_model`` of a compiled model and by
    ``compile_from_config`` (Keras 3; a tf_keras optimizer has no such flag)."""
    from bnfreeze.runtime.loading import is_compiled

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


def _is_path(value: object) -> TypeIs[str | os.PathLike[str]]:
    return isinstance(value, (str, os.PathLike))


def _check_model(value: Any) -> None:
    """A Keras 3 ``keras.Model`` or a tf_keras ``tf_keras.Model``; never imports either (an
    object of one exists only if the caller imported it)."""
    for name in ("keras", "tf_keras"):
        module = sys.modules.get(name)
        if module is not None and isinstance(value, module.Model):
            return
    raise TypeError(
        "expected a keras.Model, a tf_keras.Model or a path to a saved model, not "
        f"{type(value).__name__}"
    )


# ------------------------------------------------------------------------------ inspect


def inspect(model_or_path: ModelOrPath, *, runtime: Runtime | None = None) -> Report:
    """Each layer's flag and what it really does in ``fit()``: the ``bnfreeze inspect`` report.

    A path is read without Keras (:func:`bnfreeze.ops.inspect.inspect_file`), for ``runtime``
    (default Keras 3). An in-memory model is serialized as Keras would save it and walked the
    same way; its format is ``memory``, layers that hold variables are read off the live
    layers, and a custom BatchNormalization subclass counts as BN (``isinstance``). Its
    runtime is its own: a ``tf_keras.Model`` is predicted with the tf_keras rules for a model
    in memory (a frozen container freezes the gamma/beta below it; a recorded call-site
    ``training=`` wins); asking for another runtime is an error.
    """
    if _is_path(model_or_path):
        from bnfreeze.ops.inspect import inspect_file

        return inspect_file(model_or_path, Runtime.KERAS3 if runtime is None else runtime)
    _check_model(model_or_path)
    own = _runtime_of(model_or_path)
    if runtime is not None and runtime is not own:
        raise BnfreezeError(
            f"model {model_or_path.name!r} is a {own.value} model in memory; its behaviour is "
            f"{own.value}'s, not {runtime.value}'s. Leave runtime out for an in-memory model."
        )
    from bnfreeze.runtime import keras_engine

    return keras_engine.live_report(model_or_path, runtime=own)


# ------------------------------------------------------------------------------ edits


def freeze(
    model_or_path: ModelOrPath,
    *,
    layers: Sequence[str] = (),
    up_to: str | None = None,
    bn_inference: bool = False,
    train_bn: bool = False,
    output: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    in_place: bool = False,
    keep_optimizer_state: bool = False,
    optimizer_state: str | None = None,
    engine: str = "auto",
    custom_objects: str | Mapping[str, Any] | None = None,
    unsafe: bool = False,
) -> EditResult:
    """Freeze the selected layers, as ``bnfreeze freeze`` does; returns an
    :class:`~bnfreeze.ops.edit.EditResult`.

    With no option every selected layer gets ``trainable=False``, BN included.
    ``bn_inference=True`` sets only the BN layers to False, which on Keras 3 is what keeps
    them in inference mode in ``fit()``. ``train_bn=True`` freezes everything selected but
    the BN layers (the fastai recipe). ``layers`` are globs on layer paths or names; ``up_to``
    a layer path or name, inclusive.

    ``optimizer_state`` ("remap", the default, "drop" or "keep") says what happens to a saved
    file's optimizer variables when the set of trainable variables changes, as
    ``--optimizer-state`` does (README, "Saved optimizer state"); ``keep_optimizer_state=True``
    is its deprecated spelling of "keep". An in-memory model saved to ``output`` keeps them
    only with "keep".

    A path is edited like the CLI does (``output``, or ``in_place=True``; ``dry_run``). An
    in-memory model is changed in place, and saved to ``output`` too when one is given; a
    :class:`RecompileWarning` says what to do when it is compiled. A ``tf_keras.Model`` is
    edited the same way, but ``output=`` is refused for it (save it with its own
    ``model.save``); on tf_keras ``bn_inference=True`` works too, and a flag change on a
    compiled tf_keras model is ignored by ``fit()`` until it is compiled again.
    """
    if bn_inference and train_bn:
        raise BnfreezeError("bn_inference and train_bn contradict each other; pick one.")
    assignment = Assignment.freeze(bn_inference_only=bn_inference, train_bn=train_bn)
    return _edit(
        model_or_path,
        assignment,
        layers=layers,
        up_to=up_to,
        from_layer=None,
        output=output,
        dry_run=dry_run,
        in_place=in_place,
        keep_optimizer_state=keep_optimizer_state,
        optimizer_state=optimizer_state,
        engine=engine,
        custom_objects=custom_objects,
        unsafe=unsafe,
    )


def unfreeze(
    model_or_path: ModelOrPath,
    *,
    layers: Sequence[str] = (),
    from_: str | None = None,
    keep_bn_inference: bool = False,
    output: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    in_place: bool = False,
    keep_optimizer_state: bool = False,
    optimizer_state: str | None = None,
    engine: str = "auto",
    custom_objects: str | Mapping[str, Any] | None = None,
    unsafe: bool = False,
) -> EditResult:
    """Unfreeze the selected layers (``trainable=True``), as ``bnfreeze unfreeze`` does;
    returns an :class:`~bnfreeze.ops.edit.EditResult`.

    ``keep_bn_inference=True`` keeps every selected BN layer frozen: the fine-tuning step of
    the Keras transfer-learning guide, done right on Keras 3. ``from_`` is a layer path or
    name, inclusive. Paths and in-memory models as in :func:`freeze`.
    """
    assignment = Assignment.unfreeze(keep_bn_inference=keep_bn_inference)
    return _edit(
        model_or_path,
        assignment,
        layers=layers,
        up_to=None,
        from_layer=from_,
        output=output,
        dry_run=dry_run,
        in_place=in_place,
        keep_optimizer_state=keep_optimizer_state,
        optimizer_state=optimizer_state,
        engine=engine,
        custom_objects=custom_objects,
        unsafe=unsafe,
    )


def _edit(
    model_or_path: ModelOrPath,
    assignment: Assignment,
    *,
    layers: Sequence[str],
    up_to: str | None,
    from_layer: str | None,
    output: str | os.PathLike[str] | None,
    dry_run: bool,
    in_place: bool,
    keep_optimizer_state: bool,
    optimizer_state: str | None,
    engine: str,
    custom_objects: str | Mapping[str, Any] | None,
    unsafe: bool,
) -> EditResult:
    from bnfreeze.ops import edit as file_edit
    from bnfreeze.ops.optimizer_state import OptimizerStateMode, parse_mode

    mode = parse_mode(optimizer_state, keep_optimizer_state)

    if isinstance(layers, str):
        layers = (layers,)
    selection = file_edit.LayerSelection(tuple(layers), up_to, from_layer)
    if _is_path(model_or_path):
        if custom_objects is not None and not isinstance(custom_objects, str):
            raise BnfreezeError(
                "for a saved model, custom_objects names a module or .py file (as "
                "--custom-objects does)."
            )
        return file_edit.edit_file(
            model_or_path,
            output,
            assignment,
            layers=selection.layers,
            up_to=up_to,
            from_layer=from_layer,
            dry_run=dry_run,
            in_place=in_place,
            optimizer_state=mode,
            engine=engine,
            custom_objects=custom_objects,
            unsafe=unsafe,
        )
    _check_model(model_or_path)
    if in_place:
        raise BnfreezeError(
            "in_place applies to saved files; an in-memory model is always changed in place."
        )
    return _edit_memory(
        model_or_path,
        assignment,
        selection,
        output=output,
        dry_run=dry_run,
        keep_optimizer_state=mode is OptimizerStateMode.KEEP,
        custom_objects=custom_objects,
        unsafe=unsafe,
    )


def _edit_memory(
    model: Any,
    assignment: Assignment,
    selection: Any,
    *,
    output: str | os.PathLike[str] | None,
    dry_run: bool,
    keep_optimizer_state: bool,
    custom_objects: str | Mapping[str, Any] | None,
    unsafe: bool,
) -> EditResult:
    from bnfreeze.ops import edit as file_edit
    from bnfreeze.runtime import keras_engine, loading

    state = training_state(model)
    runtime = _runtime_of(model)
    if output is not None and runtime is Runtime.TF_KERAS:
        raise BnfreezeError(
            f"output=: bnfreeze saves only Keras 3 models; model {model.name!r} is a tf_keras "
            "model. Nothing was changed. Edit it without output= and save it with its own "
            "model.save()."
        )
    if output is not None:  # a bad name or folder fails before anything changes
        from pathlib import Path

        from bnfreeze.formats.atomic import check_destination

        keras_engine.save_format(output)
        check_destination(Path(output))
    live = keras_engine.live_model(model)
    done = keras_engine.edit_live(live, assignment, selection.apply, dry_run=dry_run)
    optimizer = getattr(model, "optimizer", None)
    built = getattr(optimizer, "built", False) or getattr(optimizer, "_built", False)  # tf_keras
    optimizer_variables = len(optimizer.variables) if optimizer is not None and built else None
    decision = file_edit.optimizer_decision(
        optimizer_variables, done.trainable_set_changed, keep_optimizer_state
    )
    source = f"<in-memory model {model.name!r}>"
    findings: list[Finding] = []
    text = recompile_message(
        model.name,
        len(done.changes),
        state,
        gained_trainable=done.gained_trainable,
        runtime=runtime,
    )
    if text is not None:
        findings.append(Finding(WarningCode.RECOMPILE_REQUIRED, None, text))
        if not dry_run:
            warnings.warn(text, RecompileWarning, stacklevel=4)
    output_bytes = None
    written = None
    if output is not None and not dry_run:
        objects = _custom_objects_for(live, custom_objects)
        keep = decision in (file_edit.OptimizerState.UNCHANGED, file_edit.OptimizerState.KEPT)
        with loading.quiet():
            saved = keras_engine.save(
                model,
                output,
                keep_optimizer=keep,
                reload=lambda p: loading.load_model(
                    p, unsafe=unsafe, custom_objects=objects, compile=False
                ),
                live=live,
            )
        output_bytes = saved.size
        written = os.fspath(output)
        recorded = keras_engine.recorded_flags_findings(saved.recorded, written)
        findings.extend(recorded)
        for finding in recorded:
            warnings.warn(finding.message, UserWarning, stacklevel=4)
        findings.extend(
            f
            for f in file_edit.edit_warnings(
                done.changes, decision, optimizer_variables, output=written, dry_run=False
            )
            if f.code is WarningCode.OPTIMIZER_STATE
        )
    report = keras_engine.live_report(
        model,
        path=written,
        fmt=keras_engine.save_format(written) if written else ModelFormat.MEMORY,
    )
    dropped = optimizer_variables or 0
    return file_edit.EditResult(
        source=source,
        output=written,
        dry_run=dry_run,
        engine=file_edit.Engine.KERAS,
        selected=done.selected,
        changes=done.changes,
        report=report,
        warnings=tuple(findings),
        optimizer_state=decision,
        optimizer_variables=optimizer_variables,
        optimizer_variables_dropped=dropped
        if written and decision is file_edit.OptimizerState.DROPPED
        else 0,
        input_bytes=0,
        output_bytes=output_bytes,
    )


def _custom_objects_for(live: Any, given: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """What reloading a saved in-memory model needs: the classes it is made of (they are
    already loaded in this process), plus whatever the caller names."""
    from bnfreeze.runtime import loading

    objects: dict[str, Any] = {type(live.model).__name__: type(live.model)}
    for layer in live.layers.values():
        objects.setdefault(type(layer).__name__, type(layer))
    if isinstance(given, str):
        objects.update(loading.load_custom_objects(given))
    elif given:
        objects.update(given)
    return objects


# ------------------------------------------------------------------------------ load_model


def load_model(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``keras.models.load_model(path, **kwargs)``, then the trainable flags bnfreeze recorded
    in the file set again; returns the ``keras.Model``.

    Keras saves a layer's flag only where the model's config lists the layer. The layers a
    keras-hub backbone or task, a custom layer (``self.bn1 = BatchNormalization()``) or a
    subclassed model builds in code are built again by ``__init__`` on load and read
    ``trainable=True``, whatever they were when saved. When ``bnfreeze freeze --engine keras``
    or :func:`freeze` with ``output=`` writes such a model, it records every flag in the
    archive's ``bnfreeze.json`` member, by the path Keras saves each layer's variables under
    (:mod:`bnfreeze.formats.recorded_flags`); this function sets them again, a container
    before its layers, so each layer ends with its own saved flag.

    ``kwargs`` go to ``keras.models.load_model`` unchanged (``custom_objects``, ``compile``,
    ``safe_mode``, ...). A file without recorded flags loads exactly as Keras loads it. A
    recorded path the loaded model does not have (other code rebuilt it) raises
    :class:`~bnfreeze.errors.ModelFormatError`; Keras's own errors propagate as they are.

    The flags are set after Keras has compiled the model (for a file saved compiled), before
    any ``fit()``: they reach the first training step (README, "keras-hub and code-built
    models").
    """
    from bnfreeze.formats import recorded_flags
    from bnfreeze.runtime import keras_engine, loading

    recorded = recorded_flags.read(path)  # a damaged member fails before Keras loads
    keras = loading.keras_module(Runtime.KERAS3)
    model = keras.models.load_model(path, **kwargs)
    if recorded is not None:
        keras_engine.apply_recorded(model, recorded, os.fspath(path))
    return model


# ------------------------------------------------------------------------------ recompile


def recompile(model: ModelT) -> ModelT:
    """Compile ``model`` again with its own compile arguments and a **fresh** optimizer of the
    same class and settings (``optimizer.__class__.from_config(optimizer.get_config())``).

    This is what makes a flag change take effect after ``fit()`` (docs/semantics.md, rule 4).
    The fresh optimizer starts from step 0: its slots (Adam moments, momentum) start empty and a
    learning-rate schedule starts over. Works for a ``tf_keras.Model`` too (its ``compile()``
    records its arguments the same way). Returns ``model``.
    """
    from bnfreeze.runtime.loading import is_compiled

    _check_model(model)
    optimizer = getattr(model, "optimizer", None)
    if not is_compiled(model) or optimizer is None:
        raise BnfreezeError(
            f"model {model.name!r} is not compiled; call compile() on it yourself.",
        )
    arguments = dict(getattr(getattr(model, "_compile_config", None), "config", {}) or {})
    if not arguments:
        raise BnfreezeError(
            f"model {model.name!r} does not record its compile() arguments; call compile() "
            "yourself."
        )
    arguments["optimizer"] = optimizer.__class__.from_config(optimizer.get_config())
    model.compile(**arguments)
    return model


# ------------------------------------------------------------------------------ finetune


def finetune(
    model: Any,
    phases: Sequence[Phase] | str | os.PathLike[str],
    x: Any,
    y: Any = None,
    *,
    optimizer_state: str = "carry",
    strict: bool = False,
    params: Mapping[str, str] | None = None,
    **fit_kwargs: Any,
) -> FinetuneResult:
    """Run a fine-tuning schedule on a compiled Keras 3 ``model``: one ``fit()`` per phase,
    with continuous epoch numbering (``initial_epoch``); returns a
    :class:`~bnfreeze.runtime.finetune.FinetuneResult` (merged history, the first epoch of each
    phase, each phase's guard findings). docs/finetune.md is the guide.

    ``phases`` is a sequence of :class:`~bnfreeze.ops.phases.Phase`, or a plan with
    ``[[phase]]`` tables: a shipped plan's name (``"keras-guide-finetune"``) or a path, with
    ``params`` for its ``${...}`` parameters.

    Before each phase the flags are set as the phase declares, through :func:`freeze` and
    :func:`unfreeze` on the live model (everything frozen, then what the phase trains
    unfrozen), and the model is compiled again with its own loss and metrics and a new
    optimizer of the class and settings it was compiled with, at the phase's learning rate
    (``learning_rates``: one optimizer per group in a ``keras.optimizers.MultiOptimizer``).
    ``optimizer_state="carry"`` keeps every slot of a variable that trained before and still
    trains, starts new ones at zero and continues the iteration count; ``"reset"`` starts each
    phase from a fresh optimizer. Every phase runs with a :class:`BatchNormGuard` that checks
    in its first batch that exactly the declared layers train and each BN layer takes the
    declared branch; ``strict=True`` stops at the first disagreement and raises
    :class:`~bnfreeze.runtime.finetune.FinetuneStopped` (its ``result`` holds what ran).
    """
    from bnfreeze.ops.phases import OptimizerStateMode, _choice, check_phases
    from bnfreeze.runtime import finetune as schedule

    _check_model(model)
    if _runtime_of(model) is Runtime.TF_KERAS:
        raise BnfreezeError("finetune runs Keras 3 models; this is a tf_keras model.")
    mode = _choice(OptimizerStateMode, optimizer_state, "optimizer_state")
    if _is_path(phases):
        from bnfreeze.ops.plan_parser import load_plan

        plan = load_plan(phases, params)
        if not plan.phases:
            raise BnfreezeError(
                f"plan {plan.name or str(phases)!r} has no [[phase]] tables; apply it with "
                "bnfreeze apply, or give finetune a plan with phases (bnfreeze plans)."
            )
        phases = plan.phases
    elif params:
        raise BnfreezeError("params= is for a plan given by name or path.")
    return schedule.run(
        model,
        check_phases(phases),
        x,
        y,
        optimizer_state=mode,
        strict=strict,
        set_flags=_phase_flags,
        fit_kwargs=fit_kwargs,
    )


def _phase_flags(model: Any, phase: Phase, label: str) -> tuple[Declaration, Any]:
    """Set the flags ``phase`` declares, through :func:`freeze` / :func:`unfreeze`: everything
    frozen (BN layers left training for ``bn="train"``), then the chosen layers unfrozen
    (their BN layers kept in inference for ``bn="inference"``)."""
    import glob

    from bnfreeze.ops.phases import BnMode, declare

    records = [s.layer for s in inspect(model).layers]
    declaration = declare(phase, label, records)
    chosen = [glob.escape(r.path) for r in phase.chosen(records)]
    with warnings.catch_warnings():
        # compile() runs right after, with a new optimizer: the warning's advice is followed.
        warnings.simplefilter("ignore", RecompileWarning)
        freeze(model, train_bn=phase.bn is BnMode.TRAIN)
        unfreeze(model, layers=chosen, keep_bn_inference=phase.bn is BnMode.INFERENCE)
    return declaration, records
