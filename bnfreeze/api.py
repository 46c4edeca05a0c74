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
(:mod:`bnfreeze.ops.inspect`; an edit is one :class:`~bnfreeze.ops.request.EditRequest` applied
by :func:`bnfreeze.runtime.routes.edit`) and returns the same objects. For an in-memory model,
the flags are set on the live layers (:mod:`bnfreeze.runtime.memory_route`); the model is
changed in place and also returned in the result's report.

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

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from bnfreeze.errors import BnfreezeError
from bnfreeze.errors import RecompileWarning as RecompileWarning
from bnfreeze.model.assignments import Assignment
from bnfreeze.model.records import Report, Runtime
from bnfreeze.ops.request import (
    EditResult,
    KerasModel,
    LayerSelection,
    Loading,
    Output,
    check_model,
)

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing.TypeIs is Python 3.13+

    from bnfreeze.ops.frozen_stats import ConvertResult
    from bnfreeze.ops.phases import Declaration, Phase
    from bnfreeze.ops.sync import SyncResult
    from bnfreeze.runtime.finetune import FinetuneResult
    from bnfreeze.runtime.recalibrate import Recalibration


#: A live model, or a ``str`` / ``os.PathLike`` naming a saved one.
ModelOrPath = str | os.PathLike[str] | KerasModel
ModelT = TypeVar("ModelT", bound=KerasModel)


def _is_path(value: object) -> TypeIs[str | os.PathLike[str]]:
    return isinstance(value, (str, os.PathLike))


# ------------------------------------------------------------------------------ inspect


def inspect(
    model_or_path: ModelOrPath, *, runtime: Runtime | None = None, from_file: bool = False
) -> Report:
    """Each layer's flag and what it really does in ``fit()``: the ``bnfreeze inspect`` report.

    A path is read as ``bnfreeze inspect`` reads it (:func:`bnfreeze.ops.inspect.inspect_file`),
    for ``runtime`` (default Keras 3): without Keras, unless it holds layers that code builds
    (keras-hub, custom layers) and Keras is installed, which is then asked how it loads them
    (:func:`bnfreeze.runtime.rebuilt.ask`); ``from_file=True`` predicts them by rule instead,
    as ``--from-file`` does. An in-memory model is serialized as Keras would save it and
    walked the same way; its format is ``memory``, layers that hold variables are read off
    the live layers, and a custom BatchNormalization subclass counts as BN (``isinstance``).
    Its runtime is its own: a ``tf_keras.Model`` is predicted with the tf_keras rules for a
    model in memory (a frozen container freezes the gamma/beta below it; a recorded call-site
    ``training=`` wins); asking for another runtime is an error.
    """
    if _is_path(model_or_path):
        from bnfreeze.ops.inspect import inspect_file
        from bnfreeze.runtime import rebuilt

        asker = None if from_file else rebuilt.ask
        return inspect_file(model_or_path, runtime or Runtime.KERAS3, ask_keras=asker)
    check_model(model_or_path)
    if from_file:
        raise BnfreezeError("from_file=True applies to a saved model's path, not to a model.")
    from bnfreeze.runtime.live import live_report, runtime_of

    own = runtime_of(model_or_path)
    if runtime is not None and runtime is not own:
        raise BnfreezeError(
            f"model {model_or_path.name!r} is a {own.value} model in memory; its behaviour is "
            f"{own.value}'s, not {runtime.value}'s. Leave runtime out for an in-memory model."
        )
    return live_report(model_or_path, runtime=own)


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
    optimizer_state: str | None = None,
    engine: str = "auto",
    custom_objects: str | Mapping[str, Any] | None = None,
    unsafe: bool = False,
    bn_frozen_stats: bool = False,
) -> EditResult | ConvertResult:
    """Freeze the selected layers, as ``bnfreeze freeze`` does; returns an
    :class:`~bnfreeze.ops.request.EditResult`.

    ``bn_frozen_stats=True`` does something else, as ``freeze --bn-frozen-stats`` does: the
    selected BN layers become ``bnfreeze.layers.FrozenStatsBatchNormalization`` (they
    normalize with their moving statistics in ``fit()`` and never update them, while gamma and
    beta train where the layer's own ``trainable`` is True), and no flag changes; returns a
    :class:`~bnfreeze.ops.frozen_stats.ConvertResult`. A path is rewritten (``.keras`` only;
    only ``config.json`` changes); an in-memory Keras 3 model is changed in place (each layer
    object keeps its variables and place in the graph), and a compiled one must be compiled
    again with a new optimizer before ``fit()`` (a :class:`RecompileWarning` says so).

    With no option every selected layer gets ``trainable=False``, BN included.
    ``bn_inference=True`` sets only the BN layers to False, which on Keras 3 is what keeps
    them in inference mode in ``fit()``. ``train_bn=True`` freezes everything selected but
    the BN layers (the fastai recipe). ``layers`` are globs on layer paths or names; ``up_to``
    a layer path or name, inclusive.

    ``optimizer_state`` ("remap", the default, "drop" or "keep") says what happens to a saved
    file's optimizer variables when the set of trainable variables changes, as
    ``--optimizer-state`` does (README, "Saved optimizer state"). An in-memory model saved
    to ``output`` keeps them only with "keep".

    A path is edited like the CLI does (``output``, or ``in_place=True``; ``dry_run``). An
    in-memory model is changed in place, and saved to ``output`` too when one is given; a
    :class:`RecompileWarning` says what to do when it is compiled. A ``tf_keras.Model`` is
    edited the same way, but ``output=`` is refused for it (save it with its own
    ``model.save``); on tf_keras ``bn_inference=True`` works too, and a flag change on a
    compiled tf_keras model is ignored by ``fit()`` until it is compiled again.
    """
    if bn_frozen_stats:
        if bn_inference or train_bn:
            raise BnfreezeError(
                "bn_frozen_stats changes the BN layers' class, not flags: use it without "
                "bn_inference and train_bn."
            )
        return _frozen_stats(
            model_or_path,
            layers=layers,
            up_to=up_to,
            output=output,
            dry_run=dry_run,
            in_place=in_place,
        )
    from bnfreeze.runtime.routes import edit_model

    return edit_model(
        model_or_path,
        Assignment.freeze(bn_inference=bn_inference, train_bn=train_bn),
        LayerSelection(_patterns(layers), up_to=up_to),
        _output(output, in_place=in_place, dry_run=dry_run),
        Loading.of(engine, custom_objects, unsafe, optimizer_state),
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
    optimizer_state: str | None = None,
    engine: str = "auto",
    custom_objects: str | Mapping[str, Any] | None = None,
    unsafe: bool = False,
) -> EditResult:
    """Unfreeze the selected layers (``trainable=True``), as ``bnfreeze unfreeze`` does;
    returns an :class:`~bnfreeze.ops.request.EditResult`.

    ``keep_bn_inference=True`` keeps every selected BN layer frozen: the fine-tuning step of
    the Keras transfer-learning guide, done right on Keras 3. ``from_`` is a layer path or
    name, inclusive. Paths and in-memory models as in :func:`freeze`.
    """
    from bnfreeze.runtime.routes import edit_model

    return edit_model(
        model_or_path,
        Assignment.unfreeze(keep_bn_inference=keep_bn_inference),
        LayerSelection(_patterns(layers), from_=from_),
        _output(output, in_place=in_place, dry_run=dry_run),
        Loading.of(engine, custom_objects, unsafe, optimizer_state),
    )


def _patterns(layers: Sequence[str]) -> tuple[str, ...]:
    return (layers,) if isinstance(layers, str) else tuple(layers)


def _output(path: str | os.PathLike[str] | None, *, in_place: bool, dry_run: bool) -> Output:
    return Output(None if path is None else os.fspath(path), in_place=in_place, dry_run=dry_run)


def _frozen_stats(
    model_or_path: ModelOrPath,
    *,
    layers: Sequence[str],
    up_to: str | None,
    output: str | os.PathLike[str] | None,
    dry_run: bool,
    in_place: bool,
) -> ConvertResult:
    from bnfreeze.ops import frozen_stats as ops_frozen_stats
    from bnfreeze.ops.frozen_stats import BnClass

    if isinstance(layers, str):
        layers = (layers,)
    if _is_path(model_or_path):
        return ops_frozen_stats.convert_file(
            os.fspath(model_or_path),
            None if output is None else os.fspath(output),
            BnClass.FROZEN_STATS,
            layers=tuple(layers),
            up_to=up_to,
            dry_run=dry_run,
            in_place=in_place,
        )
    check_model(model_or_path)
    from bnfreeze.runtime.frozen_stats import convert_model

    return convert_model(
        model_or_path,
        layers=tuple(layers),
        up_to=up_to,
        dry_run=dry_run,
        in_place=in_place,
        output=output,
    )


# ------------------------------------------------------------------------------ recalibrate


def recalibrate(
    model: Any,
    data: Any,
    *,
    batch_size: int = 32,
    batches: int | None = None,
    layers: Sequence[str] = (),
    up_to: str | None = None,
    from_: str | None = None,
) -> Recalibration:
    """Re-estimate the moving statistics of the selected BatchNormalization layers of an
    in-memory Keras 3 model from ``data``, as ``bnfreeze recalibrate`` does for a file.

    ``data`` is a NumPy array (cut into batches of ``batch_size``; a dict or list of arrays for
    a model with several inputs) or an iterable of batches (a ``tf.data.Dataset``, a
    generator), each the inputs or an ``(x, y[, sample_weight])`` tuple; ``batches`` stops
    after that many. Each selected layer's ``moving_mean`` and ``moving_variance`` become the
    equal-weight average over the batches of the batch mean and (biased) variance Keras's own
    training-mode update uses (:mod:`bnfreeze.runtime.recalibrate`); nothing else changes: no
    gradient step, no other variable, no flag, no optimizer state. ``layers`` (globs),
    ``up_to`` and ``from_`` select as ``--layers``/``--up-to``/``--from`` do; every BN layer by
    default. Returns a :class:`~bnfreeze.runtime.recalibrate.Recalibration`.
    """
    from bnfreeze.runtime import recalibrate as runtime_recalibrate

    check_model(model)
    from bnfreeze.runtime.live import runtime_of

    if runtime_of(model) is Runtime.TF_KERAS:
        raise BnfreezeError("recalibrate works on Keras 3 models; this is a tf_keras model.")
    if isinstance(layers, str):
        layers = (layers,)
    return runtime_recalibrate.recalibrate(
        model,
        data,
        batch_size=batch_size,
        batches=batches,
        layers=tuple(layers),
        up_to=up_to,
        from_=from_,
    )


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
    from bnfreeze.runtime import environment
    from bnfreeze.runtime.saving import apply_recorded

    recorded = recorded_flags.read(path)  # a damaged member fails before Keras loads
    keras = environment.keras_module(Runtime.KERAS3)
    import bnfreeze.runtime.layers  # noqa: F401  (registers FrozenStatsBatchNormalization)

    model = keras.models.load_model(path, **kwargs)
    if recorded is not None:
        apply_recorded(model, recorded, os.fspath(path))
    return model


# ------------------------------------------------------------------------------ recompile


def sync_bn(
    path: str | os.PathLike[str],
    *,
    synchronized: bool,
    layers: Sequence[str] = (),
    output: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    in_place: bool = False,
) -> SyncResult:
    """Set ``BatchNormalization(synchronized=...)`` on the BN layers of a saved model (all, or
    those ``layers`` selects) and write ``output``; the CLI's ``bnfreeze sync-bn``.

    ``synchronized=True`` normalizes over the global batch under ``tf.distribute``, but Keras
    loads such a file only on TensorFlow (docs/semantics.md, rule 8). Only the config
    changes; tf_keras's ``SyncBatchNormalization`` becomes ``BatchNormalization``."""
    from bnfreeze.ops.sync import set_synchronized_file

    return set_synchronized_file(
        path,
        output,
        synchronized=synchronized,
        layers=layers,
        dry_run=dry_run,
        in_place=in_place,
    )


def recompile(model: ModelT) -> ModelT:
    """Compile ``model`` again with its own compile arguments and a **fresh** optimizer of the
    same class and settings (``optimizer.__class__.from_config(optimizer.get_config())``).

    This is what makes a flag change take effect after ``fit()`` (docs/semantics.md, rule 4).
    The fresh optimizer starts from step 0: its slots (Adam moments, momentum) start empty and a
    learning-rate schedule starts over. Works for a ``tf_keras.Model`` too (its ``compile()``
    records its arguments the same way). Returns ``model``.
    """
    from bnfreeze.runtime.environment import recompile_model

    check_model(model)
    return recompile_model(model)


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

    check_model(model)
    mode = _choice(OptimizerStateMode, optimizer_state, "optimizer_state")
    if _is_path(phases):
        from bnfreeze.ops.plan_parser import load_phases

        phases = load_phases(phases, params)
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

    from bnfreeze.ops.frozen_stats import BnClass
    from bnfreeze.ops.phases import BnMode, PhaseError, declare
    from bnfreeze.runtime.frozen_stats import convert_live

    records = [s.layer for s in inspect(model).layers]
    declaration = declare(phase, label, records)
    picked = phase.chosen(records)
    chosen = [glob.escape(r.path) for r in picked]
    if any(r.frozen_stats for r in records):
        # Every phase starts from plain BatchNormalization: a frozen-stats phase's class
        # change ends with it.
        convert_live(model, BnClass.BATCHNORM)
    with warnings.catch_warnings():
        # compile() runs right after, with a new optimizer: the warning's advice is followed.
        warnings.simplefilter("ignore", RecompileWarning)
        freeze(model, train_bn=phase.bn is BnMode.TRAIN)
        unfreeze(model, layers=chosen, keep_bn_inference=phase.bn is BnMode.INFERENCE)
    if phase.bn is BnMode.FROZEN_STATS:
        selected_bn = [glob.escape(p) for p in sorted(declaration.bn_frozen_stats)]
        if not selected_bn:
            raise PhaseError(
                f'{label}: bn = "frozen-stats" puts the BN layers the phase selects in '
                "frozen-statistics mode, and it selects none."
            )
        convert_live(model, BnClass.FROZEN_STATS, layers=selected_bn)
        records = [s.layer for s in inspect(model).layers]
    return declaration, records
