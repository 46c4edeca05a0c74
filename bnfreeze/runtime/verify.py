"""Measured truth: what actually moves when a saved model trains.

:func:`verify_file` loads the model with Keras (``safe_mode=True``, in memory: the file is
only read), builds a batch that fits every input, runs real training steps through
``train_on_batch`` (the same ``train_step`` as ``fit()``), and records, per layer, which of
its own variables changed:

* the BN moving statistics (``moving_mean`` / ``moving_variance``);
* gamma / beta;
* any other weight of the layer (kernels, biases, ...).

For a built-in BatchNormalization layer, the mode in ``fit()`` is the branch its ``call``
took, recorded during the steps (:mod:`bnfreeze.runtime.branches`). Keras's rule (the
``BatchNormalization`` docstring): in training mode "the layer normalizes its output using the
mean and standard deviation of the current batch of inputs" and updates its moving statistics;
in inference mode it "normalizes its output using a moving average of the mean and standard
deviation of the batches it has seen during training" and leaves them alone. Whether the
moving statistics moved is reported as a fact of its own: with ``momentum=1.0`` the batch
branch leaves them bit-identical. A custom subclass may override ``call``, so its mode is
reported as not measured.

The measurement is then compared with the prediction :func:`bnfreeze.ops.inspect.inspect_file`
makes from the same file; every disagreement names the layer.

A variable that ``fit()`` trains can still come out bit-identical when its gradient is exactly
zero: a bias right before a BN in training mode, or a BN's beta feeding a 1x1 conv followed
by another BN. Such a variable is reported as :attr:`Movement.ZERO_UPDATE` (it is among the
model's ``trainable_variables`` that Keras hands to the optimizer, but this step left it
unchanged) and counts as trained.

Steps run eagerly (``run_eagerly=True``): tracing a graph for one step costs ten times more
than the step, and the ``training`` argument is resolved in Python by ``Layer.__call__``
either way, so the mode of each layer is the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnfreeze.model.expectations import Expectation
from bnfreeze.model.measured import DataSource, TrainingSetup, VerifyReport
from bnfreeze.model.records import Report, Runtime
from bnfreeze.runtime import environment, loading, rebuilt
from bnfreeze.runtime.batches import SYNTHETIC_SEED, build_batches, read_npz
from bnfreeze.runtime.compare import check_scopes, compare
from bnfreeze.runtime.environment import ProgressFn, no_progress
from bnfreeze.runtime.measure import measure

# --------------------------------------------------------------------------- the library call


def verify_file(
    path: str | os.PathLike[str],
    *,
    steps: int = 1,
    batch_size: int = 2,
    data: str | os.PathLike[str] | None = None,
    expectations: Sequence[Expectation] = (),
    runtime: Runtime = Runtime.KERAS3,
    unsafe: bool = False,
    custom_objects: str | Mapping[str, Any] | None = None,
    seed: int = SYNTHETIC_SEED,
    progress: ProgressFn = no_progress,
) -> VerifyReport:
    """Train a saved model for ``steps`` steps in memory and compare with ``inspect``.

    ``custom_objects`` is a module name or ``.py`` path (see
    :func:`bnfreeze.runtime.loading.load_custom_objects`) or a ready dict. The file is never
    written.
    Bad input raises a :class:`~bnfreeze.errors.BnfreezeError`.
    """
    from bnfreeze.errors import BnfreezeError

    if steps < 1 or batch_size < 1:
        raise BnfreezeError("--steps and --batch-size must be at least 1.")
    environment.require_runtime(runtime)
    prediction = _predict(path, runtime, expectations, custom_objects, unsafe)
    arrays = read_npz(data) if data is not None else None
    spec = custom_objects if isinstance(custom_objects, str) else None
    if spec is not None and spec.endswith(".py") and not Path(spec).is_file():
        # Fail now, not after TensorFlow's long import.
        raise BnfreezeError(f"{loading.CUSTOM_OBJECTS_OPTION} {spec}: no such file.")

    with environment.quiet():
        progress(environment.loading_message(runtime))
        keras = environment.keras_module(runtime)
        info = environment.runtime_info(runtime)
        objects = (
            loading.load_custom_objects(custom_objects)
            if isinstance(custom_objects, str)
            else dict(custom_objects or {})
        )
        with environment.keras_warnings() as notes:
            progress("loading the model")
            model, reason = _load(path, unsafe=unsafe, custom_objects=objects, runtime=runtime)
            file_config = prediction.model.config if prediction is not None else None
            batches = build_batches(
                keras, model, arrays, data, steps, batch_size, seed, file_config
            )
            progress(f"training {steps} step{'s' if steps != 1 else ''} (batch {batch_size})")
            measured, setup = measure(keras, model, batches, steps, batch_size, reason)
    setup = TrainingSetup(
        compile_source=setup.compile_source,
        optimizer=setup.optimizer,
        loss=setup.loss,
        steps=steps,
        batch_size=batch_size,
        data_source=DataSource.FILE if data is not None else DataSource.SYNTHETIC,
        data_path=os.fspath(data) if data is not None else None,
        seed=None if data is not None else seed,
        input_shapes=batches.input_shapes,
        reason=setup.reason,
    )
    return compare(
        path=os.fspath(path),
        runtime=info,
        setup=setup,
        measured=measured,
        prediction=prediction,
        expectations=expectations,
        notes=tuple(batches.notes) + tuple(notes),
    )


def _predict(
    path: str | os.PathLike[str],
    runtime: Runtime,
    expectations: Sequence[Expectation],
    custom_objects: str | Mapping[str, Any] | None,
    unsafe: bool,
) -> Report | None:
    """The prediction first: it reads the file without Keras, so a bad file fails in
    milliseconds, and expectation globs are checked before the slow part. Layers that code
    builds are asked of Keras, so the rows have the paths measured. A file that holds Python
    code is refused here unless ``unsafe``."""
    from bnfreeze.model import modes
    from bnfreeze.ops.inspect import inspect_file

    def ask(model: Any, listed: set[str]) -> Any:
        objects = custom_objects if isinstance(custom_objects, str | None) else dict(custom_objects)
        return rebuilt.ask(model, listed, custom_objects=objects, unsafe=unsafe)

    prediction = inspect_file(path, runtime, ask_keras=ask) if runtime in modes.RULES else None
    if prediction is not None:
        check_scopes(expectations, prediction)
    loading.refuse_unsafe(
        prediction.model.config if prediction is not None else _config_of(path),
        str(path),
        unsafe=unsafe,
    )
    return prediction


def _config_of(path: str | os.PathLike[str]) -> Any:
    from bnfreeze.formats.readers import read_model

    return read_model(path, weights=False).config


# --------------------------------------------------------------------------- loading


def _load(
    path: str | os.PathLike[str],
    *,
    unsafe: bool,
    custom_objects: dict[str, Any],
    runtime: Runtime,
) -> tuple[Any, str | None]:
    """Load compiled, as a user would; if the compile config is what breaks loading, load
    uncompiled and say why (the steps then use SGD + MSE)."""
    from bnfreeze.errors import BnfreezeError, UnsafeModelError

    try:
        return loading.load_model(
            path,
            unsafe=unsafe,
            custom_objects=custom_objects,
            compile=True,
            runtime=runtime,
            fresh_names=True,
        ), None
    except UnsafeModelError:
        raise
    except BnfreezeError as first:
        try:
            model = loading.load_model(
                path,
                unsafe=unsafe,
                custom_objects=custom_objects,
                compile=False,
                runtime=runtime,
                fresh_names=True,
            )
        except BnfreezeError:
            raise first from None
        return model, f"loading with its compile config failed ({first})"


# --------------------------------------------------------------------------- data


# --------------------------------------------------------------------------- measuring
