"""The seed experiment, live: what ``training`` and ``trainable`` do to one BN layer.

The question that started bnfreeze ("what do the ``trainable`` and ``training`` flags of
batch normalization mean?") was settled by an experiment: feed a small image through a BN
layer with beta 1, gamma 2, moving mean 0 and moving variance 1, for each combination of
the two flags, and print the output and the moving statistics. :func:`explain` runs that
experiment on the installed Keras and returns the measured numbers; nothing in the result is
written down in advance. The starting values are parameters, so a test can change them and
watch the numbers follow.

Keras's rule, which the table shows (the ``BatchNormalization`` docstring, "About setting
``layer.trainable = False`` on a ``BatchNormalization`` layer"): "setting ``trainable =
False`` on the layer means that the layer will be subsequently run in inference mode (meaning
that it will use the moving mean and the moving variance to normalize the current batch,
rather than using the mean and variance of the current batch)."
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnfreeze.model.measured import RuntimeInfo
from bnfreeze.model.records import Normalization, Runtime
from bnfreeze.runtime import environment
from bnfreeze.runtime.branches import BranchRecorder
from bnfreeze.runtime.environment import ProgressFn, no_progress

#: The seed's image: one 2x2 picture with 4 channels of whole numbers 0-9.
IMAGE_SHAPE = (1, 2, 2, 4)
IMAGE_SEED = 0
#: Keras's defaults for BatchNormalization.
MOMENTUM = 0.99
EPSILON = 1e-3
#: How close a measured output must be to a formula to say which statistics produced it.
_ATOL = 1e-4

#: The four combinations, in the order the table shows them.
COMBINATIONS = ((False, False), (False, True), (True, False), (True, True))

HISTORICAL_NOTE = (
    "Historical, not measured here: on TF1 / Keras 1, trainable=False only froze gamma and "
    "beta; it did not switch BN to inference mode, so training=True with trainable=False "
    "still normalized with the batch's statistics. TensorFlow 2.0 changed that (Keras's "
    'docstring: "This behavior only occurs as of TensorFlow 2.0. In 1.*, setting '
    "layer.trainable = False would freeze the layer but would not switch it to inference "
    'mode.").'
)

#: Rules 1-4 of docs/semantics.md in a few lines, per runtime, numbered as there. Measured on
#: Keras 3.15.1 / TF 2.21, Keras 3.15.1 / JAX 0.10 and tf_keras 2.21 (the tests re-measure
#: them: tests/runtime/test_backends.py, tests/model/test_modes_*.py); ``explain`` says so when the
#: installed versions differ.
RULES_MEASURED_ON = "Keras 3.15.1 on TensorFlow 2.21"
JAX_RULES_MEASURED_ON = "Keras 3.15.1 on JAX 0.10 (rules 2-3 on TensorFlow 2.21)"
TF_KERAS_RULES_MEASURED_ON = "tf_keras 2.21"
RULES: dict[str, tuple[str, ...]] = {
    "keras3": (
        "1. A BN layer normalizes with batch statistics and updates its moving statistics only "
        "when its own trainable is True and its resolved training is True (the table above).",
        "2. fit() resolves training=True, predict()/evaluate() training=False. A call-site "
        "training=False recorded in a Functional or Sequential graph is overridden in fit() "
        "(keras-team/keras#20285): base(x, training=False) does not keep BN in inference once "
        "base.trainable=True. Only trainable=False on every BN layer does "
        "(bnfreeze freeze --bn-inference).",
        "3. trainable is per variable: container.trainable=X sets X on every layer below it when "
        "assigned, and the last assignment that reached a layer wins. A trainable BN inside a "
        "frozen sub-model still trains.",
        "4. A flag changed after compile() counts until the first fit(); after fit() it is "
        "silently ignored until compile() runs again. After changing any flag, call compile() "
        "again with a new optimizer.",
    ),
    "keras3-jax": (),  # filled below: rules 1-3 as keras3, rule 4 differs
    "tf-keras": (
        "1. A BN layer normalizes with batch statistics and updates its moving statistics only "
        "when its own trainable is True and its resolved training is True (the table above).",
        "2. fit() resolves training=True, predict()/evaluate() training=False, but a call-site "
        "training=False recorded in the graph wins, in fit() and predict().",
        "3. trainable is hierarchical: any frozen ancestor freezes gamma/beta, although the "
        "moving statistics of a BN whose own flag is True still move. load_model drops the own "
        "flag of every Functional and Sequential model (a wrapper keeps its), so in a loaded "
        "file only the layers' and wrappers' own flags count.",
        "4. A flag changed after compile() is ignored until compile() runs again. After changing "
        "any flag, call compile() again with a new optimizer.",
    ),
}
RULES["keras3-jax"] = (
    *RULES["keras3"][:3],
    "4. A flag changed after compile() counts until the first fit(); after fit() the next fit() "
    "raises, and the model cannot train after that. After changing any flag, call compile() "
    "again with a new optimizer.",
)


@dataclass(frozen=True)
class ExplainSetup:
    """The starting point of every case: the image and the BN layer's initial values."""

    image: tuple[float, ...]  # flattened, IMAGE_SHAPE
    gamma: tuple[float, ...]  # one value per channel
    beta: tuple[float, ...]
    moving_mean: tuple[float, ...]
    moving_variance: tuple[float, ...]
    momentum: float
    epsilon: float
    seed: int | None  # None when the caller gave the image

    @property
    def shape(self) -> tuple[int, ...]:
        return IMAGE_SHAPE

    @property
    def first_pixel(self) -> tuple[float, ...]:
        return self.image[: IMAGE_SHAPE[-1]]


@dataclass(frozen=True)
class Case:
    """One combination of ``training`` and ``trainable``, measured."""

    training: bool
    trainable: bool
    output: tuple[float, ...]  # flattened, IMAGE_SHAPE
    moving_mean: tuple[float, ...]  # after the call
    moving_variance: tuple[float, ...]
    stats_updated: bool
    #: The branch the layer's call took (recorded by bnfreeze.runtime.branches), or, when it
    #: could not be recorded, the statistics the output matches.
    normalizes_with: Normalization | None
    meaning: str
    branch: Normalization | None = None  # recorded from the call; None: not recorded
    #: Which formula the output matches; None: neither alone (or both: batch == moving stats).
    output_matches: Normalization | None = None

    @property
    def first_row(self) -> tuple[float, ...]:
        """The output at the first pixel, all channels: ``output[0, 0, 0, :]``."""
        return self.output[: IMAGE_SHAPE[-1]]


@dataclass(frozen=True)
class ExplainReport:
    setup: ExplainSetup
    cases: tuple[Case, ...]
    runtime: RuntimeInfo
    rules: tuple[str, ...]
    rules_note: str
    historical_note: str


def _per_channel(value: float | Sequence[float], name: str) -> tuple[float, ...]:
    channels = IMAGE_SHAPE[-1]
    if isinstance(value, int | float):
        return (float(value),) * channels
    values = tuple(float(v) for v in value)
    if len(values) != channels:
        from bnfreeze.errors import BnfreezeError

        raise BnfreezeError(f"{name} needs {channels} values, one per channel; got {len(values)}.")
    return values


def explain(
    *,
    image: Any = None,
    seed: int = IMAGE_SEED,
    gamma: float | Sequence[float] = 2.0,
    beta: float | Sequence[float] = 1.0,
    moving_mean: float | Sequence[float] = 0.0,
    moving_variance: float | Sequence[float] = 1.0,
    momentum: float = MOMENTUM,
    epsilon: float = EPSILON,
    runtime: Runtime = Runtime.KERAS3,
    progress: ProgressFn = no_progress,
) -> ExplainReport:
    """Run one BN layer on the seed's image for each combination of the two flags.

    ``image`` defaults to whole numbers 0-9 drawn with ``seed``, shape (1, 2, 2, 4). Each
    case builds a fresh ``BatchNormalization(momentum, epsilon)``, sets gamma, beta and the
    moving statistics, sets ``layer.trainable``, calls ``layer(image, training=...)`` once,
    and reads the output and the moving statistics back.
    """
    pixels, used_seed = _image(image, seed)
    setup = ExplainSetup(
        image=tuple(float(v) for v in pixels.ravel()),
        gamma=_per_channel(gamma, "gamma"),
        beta=_per_channel(beta, "beta"),
        moving_mean=_per_channel(moving_mean, "moving_mean"),
        moving_variance=_per_channel(moving_variance, "moving_variance"),
        momentum=float(momentum),
        epsilon=float(epsilon),
        seed=used_seed,
    )
    environment.require_runtime(runtime)
    with environment.quiet():
        progress(environment.loading_message(runtime))
        keras = environment.keras_module(runtime)
        info = environment.runtime_info(runtime)
        progress("running the four cases")
        with environment.keras_warnings():
            cases = tuple(
                _run_case(keras, setup, pixels, training, trainable)
                for training, trainable in COMBINATIONS
            )
    key = (
        "tf-keras"
        if runtime is Runtime.TF_KERAS
        else ("keras3-jax" if info.backend == "jax" else "keras3")
    )
    return ExplainReport(
        setup=setup,
        cases=cases,
        runtime=info,
        rules=RULES[key],
        rules_note=_rules_note(info),
        historical_note=HISTORICAL_NOTE,
    )


def _image(image: Any, seed: int) -> tuple[Any, int | None]:
    """The image the cases run on, and the seed it was drawn with (None: given)."""
    import numpy as np

    if image is None:
        rng = np.random.default_rng(seed)
        return rng.integers(0, 10, size=IMAGE_SHAPE).astype("float32"), seed
    return np.asarray(image, dtype="float32").reshape(IMAGE_SHAPE), None


def _rules_note(info: RuntimeInfo) -> str:
    if info.runtime is Runtime.TF_KERAS:
        where = TF_KERAS_RULES_MEASURED_ON
    else:
        where = JAX_RULES_MEASURED_ON if info.backend == "jax" else RULES_MEASURED_ON
    note = (
        f"The rules were measured on {where}, and bnfreeze's tests measure them again "
        "(bnfreeze's docs/semantics.md lists the tests); the table is measured now."
    )
    if info.runtime is Runtime.KERAS3 and not info.keras_version.startswith("3.15."):
        note += (
            f" You run Keras {info.keras_version}: run bnfreeze verify on your model to measure "
            "rules 2-3 there."
        )
    return note


def _run_case(
    keras: Any, setup: ExplainSetup, pixels: Any, training: bool, trainable: bool
) -> Case:
    import numpy as np

    layer = keras.layers.BatchNormalization(momentum=setup.momentum, epsilon=setup.epsilon)
    layer.build(IMAGE_SHAPE)
    layer.gamma.assign(np.asarray(setup.gamma, dtype="float32"))
    layer.beta.assign(np.asarray(setup.beta, dtype="float32"))
    layer.moving_mean.assign(np.asarray(setup.moving_mean, dtype="float32"))
    layer.moving_variance.assign(np.asarray(setup.moving_variance, dtype="float32"))
    layer.trainable = trainable
    # convert_to_numpy, not np.asarray or .numpy(): on the torch backend the output is a
    # tensor that requires grad, which torch refuses to turn into an array directly.
    recorder = BranchRecorder({"bn": layer})
    with recorder.active():
        output = _to_numpy(keras, layer(pixels, training=training))
    branch = recorder.branches()["bn"].normalizes_with
    mean_after = _to_numpy(keras, layer.moving_mean)
    var_after = _to_numpy(keras, layer.moving_variance)
    updated = not (
        np.array_equal(mean_after, np.asarray(setup.moving_mean, dtype="float32"))
        and np.array_equal(var_after, np.asarray(setup.moving_variance, dtype="float32"))
    )
    formula = _which_statistics(setup, pixels, output)
    # The branch the call took is the measurement; the output formula says the same whenever
    # the batch's statistics differ from the moving ones (it cannot tell them apart otherwise).
    mode = branch if branch is not None else formula
    return Case(
        training=training,
        trainable=trainable,
        output=tuple(float(v) for v in output.ravel()),
        moving_mean=tuple(float(v) for v in mean_after),
        moving_variance=tuple(float(v) for v in var_after),
        stats_updated=updated,
        normalizes_with=mode,
        meaning=meaning(training, trainable, mode, updated, setup.momentum),
        branch=branch,
        output_matches=formula,
    )


def _to_numpy(keras: Any, value: Any) -> Any:
    """A tensor or variable of any backend as a float64 array (Keras 3's
    ``keras.ops.convert_to_numpy``; tf_keras has no ``keras.ops`` and takes ``np.asarray``)."""
    import numpy as np

    convert = getattr(getattr(keras, "ops", None), "convert_to_numpy", None)
    return np.asarray(convert(value) if convert is not None else value, dtype="float64")


def _which_statistics(setup: ExplainSetup, pixels: Any, output: Any) -> Normalization | None:
    """Which statistics the measured output was normalized with: it is compared with
    ``gamma * (x - mean) / sqrt(var + epsilon) + beta`` for the moving and for the batch
    statistics. None when it matches neither, or both (a batch equal to the moving stats)."""
    import numpy as np

    x = pixels.astype("float64")
    gamma = np.asarray(setup.gamma)
    beta = np.asarray(setup.beta)

    def normalized(mean: Any, var: Any) -> Any:
        return gamma * (x - mean) / np.sqrt(var + setup.epsilon) + beta

    axes = tuple(range(x.ndim - 1))
    moving = np.allclose(
        output,
        normalized(np.asarray(setup.moving_mean), np.asarray(setup.moving_variance)),
        atol=_ATOL,
    )
    batch = np.allclose(output, normalized(x.mean(axis=axes), x.var(axis=axes)), atol=_ATOL)
    if moving == batch:
        return None
    return Normalization.MOVING if moving else Normalization.BATCH


def meaning(
    training: bool, trainable: bool, mode: Normalization | None, updated: bool, momentum: float
) -> str:
    """One short line saying what a measured case means."""
    if mode is Normalization.MOVING and not updated:
        if training and not trainable:
            return "inference mode: trainable=False overrides training=True"
        return "inference mode: nothing changes"
    if mode is Normalization.BATCH and updated:
        return f"training mode: moving statistics move toward the batch's (momentum {momentum:g})"
    if mode is Normalization.BATCH and momentum == 1.0:
        return "training mode: batch statistics; momentum 1 keeps the moving statistics still"
    if mode is Normalization.BATCH:
        return "batch statistics, moving statistics frozen (the TF1 behaviour)"
    if mode is Normalization.MOVING:
        return "moving statistics used, yet they changed"
    return "the output matches neither the moving nor the batch statistics alone"
