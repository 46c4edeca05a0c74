"""``bnfreeze.BatchNormGuard``: a Keras callback that checks, inside ``fit()``, that the
BatchNormalization layers do what their flags say.

::

    guard = bnfreeze.BatchNormGuard(expect="bn-inference")
    model.fit(x, y, callbacks=[guard])
    guard.report            # a GuardReport value

**Before the first step** (``on_train_begin``) the guard:

* compares the model's trainable variables with the ones its optimizer was built for. They
  differ when a flag changed after ``fit()`` (or after the optimizer was built) without a new
  ``compile()``. What this ``fit()`` then does was measured on Keras 3.15:

  - TensorFlow, the training step traced by an earlier ``fit()``: every batch of the traced
    shape runs the old step, so the change is ignored; a batch of a new shape is traced anew
    and raises ``Unknown variable`` for a variable that became trainable, or trains with the
    new flags when variables only stopped training;
  - TensorFlow, no step traced yet (the optimizer was built by ``load_model`` or by hand, or
    the model runs eagerly): the first step raises ``Unknown variable`` for a variable that
    became trainable; a variable that stopped training simply stops;
  - JAX: the first step raises (the optimizer's variables no longer match the trainable
    variables one to one), and the model's variables are left unreadable.

  The guard says which, per layer, with a :class:`~bnfreeze.errors.RecompileWarning`; with
  ``strict=True`` it raises :class:`GuardError` instead, before the step runs (on JAX that
  also keeps the variables intact);
* predicts every layer's behaviour with the same rules as ``bnfreeze.inspect(model)``, judges
  the ``expect`` expectations (the ``check`` vocabulary: ``bn-inference``, ``bn-train``,
  ``trains=GLOB``, ...) on the prediction, and reports the Keras 3 traps ``inspect`` finds (a
  call-site ``training=False`` that ``fit()`` overrides, a trainable BN under a frozen
  container).

**After the first batch** (``on_train_batch_end``) it measures, the way ``bnfreeze verify``
does, which BN layers took the batch branch (their ``call`` is recorded while the step is
traced or run, :mod:`bnfreeze.runtime.branches`), which moved their moving statistics, and
which layers' weights changed; compares that with the prediction and the expectations; and,
with ``strict=True``, sets ``model.stop_training`` so that no second batch runs.

Cost: one copy of the model's own variables before the first step and one comparison after
it; nothing happens after the first batch. The wrapper around each BN's ``call`` adds nothing
to the step, so training is bit-identical with and without the guard.

JAX: during ``fit()`` Keras keeps the training state apart from the Keras variables and
writes it back at the end of each epoch. A callback that reads ``self.model`` gets
``model.jax_state_sync()`` first (``keras.callbacks.Callback.model`` does it), which writes the
latest state into the variables and makes the next step read it back. The guard reads
``self.model`` exactly once after the first batch, for the measurement.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from bnfreeze.errors import RecompileWarning
from bnfreeze.model.expectations import evaluate, observed_from_states
from bnfreeze.runtime import replicas as data_parallel
from bnfreeze.runtime.guard_report import (
    TRAPS,
    GuardError,
    GuardReport,
    GuardWarning,
    StaleEffect,
    StaleFlags,
    expectations_of,
    failure_lines,
    stale_flags,
)

# --------------------------------------------------------------------------- the callback


def _traced(model: Any) -> bool:
    """Whether ``fit()`` reuses a training step traced before this ``fit()`` (TensorFlow).

    Keras's TensorFlow trainer keeps ``model.train_function`` until ``compile()`` resets it;
    the ``tf.function`` inside it (found through the closures) counts its traces. A function
    made for this ``fit()`` has traced nothing yet when ``on_train_begin`` runs."""
    seen: set[int] = set()

    def counts(obj: Any, depth: int) -> list[int]:
        if obj is None or id(obj) in seen or depth > 4:
            return []
        seen.add(id(obj))
        count = getattr(obj, "experimental_get_tracing_count", None)
        if callable(count):
            try:
                return [int(count())]
            except Exception:
                return []
        found: list[int] = []
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                found += counts(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                continue
        found += counts(getattr(obj, "__wrapped__", None), depth + 1)
        return found

    return any(n > 0 for n in counts(getattr(model, "train_function", None), 0))


def _make_class() -> type:
    import keras

    class BatchNormGuard(keras.callbacks.Callback):
        def __init__(self, expect: Any = None, strict: bool = False, min_samples: int = 16) -> None:
            super().__init__()
            self.min_samples = data_parallel.check_min_samples(min_samples)
            self.expect = expectations_of(expect)
            self.strict = bool(strict)
            self.report: GuardReport | None = None
            self._state: dict[str, Any] | None = None

        def on_train_begin(self, logs: Any = None) -> None:
            _before_the_first_step(self, keras)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            _after_the_first_batch(self, keras)

        def on_train_end(self, logs: Any = None) -> None:
            self._finish_recording()
            self._state = None

        def _finish_recording(self) -> None:
            state = self._state
            for key in ("sampling", "recording"):  # the reverse of the order entered
                if state is not None and state.get(key) is not None:
                    state.pop(key).__exit__(None, None, None)

    BatchNormGuard.__doc__ = (
        "A Keras callback that checks, inside fit(), that BatchNormalization layers do what "
        "their flags say: stale flags and the expectations before the first step, the branch "
        "each BN took and what moved after the first batch. Results in ``guard.report`` "
        "(a GuardReport); see docs/python-api.md, 'In a training script'."
    )
    BatchNormGuard.__module__ = __name__
    return BatchNormGuard


#: ``warnings.warn`` stack level from the helpers below: the frame that called the callback
#: (helper, its caller in this module, the callback method, Keras's callback list).
_WARN_LEVEL = 4


# -------------------------------------------------------------------- before the first step


def _before_the_first_step(guard: Any, keras: Any) -> None:
    """``on_train_begin``: stale flags and the prediction, then start recording the branch
    each built-in BN takes in the first step."""
    from bnfreeze.runtime import live
    from bnfreeze.runtime.measure import layer_paths, own_variables

    guard._finish_recording()
    model = guard.model
    if live.runtime_of(model).value != "keras3":
        raise GuardError("BatchNormGuard is a Keras 3 callback; this is a tf_keras model.")
    backend = keras.backend.backend()
    layers = layer_paths(keras, model)
    owned = own_variables(layers)
    stale = _stale(model, backend, owned)
    guard.report = _predicted(guard, model, backend, stale)
    _check_the_prediction(guard, model, stale)
    _start_recording(guard, keras, model, layers, owned, stale)


def _stale(model: Any, backend: str, owned: dict[str, Any]) -> StaleFlags | None:
    """Flags changed since the optimizer was built (see :func:`stale_flags`)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "built", False):
        return None
    built_for = getattr(optimizer, "_trainable_variables", None)
    if built_for is None:
        return None
    owner = {id(v): path for path, vs in owned.items() for v in vs}
    return stale_flags(
        backend=backend,
        built_for=list(built_for),
        now=list(model.trainable_variables),
        owner=owner,
        traced=_traced(model),
    )


def _predicted(guard: Any, model: Any, backend: str, stale: StaleFlags | None) -> GuardReport:
    """The report before training: what inspect predicts for the live model, its Keras 3
    traps, and each expectation evaluated on the prediction."""
    from bnfreeze.runtime import live

    prediction = live.live_report(model)
    records = [s.layer for s in prediction.layers]
    seen = observed_from_states(prediction.layers)
    return GuardReport(
        model=model.name,
        backend=backend,
        strict=guard.strict,
        stale=stale,
        traps=tuple(f for f in prediction.warnings if f.code in TRAPS),
        prediction=prediction,
        predicted=tuple((e, evaluate(e, records, seen)) for e in guard.expect),
    )


def _check_the_prediction(guard: Any, model: Any, stale: StaleFlags | None) -> None:
    """Warn about stale flags, traps and failed expectations; with ``strict``, stop."""
    report = guard.report
    if stale is not None:
        if guard.strict:
            guard.report = dataclasses.replace(report, stopped=True)
            raise GuardError(
                f"BatchNormGuard(strict=True) stopped fit() of model {model.name!r} "
                f"before its first step: {stale.message}"
            )
        warnings.warn(f"model {model.name!r}: {stale.message}", RecompileWarning, _WARN_LEVEL)
    found = [*(f"{f.path or 'model'}: {f.message}" for f in report.traps)]
    found += failure_lines(report.predicted, "predicted")
    if not found:
        return
    if guard.strict and any(failures for _, failures in report.predicted):
        guard.report = dataclasses.replace(report, stopped=True)
        raise GuardError(
            f"BatchNormGuard(strict=True) stopped fit() of model {model.name!r} "
            "before its first step: " + " ".join(found)
        )
    warnings.warn(
        f"BatchNormGuard, before training model {model.name!r}: " + " | ".join(found),
        GuardWarning,
        _WARN_LEVEL,
    )


def _start_recording(
    guard: Any,
    keras: Any,
    model: Any,
    layers: dict[str, Any],
    owned: dict[str, Any],
    stale: StaleFlags | None,
) -> None:
    """One copy of every layer's own variables, and every built-in BN's calls recorded
    while the first step is traced (or run)."""
    from bnfreeze.runtime.branches import BranchRecorder, is_builtin_batchnorm

    every = {id(v): v for vs in owned.values() for v in vs}
    # The variables the first step hands to the optimizer: a step traced by an
    # earlier fit() trains the set the optimizer was built for, a new one today's.
    reused = stale is not None and stale.effect in (
        StaleEffect.IGNORED_THEN_UNKNOWN_VARIABLE,
        StaleEffect.IGNORED_BUT_NEW_SHAPES,
    )
    optimizer = getattr(model, "optimizer", None)
    trained = (
        list(getattr(optimizer, "_trainable_variables", ()))
        if reused
        else model.trainable_variables
    )
    recorder = BranchRecorder(
        {p: layer for p, (layer, _) in layers.items() if is_builtin_batchnorm(keras, layer)}
    )
    guard._state = {
        "layers": layers,
        "owned": owned,
        "every": every,
        "trained": {id(v) for v in trained},
        "before": _snapshot(every),
        "recorder": recorder,
        "recording": recorder.active(),
    }
    guard._state["recording"].__enter__()
    data_parallel.start_sampling(guard._state, keras, model, layers)  # samples per BN


# -------------------------------------------------------------------- after the first batch


def _after_the_first_batch(guard: Any, keras: Any) -> None:
    """``on_train_batch_end`` of the first batch: what moved and the branch each BN took,
    compared with the prediction; warn (and with ``strict``, stop) on a disagreement."""
    state = guard._state
    if state is None:
        return
    from bnfreeze.runtime import environment
    from bnfreeze.runtime.compare import compare
    from bnfreeze.runtime.measure import measurements

    guard._finish_recording()
    guard._state = None
    model = guard.model  # on JAX: Keras syncs the training state into the variables
    after = _snapshot(state["every"])
    measured = measurements(
        keras,
        state["layers"],
        state["owned"],
        state["before"],
        after,
        state["trained"],
        state["recorder"].branches(),
    )
    report = guard.report
    assert report is not None
    verdict = compare(
        path=f"<in-memory model {model.name!r}>",
        runtime=environment.runtime_info(),
        setup=_setup(model),
        measured=measured,
        prediction=report.prediction,
        expectations=guard.expect,
    )
    guard.report = dataclasses.replace(
        report,
        measured=tuple(measured),
        checks=verdict.checks,
        disagreements=verdict.disagreements,
        expectations=verdict.expectations,
        replicas=data_parallel.finish_sampling(state, measured, guard.min_samples),
    )
    found = [d.message for d in verdict.disagreements]
    found += failure_lines(verdict.expectations, "measured") + list(guard.report.replicas.problems)
    if found:
        _stop_or_warn_after(guard, model, found)


def _setup(model: Any) -> Any:
    """How the measured step was set up: the model's own compile, one step of fit()."""
    from bnfreeze.model.measured import CompileSource, DataSource, TrainingSetup

    return TrainingSetup(
        compile_source=CompileSource.MODEL,
        optimizer=type(getattr(model, "optimizer", None)).__name__,
        loss="",
        steps=1,
        batch_size=0,
        data_source=DataSource.FILE,
        data_path=None,
        seed=None,
        input_shapes=(),
    )


def _stop_or_warn_after(guard: Any, model: Any, found: list[str]) -> None:
    if guard.strict:
        model.stop_training = True
        guard.report = dataclasses.replace(guard.report, stopped=True)
    what = "stopping fit() (strict=True)" if guard.strict else "training goes on"
    warnings.warn(
        f"BatchNormGuard, after the first batch of model {model.name!r} "
        f"({what}): " + " | ".join(found),
        GuardWarning,
        _WARN_LEVEL,
    )


def _snapshot(variables: dict[int, Any]) -> dict[int, Any]:
    import numpy as np

    return {k: np.array(v.numpy(), copy=True) for k, v in variables.items()}


_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    global _CLASS
    if name == "BatchNormGuard":
        if _CLASS is None:
            _CLASS = _make_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
