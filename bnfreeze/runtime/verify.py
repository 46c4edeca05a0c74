"""Measured truth: what actually moves when a saved model trains.

:func:`verify_file` loads the model with Keras (``safe_mode=True``, in memory: the file is
only read), builds a batch that fits every input, runs real training steps through
``train_on_batch`` (the same ``train_step`` as ``fit()``), and records, per layer, which of
its own variables changed:

* the BN moving statistics (``moving_mean`` / ``moving_variance``);
* gamma / beta;
* any other weight of the layer (kernels, biases, ...).

For a built-in BatchNormalization layer, the mode in ``fit()`` follows from the first
answer. Keras's rule (the ``BatchNormalization`` docstring): in training mode "the layer
normalizes its output using the mean and standard deviation of the current batch of inputs"
and updates its moving statistics; in inference mode it "normalizes its output using a moving
average of the mean and standard deviation of the batches it has seen during training" and
leaves them alone. So the moving statistics moved exactly when the layer normalized with batch
statistics. A custom subclass may override ``call``, so its mode is reported as not measured.

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

import enum
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import DataError
from bnfreeze.model.expectations import Expectation, Failure, Observed, evaluate
from bnfreeze.model.records import LayerState, Normalization, Report, Runtime
from bnfreeze.runtime import loading
from bnfreeze.runtime.loading import ProgressFn, RuntimeInfo, no_progress

#: Synthetic inputs are standard-normal values scaled to this mean and standard deviation:
#: far from freshly initialised moving statistics (0, 1), as real image or feature data is.
SYNTHETIC_MEAN = 5.0
SYNTHETIC_STD = 2.0
SYNTHETIC_SEED = 0
#: Used for input dimensions the model leaves open (besides the batch).
OPEN_DIMENSION = 32
#: The optimizer used when the file has no compile config (or it cannot train).
DEFAULT_LEARNING_RATE = 0.01


class Movement(enum.Enum):
    """What one group of a layer's variables did during the training steps."""

    MOVED = "moved"
    #: Among the variables ``fit()`` trains, but the update left it unchanged (zero gradient).
    ZERO_UPDATE = "zero-update"
    #: Not trained, and unchanged.
    UNCHANGED = "unchanged"
    #: The layer has no such variables.
    NONE = "none"

    @property
    def changed(self) -> bool:
        return self is Movement.MOVED

    @property
    def trained(self) -> bool | None:
        """Whether ``fit()`` trained this group (moved, or trained with a zero update)."""
        if self is Movement.NONE:
            return None
        return self in (Movement.MOVED, Movement.ZERO_UPDATE)


class Aspect(enum.Enum):
    """What a prediction and a measurement are compared on."""

    MOVING_STATS = "moving-stats"
    GAMMA_BETA = "gamma-beta"
    WEIGHTS = "weights"

    @property
    def words(self) -> str:
        return {
            Aspect.MOVING_STATS: "its moving statistics",
            Aspect.GAMMA_BETA: "gamma/beta",
            Aspect.WEIGHTS: "its weights",
        }[self]


class CompileSource(enum.Enum):
    """Where the optimizer and loss of the measured steps came from."""

    MODEL = "model"  # the file's own compile config
    DEFAULT = "default"  # SGD + mean squared error: the file has none
    FALLBACK = "fallback"  # SGD + mean squared error: the file's own could not train


class DataSource(enum.Enum):
    SYNTHETIC = "synthetic"
    FILE = "file"


@dataclass(frozen=True)
class LayerMeasurement:
    """What one layer's own variables did in the measured training steps."""

    path: str
    class_name: str
    is_batchnorm: bool  # an instance of BatchNormalization, built-in or subclass
    builtin: bool  # a Keras built-in class (for BN: its mode can be read off its statistics)
    in_file: bool  # False for a BN found inside a custom layer, which the file does not list
    moving_stats: Movement
    gamma_beta: Movement
    other_weights: Movement

    @property
    def mode_measured(self) -> bool:
        return self.is_batchnorm and self.builtin and self.moving_stats is not Movement.NONE

    @property
    def normalizes_with(self) -> Normalization | None:
        """The statistics a built-in BN normalized with in ``fit()``; None when not measured."""
        if not self.mode_measured:
            return None
        return Normalization.BATCH if self.moving_stats.changed else Normalization.MOVING

    @property
    def trains_weights(self) -> bool | None:
        """Whether ``fit()`` trained any of the layer's weights (None: it has none)."""
        groups = [
            m.trained for m in (self.gamma_beta, self.other_weights) if m is not Movement.NONE
        ]
        if not groups:
            return None
        return any(groups)


@dataclass(frozen=True)
class Disagreement:
    """A layer where the prediction from the file and the measurement differ."""

    path: str
    aspect: Aspect
    predicted: bool  # predicted to move / train
    measured: Movement

    @property
    def message(self) -> str:
        what = self.aspect.words
        if self.aspect is Aspect.MOVING_STATS:
            said = "move" if self.predicted else "stay unchanged"
            did = "moved" if self.measured.changed else "stayed unchanged"
        else:
            said = "train" if self.predicted else "stay frozen"
            did = {
                Movement.MOVED: "moved",
                Movement.ZERO_UPDATE: "were trained (with a zero update)",
                Movement.UNCHANGED: "stayed frozen",
            }.get(self.measured, self.measured.value)
        return f"{self.path}: inspect predicted {what} {said} in fit(), but they {did}."


@dataclass(frozen=True)
class TrainingSetup:
    """How the measured steps were run."""

    compile_source: CompileSource
    optimizer: str
    loss: str
    steps: int
    batch_size: int
    data_source: DataSource
    data_path: str | None
    seed: int | None
    input_shapes: tuple[tuple[int, ...], ...]
    reason: str | None = None  # why the file's own compile config was not used

    @property
    def execution(self) -> str:
        return "eager"


@dataclass(frozen=True)
class VerifyReport:
    """A measurement, the prediction it is compared with, and the verdict."""

    path: str
    runtime: RuntimeInfo
    setup: TrainingSetup
    layers: tuple[LayerMeasurement, ...]
    prediction: Report | None  # None only when compare() was given no prediction
    checks: int  # (layer, aspect) pairs compared
    disagreements: tuple[Disagreement, ...]
    not_in_file: tuple[str, ...]  # measured layers the file's layer list does not show
    not_measured: tuple[str, ...]  # layers the file says hold weights, not found in Keras
    expectations: tuple[tuple[Expectation, tuple[Failure, ...]], ...]
    notes: tuple[str, ...]  # Keras's own warnings, and how the run was adapted

    @property
    def batchnorm(self) -> tuple[LayerMeasurement, ...]:
        return tuple(m for m in self.layers if m.is_batchnorm)

    @property
    def bn_stats_moved(self) -> int:
        return sum(1 for m in self.batchnorm if m.moving_stats.changed)

    @property
    def agree(self) -> bool:
        return not self.disagreements

    @property
    def expectations_hold(self) -> bool:
        return all(not failures for _, failures in self.expectations)

    @property
    def exit_code(self) -> int:
        """0 when prediction and measurement agree and every expectation holds, else 1."""
        from bnfreeze.errors import EXIT_CHECK_FAILED, EXIT_OK

        return EXIT_OK if self.agree and self.expectations_hold else EXIT_CHECK_FAILED


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
    from bnfreeze.model import modes
    from bnfreeze.ops.inspect import inspect_file

    if steps < 1 or batch_size < 1:
        raise BnfreezeError("--steps and --batch-size must be at least 1.")
    loading.require_runtime(runtime)
    # The prediction first: it reads the file without Keras, so a bad file fails in
    # milliseconds, and expectation globs are checked before the slow part.
    prediction = inspect_file(path, runtime) if runtime in modes.RULES else None
    if prediction is not None:
        _check_scopes(expectations, prediction)
    loading.refuse_unsafe(
        prediction.model.config if prediction is not None else _config_of(path),
        str(path),
        unsafe=unsafe,
    )
    arrays = _read_npz(data) if data is not None else None
    spec = custom_objects if isinstance(custom_objects, str) else None
    if spec is not None and spec.endswith(".py") and not Path(spec).is_file():
        # Fail now, not after TensorFlow's long import.
        raise BnfreezeError(f"{loading.CUSTOM_OBJECTS_OPTION} {spec}: no such file.")

    with loading.quiet():
        progress("loading TensorFlow")
        keras = loading.keras_module(runtime)
        info = loading.runtime_info(runtime)
        objects = (
            loading.load_custom_objects(custom_objects)
            if isinstance(custom_objects, str)
            else dict(custom_objects or {})
        )
        with loading.keras_warnings() as notes:
            progress("loading the model")
            model, reason = _load(path, unsafe=unsafe, custom_objects=objects, runtime=runtime)
            file_config = prediction.model.config if prediction is not None else None
            batches = _batches(keras, model, arrays, data, steps, batch_size, seed, file_config)
            progress(f"training {steps} step{'s' if steps != 1 else ''} (batch {batch_size})")
            measured, setup = _measure(keras, model, batches, steps, batch_size, reason)
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


def compare(
    *,
    path: str,
    runtime: RuntimeInfo,
    setup: TrainingSetup,
    measured: Sequence[LayerMeasurement],
    prediction: Report | None,
    expectations: Sequence[Expectation] = (),
    notes: tuple[str, ...] = (),
) -> VerifyReport:
    """Compare a measurement with ``inspect``'s prediction and judge the expectations.

    Pure: no Keras. Only what both sides know is compared: a prediction of None (a custom
    class's moving statistics, say) or a layer without such variables is skipped.
    """
    checks = 0
    disagreements: list[Disagreement] = []
    predicted: dict[str, LayerState] = (
        {s.layer.path: s for s in prediction.layers} if prediction is not None else {}
    )
    for m in measured:
        state = predicted.get(m.path)
        if state is None:
            continue
        for aspect, said, did in _pairs(m, state):
            checks += 1
            agrees = did.changed is said if aspect is Aspect.MOVING_STATS else did.trained is said
            if not agrees:
                disagreements.append(Disagreement(m.path, aspect, said, did))
    measured_paths = {m.path for m in measured}
    not_in_file = tuple(
        m.path for m in measured if prediction is not None and m.path not in predicted
    )
    not_measured = tuple(
        s.layer.path
        for s in (prediction.layers if prediction is not None else ())
        if s.has_weights and not s.layer.is_container and s.layer.path not in measured_paths
    )
    judged = tuple((e, _judge(e, measured, prediction)) for e in expectations)
    return VerifyReport(
        path=path,
        runtime=runtime,
        setup=setup,
        layers=tuple(measured),
        prediction=prediction,
        checks=checks,
        disagreements=tuple(disagreements),
        not_in_file=not_in_file,
        not_measured=not_measured,
        expectations=judged,
        notes=notes,
    )


def _pairs(m: LayerMeasurement, state: LayerState) -> Iterable[tuple[Aspect, bool, Movement]]:
    fit = state.in_fit
    if m.moving_stats is not Movement.NONE and fit.updates_moving_stats is not None:
        yield Aspect.MOVING_STATS, fit.updates_moving_stats, m.moving_stats
    if fit.trains_weights is None:
        return
    if m.gamma_beta is not Movement.NONE:
        yield Aspect.GAMMA_BETA, fit.trains_weights, m.gamma_beta
    if m.other_weights is not Movement.NONE:
        yield Aspect.WEIGHTS, fit.trains_weights, m.other_weights


def observed(measured: Iterable[LayerMeasurement]) -> dict[str, Observed]:
    """The measurement in the expectation vocabulary's terms (shared with ``check``)."""
    return {
        m.path: Observed(
            path=m.path,
            is_batchnorm=m.is_batchnorm,
            trains_weights=m.trains_weights,
            normalizes_with=m.normalizes_with,
        )
        for m in measured
    }


def _judge(
    expectation: Expectation, measured: Sequence[LayerMeasurement], prediction: Report | None
) -> tuple[Failure, ...]:
    from bnfreeze.model.records import LayerKind, LayerRecord

    seen = observed(measured)
    records: list[LayerRecord] = [s.layer for s in prediction.layers] if prediction else []
    known = {r.path for r in records}
    # Layers Keras showed but the file does not list (a BN inside a custom layer) count too.
    for m in measured:
        if m.path not in known:
            records.append(
                LayerRecord(
                    path=m.path,
                    name=m.path.rsplit("/", 1)[-1],
                    class_name=m.class_name,
                    kind=LayerKind.BATCHNORM if m.is_batchnorm else LayerKind.LAYER,
                    depth=m.path.count("/"),
                    parent=m.path.rsplit("/", 1)[0] if "/" in m.path else None,
                    trainable=None,
                )
            )
    return evaluate(expectation, records, seen)


def _check_scopes(expectations: Sequence[Expectation], prediction: Report) -> None:
    layers = [s.layer for s in prediction.layers]
    for expectation in expectations:
        if expectation.scope is not None:
            expectation.scope.paths(layers)  # raises when the glob matches nothing


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
            path, unsafe=unsafe, custom_objects=custom_objects, compile=True, runtime=runtime
        ), None
    except UnsafeModelError:
        raise
    except BnfreezeError as first:
        try:
            model = loading.load_model(
                path, unsafe=unsafe, custom_objects=custom_objects, compile=False, runtime=runtime
            )
        except BnfreezeError:
            raise first from None
        return model, f"loading with its compile config failed ({first})"


# --------------------------------------------------------------------------- data


@dataclass
class _Batches:
    xs: list[Any]  # one input structure per step
    ys_for: Callable[[str], list[Any]]  # targets per step, for a target kind policy
    input_shapes: tuple[tuple[int, ...], ...]
    notes: list[str]
    given_ys: list[Any] | None


def _read_npz(data: str | os.PathLike[str]) -> dict[str, Any]:
    import numpy as np

    p = Path(data)
    if not p.is_file():
        raise DataError(f"--data {p}: no such file.")
    try:
        with np.load(p, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise DataError(
            f"--data {p}: not a readable .npz archive ({type(exc).__name__}: {exc}).",
            hint="Save inputs with numpy.savez(path, x=inputs, y=targets).",
        ) from None
    if not arrays:
        raise DataError(f"--data {p}: the archive holds no arrays.")
    return arrays


def _input_specs(
    model: Any, file_config: Any = None
) -> list[tuple[str, tuple[int | None, ...], str]]:
    try:
        tensors = list(model.inputs or [])
    except Exception:
        tensors = []
    if not tensors:
        built = _built_shapes(file_config)
        if built:
            return [(f"input_{i}", shape, "float32") for i, shape in enumerate(built)]
        raise DataError(
            "the model does not declare its inputs (a subclassed model?), so bnfreeze cannot "
            "build a batch for it.",
            hint="Pass one with --data FILE.npz (arrays x, and optionally y).",
        )
    specs = []
    for index, t in enumerate(tensors):
        name = getattr(t, "name", None) or f"input_{index}"
        shape = tuple(None if d is None else int(d) for d in tuple(t.shape)[1:])
        specs.append((str(name).split(":")[0], shape, _dtype_name(t.dtype)))
    return specs


def _built_shapes(file_config: Any) -> list[tuple[int | None, ...]]:
    """A subclassed model declares no inputs, but its saved ``build_config`` records the
    shape it was built with: ``[1, 3]``, or a list of shapes for several inputs."""
    build = file_config.get("build_config") if isinstance(file_config, dict) else None
    shape = build.get("input_shape") if isinstance(build, dict) else None

    def one(value: Any) -> tuple[int | None, ...] | None:
        if (
            isinstance(value, list)
            and value
            and all(d is None or isinstance(d, int) for d in value)
        ):
            return tuple(value[1:])
        return None

    if one(shape) is not None:
        return [one(shape)]  # type: ignore[list-item]
    if isinstance(shape, list) and shape and all(one(s) is not None for s in shape):
        return [one(s) for s in shape]  # type: ignore[misc]
    return []


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", dtype)
    return str(name)


def _structure(model: Any, arrays: list[Any]) -> Any:
    """Arrays in the structure the model was built with: one array, a list or a dict."""
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict):
        return dict(zip(struct.keys(), arrays, strict=True))
    return arrays[0] if len(arrays) == 1 else list(arrays)


def _pick(arrays: Mapping[str, Any], prefix: str, names: Sequence[str]) -> list[Any] | None:
    """``x`` (one tensor), ``x0``, ``x1``... or the model's tensor names, else None."""
    if len(names) == 1 and prefix in arrays:
        return [arrays[prefix]]
    numbered = [f"{prefix}{i}" for i in range(len(names))]
    if all(k in arrays for k in numbered):
        return [arrays[k] for k in numbered]
    if all(n in arrays for n in names):
        return [arrays[n] for n in names]
    return None


def _batches(
    keras: Any,
    model: Any,
    arrays: Mapping[str, Any] | None,
    data: Any,
    steps: int,
    batch_size: int,
    seed: int,
    file_config: Any = None,
) -> _Batches:
    import numpy as np

    specs = _input_specs(model, file_config)
    names = [n for n, _, _ in specs]
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    given_ys: list[Any] | None = None
    if arrays is not None:
        inputs = _pick(arrays, "x", names)
        if inputs is None:
            wanted = "x" if len(names) == 1 else f"x0..x{len(names) - 1} or {', '.join(names)}"
            raise DataError(
                f"--data {data}: no inputs found; it holds {', '.join(sorted(arrays))}, "
                f"the model needs {wanted}."
            )
        inputs = [_check_array(a, spec, data) for a, spec in zip(inputs, specs, strict=True)]
        count = min(len(a) for a in inputs)
        if count == 0:
            raise DataError(f"--data {data}: the inputs hold no samples.")
        rows = [np.arange(i * batch_size, (i + 1) * batch_size) % count for i in range(steps)]
        xs = [_structure(model, [a[r] for a in inputs]) for r in rows]
        output_names = _output_names(model)
        targets = _pick(arrays, "y", output_names)
        if targets is not None:
            given_ys = [[t[r] for t in targets] for r in rows]
    else:
        xs = []
        for _ in range(steps):
            xs.append(_structure(model, [_synthetic(rng, spec, batch_size) for spec in specs]))
        if any(d is None for _, shape, _ in specs for d in shape):
            notes.append(f"input dimensions the model leaves open were set to {OPEN_DIMENSION}.")
    first = xs[0]
    flat = (
        list(first.values())
        if isinstance(first, dict)
        else (first if isinstance(first, list) else [first])
    )
    input_shapes = tuple(tuple(int(d) for d in a.shape) for a in flat)
    target_rng = np.random.default_rng(seed + 1)
    cache: dict[str, list[Any]] = {}

    def ys_for(policy: str) -> list[Any]:
        if policy not in cache:
            shapes = _output_shapes(model, first)
            kinds = (
                _target_kinds(model, len(shapes)) if policy == "model" else ["real"] * len(shapes)
            )
            cache[policy] = [
                _pack(
                    model,
                    [
                        _target(target_rng, kind, shape)
                        for kind, shape in zip(kinds, shapes, strict=True)
                    ],
                )
                for _ in range(steps)
            ]
        return cache[policy]

    return _Batches(xs, ys_for, input_shapes, notes, given_ys)


def _check_array(array: Any, spec: tuple[str, tuple[int | None, ...], str], data: Any) -> Any:
    import numpy as np

    name, shape, dtype = spec
    if array.ndim != len(shape) + 1 or any(
        want is not None and got != want for got, want in zip(array.shape[1:], shape, strict=False)
    ):
        expected = "(N, " + ", ".join("?" if d is None else str(d) for d in shape) + ")"
        raise DataError(
            f"--data {data}: input {name!r} has shape {tuple(array.shape)}, the model expects "
            f"{expected}."
        )
    try:
        return np.asarray(array).astype(dtype if dtype != "string" else object)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"--data {data}: input {name!r} cannot be cast to {dtype} ({exc})."
        ) from None


def _synthetic(rng: Any, spec: tuple[str, tuple[int | None, ...], str], batch: int) -> Any:
    name, shape, dtype = spec
    full = (batch, *(OPEN_DIMENSION if d is None else d for d in shape))
    if "int" in dtype:
        return rng.integers(0, 2, size=full).astype(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, size=full).astype(bool)
    if "float" not in dtype:
        raise DataError(
            f"input {name!r} has dtype {dtype}; bnfreeze can only make up numeric inputs.",
            hint="Pass real inputs with --data FILE.npz.",
        )
    return (rng.standard_normal(full) * SYNTHETIC_STD + SYNTHETIC_MEAN).astype(dtype)


def _output_names(model: Any) -> list[str]:
    names = getattr(model, "output_names", None)
    if names:
        return [str(n) for n in names]
    return [f"output_{i}" for i in range(len(model.outputs))]


def _output_shapes(model: Any, x: Any) -> list[tuple[int, ...]]:
    batch = _batch_of(x)
    try:
        tensors = list(model.outputs or [])
    except Exception:
        tensors = []
    shapes = [tuple(t.shape)[1:] for t in tensors]
    if tensors and all(d is not None for s in shapes for d in s):
        return [(batch, *(int(d) for d in s)) for s in shapes]
    # Open output dimensions: ask the model (inference mode: nothing is updated).
    import numpy as np

    out = model(x, training=False)
    flat = (
        list(out.values())
        if isinstance(out, dict)
        else (list(out) if isinstance(out, list | tuple) else [out])
    )
    return [tuple(int(d) for d in np.shape(o)) for o in flat]


def _batch_of(x: Any) -> int:
    if isinstance(x, dict):
        x = next(iter(x.values()))
    elif isinstance(x, list):
        x = x[0]
    return int(x.shape[0])


def _pack(model: Any, arrays: list[Any]) -> Any:
    struct = getattr(model, "_outputs_struct", None)
    if isinstance(struct, dict):
        return dict(zip(struct.keys(), arrays, strict=True))
    return arrays[0] if len(arrays) == 1 else list(arrays)


def _loss_name(loss: Any) -> str:
    if loss is None:
        return "none"
    if isinstance(loss, str):
        return loss
    if isinstance(loss, dict):
        return "{" + ", ".join(f"{k}: {_loss_name(v)}" for k, v in loss.items()) + "}"
    if isinstance(loss, list | tuple):
        return "[" + ", ".join(_loss_name(v) for v in loss) + "]"
    name = getattr(loss, "name", None) or getattr(loss, "__name__", None)
    return str(name or type(loss).__name__)


def _target_kinds(model: Any, count: int) -> list[str]:
    """For each output, the kind of target its compiled loss wants."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        losses = [loss.get(n) for n in _output_names(model)]
    elif isinstance(loss, list | tuple):
        losses = list(loss)
    else:
        losses = [loss] * count
    losses = (losses + [None] * count)[:count]
    return [_kind_of(_loss_name(item)) for item in losses]


def _kind_of(name: str) -> str:
    key = name.lower().replace("_", "")
    if "sparsecategorical" in key:
        return "sparse"
    if "categorical" in key or "kld" in key or "kullback" in key:
        return "one-hot"
    if "binary" in key or "hinge" in key or "poisson" in key:
        return "binary"
    return "real"


def _target(rng: Any, kind: str, shape: tuple[int, ...]) -> Any:
    import numpy as np

    if kind == "sparse":
        classes = max(shape[-1], 1) if len(shape) > 1 else 2
        return rng.integers(0, classes, size=shape[:-1] if len(shape) > 1 else shape)
    if kind == "one-hot":
        classes = shape[-1]
        labels = rng.integers(0, classes, size=shape[:-1])
        return np.eye(classes, dtype="float32")[labels]
    if kind == "binary":
        return rng.integers(0, 2, size=shape).astype("float32")
    return rng.standard_normal(shape).astype("float32")


# --------------------------------------------------------------------------- measuring


def layer_children(keras: Any, layer: Any) -> list[Any]:
    """The layers bnfreeze's walk descends into: a nested model's layers, a wrapper's inner
    layer(s) (``Bidirectional.forward_layer``/``backward_layer``, else ``.layer``)."""
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    children = [
        inner
        for attr in ("forward_layer", "backward_layer")
        if isinstance(inner := getattr(layer, attr, None), keras.layers.Layer)
    ]
    if not children and isinstance(inner := getattr(layer, "layer", None), keras.layers.Layer):
        children.append(inner)
    return children


def layer_paths(keras: Any, model: Any) -> dict[str, tuple[Any, bool]]:
    """Every layer below ``model`` by path (names joined by "/"), in model order, with
    whether the file's layer list shows it. BN layers hidden inside a custom layer's Python
    code get a path below that layer and ``False``."""
    out: dict[str, tuple[Any, bool]] = {}

    def visit(layer: Any, prefix: str) -> None:
        for child in layer_children(keras, layer):
            path = prefix + child.name
            out.setdefault(path, (child, True))
            if layer_children(keras, child):
                visit(child, path + "/")
            elif not isinstance(child, keras.layers.BatchNormalization):
                for inner in _hidden_batchnorm(keras, child):
                    out.setdefault(f"{path}/{inner.name}", (inner, False))

    visit(model, "")
    return out


def _hidden_batchnorm(keras: Any, layer: Any) -> list[Any]:
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return []
    try:
        inner = list(flatten(include_self=False, recursive=True))
    except TypeError:
        return []
    return [sub for sub in inner if isinstance(sub, keras.layers.BatchNormalization)]


def _own_variables(layers: dict[str, tuple[Any, bool]]) -> dict[str, list[Any]]:
    """Each layer's variables less those of the layers listed below it (by identity)."""
    owned: dict[str, list[Any]] = {}
    for path, (layer, _) in layers.items():
        prefix = path + "/"
        below = {
            id(v)
            for other, (sub, _) in layers.items()
            if other.startswith(prefix)
            for v in sub.weights
        }
        seen: set[int] = set()
        own = []
        for v in layer.weights:
            if id(v) not in below and id(v) not in seen:
                seen.add(id(v))
                own.append(v)
        owned[path] = own
    return owned


def _is_builtin(layer: Any) -> bool:
    module = type(layer).__module__ or ""
    return module.split(".")[0] in ("keras", "tf_keras", "tensorflow")


def _compile_default(keras: Any, model: Any) -> None:
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=DEFAULT_LEARNING_RATE),
        loss="mse",
        run_eagerly=True,
        jit_compile=False,
    )


def _optimizer_name(model: Any) -> str:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return "none"
    name = type(optimizer).__name__
    try:
        rate = float(optimizer.learning_rate)
        return f"{name}(learning_rate={rate:g})"
    except Exception:
        return name


def _measure(
    keras: Any,
    model: Any,
    batches: _Batches,
    steps: int,
    batch_size: int,
    load_reason: str | None,
) -> tuple[list[LayerMeasurement], TrainingSetup]:
    import numpy as np

    layers = layer_paths(keras, model)
    owned = _own_variables(layers)
    every = {id(v): v for vs in owned.values() for v in vs}

    if loading.is_compiled(model) and getattr(model, "optimizer", None) is not None:
        source, reason = CompileSource.MODEL, None
        model.run_eagerly = True
        model.jit_compile = False
    else:
        source = CompileSource.DEFAULT if load_reason is None else CompileSource.FALLBACK
        reason = load_reason
        _compile_default(keras, model)

    def run(policy: str) -> tuple[dict[int, Any], dict[int, Any], set[int]]:
        ys = batches.given_ys if batches.given_ys is not None else batches.ys_for(policy)
        if batches.given_ys is not None:
            ys = [_pack(model, y) for y in ys]
        trained = {id(v) for v in model.trainable_variables}
        before = {k: np.array(v.numpy(), copy=True) for k, v in every.items()}
        for x, y in zip(batches.xs, ys, strict=True):
            model.train_on_batch(x, y)
        after = {k: np.asarray(v.numpy()) for k, v in every.items()}
        return before, after, trained

    try:
        before, after, trained = run("model" if source is CompileSource.MODEL else "real")
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        if source is not CompileSource.MODEL:
            raise DataError(
                f"a training step failed: {type(exc).__name__}: {loading._one_line(exc)}",
                hint="Pass real data with --data FILE.npz.",
            ) from None
        reason = (
            f"training with its compile config ({_loss_name(model.loss)}) failed on "
            f"{'the given' if batches.given_ys is not None else 'synthetic'} data: "
            f"{type(exc).__name__}: {loading._one_line(exc, 160)}"
        )
        source = CompileSource.FALLBACK
        _compile_default(keras, model)
        try:
            before, after, trained = run("real")
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc2:
            raise DataError(
                f"a training step failed: {type(exc2).__name__}: {loading._one_line(exc2)}",
                hint="Pass real data with --data FILE.npz.",
            ) from None

    def movement(variables: list[Any]) -> Movement:
        if not variables:
            return Movement.NONE
        if any(not np.array_equal(before[id(v)], after[id(v)]) for v in variables):
            return Movement.MOVED
        if any(id(v) in trained for v in variables):
            return Movement.ZERO_UPDATE
        return Movement.UNCHANGED

    measured: list[LayerMeasurement] = []
    for path, (layer, in_file) in layers.items():
        own = owned[path]
        if layer_children(keras, layer) and not own:
            continue  # a container: its layers are measured one by one
        if isinstance(layer, keras.layers.BatchNormalization):
            stats = [v for v in (layer.moving_mean, layer.moving_variance) if v is not None]
            gamma_beta = [v for v in (layer.gamma, layer.beta) if v is not None]
            special = {id(v) for v in stats + gamma_beta}
            other = [v for v in own if id(v) not in special]
            measured.append(
                LayerMeasurement(
                    path=path,
                    class_name=type(layer).__name__,
                    is_batchnorm=True,
                    builtin=_is_builtin(layer),
                    in_file=in_file,
                    moving_stats=movement(stats),
                    gamma_beta=movement(gamma_beta),
                    other_weights=movement(other),
                )
            )
        elif own:
            measured.append(
                LayerMeasurement(
                    path=path,
                    class_name=type(layer).__name__,
                    is_batchnorm=False,
                    builtin=_is_builtin(layer),
                    in_file=in_file,
                    moving_stats=Movement.NONE,
                    gamma_beta=Movement.NONE,
                    other_weights=movement(own),
                )
            )
    setup = TrainingSetup(
        compile_source=source,
        optimizer=_optimizer_name(model),
        loss=_loss_name(getattr(model, "loss", None)),
        steps=steps,
        batch_size=batch_size,
        data_source=DataSource.SYNTHETIC,
        data_path=None,
        seed=None,
        input_shapes=batches.input_shapes,
        reason=reason,
    )
    return measured, setup
