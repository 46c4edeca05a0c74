"""The values a ``verify`` run produces: what moved per layer (:class:`LayerMeasurement`),
how the steps were set up (:class:`TrainingSetup`), and the verdict (:class:`VerifyReport`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bnfreeze.model.expectations import Expectation, Failure
from bnfreeze.model.records import Normalization, Report, Runtime

#: The package each Keras backend imports, and how a person names it.
BACKEND_PACKAGES = {
    "tensorflow": ("tensorflow", "TensorFlow"),
    "jax": ("jax", "JAX"),
    "torch": ("torch", "PyTorch"),
    "numpy": ("numpy", "NumPy"),
    "openvino": ("openvino", "OpenVINO"),
}


@dataclass(frozen=True)
class RuntimeInfo:
    """Which Keras ran a measurement: shown by ``verify`` and ``explain``."""

    runtime: Runtime
    keras_version: str
    backend: str
    tensorflow_version: str | None  # when TensorFlow is imported, whatever the backend
    backend_version: str | None = None  # the backend package's version (JAX 0.10.2, ...)

    @property
    def label(self) -> str:
        """E.g. ``Keras 3.15.1, backend tensorflow (TensorFlow 2.21.0)`` or
        ``Keras 3.15.1, backend jax (JAX 0.10.2)``: the backend that ran, with its version."""
        text = f"Keras {self.keras_version}, backend {self.backend}"
        if self.backend == "tensorflow" and self.tensorflow_version:
            text += f" (TensorFlow {self.tensorflow_version})"
        elif self.backend_version:
            label = BACKEND_PACKAGES.get(self.backend, (self.backend, self.backend))[1]
            text += f" ({label} {self.backend_version})"
        if self.runtime is Runtime.TF_KERAS:
            text = f"tf_keras: {text}"
        return text


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
    #: The branch a built-in BN took: batch statistics (training mode) or moving (inference).
    BRANCH = "branch"
    GAMMA_BETA = "gamma-beta"
    WEIGHTS = "weights"

    @property
    def words(self) -> str:
        return {
            Aspect.MOVING_STATS: "its moving statistics",
            Aspect.BRANCH: "it",
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
    #: Whether inspect lists the layer (from the config, or from the weights of a code-built
    #: container). The measurement marks what the live model's layer lists show;
    #: :func:`bnfreeze.runtime.compare.compare` sets it from the prediction.
    in_file: bool
    moving_stats: Movement
    gamma_beta: Movement
    other_weights: Movement
    #: The branch a built-in BN's ``call`` took in the steps, recorded by
    #: :class:`bnfreeze.runtime.branches.BranchRecorder`; None when no call was recorded.
    branch: Normalization | None = None
    #: A built-in BN: whether its ``call`` ran in the steps (False: the model holds it but
    #: never calls it in ``fit()``, such as an FPN output norm whose output no loss reads
    #: ... or a ResNet ``post_bn`` a task does not use); None when calls were not recorded.
    called: bool | None = None

    @property
    def not_called(self) -> bool:
        return self.is_batchnorm and self.called is False

    @property
    def mode_measured(self) -> bool:
        if not (self.is_batchnorm and self.builtin) or self.not_called:
            return False
        return self.branch is not None or self.moving_stats is not Movement.NONE

    @property
    def normalizes_with(self) -> Normalization | None:
        """The statistics a built-in BN normalized with in ``fit()``: the branch its call
        took. Only when no call could be recorded (tf_keras resolving ``training`` from the
        learning phase) is it read off the moving statistics, which move exactly in the batch
        branch unless ``momentum`` is 1. None when not measured."""
        if not self.mode_measured:
            return None
        if self.branch is not None:
            return self.branch
        return Normalization.BATCH if self.moving_stats.changed else Normalization.MOVING

    @property
    def stats_moved(self) -> bool | None:
        """Whether the moving statistics changed: a fact of its own, not the mode (with
        ``momentum=1.0`` the batch branch leaves them bit-identical). None: no statistics."""
        if self.moving_stats is Movement.NONE:
            return None
        return self.moving_stats.changed

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
    predicted: bool  # predicted to move / train / take the batch branch
    measured: Movement | Normalization  # a Normalization for Aspect.BRANCH

    @property
    def message(self) -> str:
        what = self.aspect.words
        if self.aspect is Aspect.BRANCH:
            said = "normalizes with batch statistics" if self.predicted else "runs in inference"
            did = (
                "took the batch branch (training mode)"
                if self.measured is Normalization.BATCH
                else "took the inference branch (moving statistics)"
            )
            return f"{self.path}: inspect predicted it {said} in fit(), but it {did}."
        if self.aspect is Aspect.MOVING_STATS:
            said = "move" if self.predicted else "stay unchanged"
            moved = isinstance(self.measured, Movement) and self.measured.changed
            did = "moved" if moved else "stayed unchanged"
        else:
            said = "train" if self.predicted else "stay frozen"
            words: dict[Movement | Normalization, str] = {
                Movement.MOVED: "moved",
                Movement.ZERO_UPDATE: "were trained (with a zero update)",
                Movement.UNCHANGED: "stayed frozen",
            }
            did = words.get(self.measured, str(self.measured.value))
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
    not_in_file: tuple[str, ...]  # measured layers inspect does not list
    not_measured: tuple[str, ...]  # layers the file says hold weights, not found in Keras
    expectations: tuple[tuple[Expectation, tuple[Failure, ...]], ...]
    notes: tuple[str, ...]  # Keras's own warnings, and how the run was adapted
    #: Measured BN layers no check compared (inspect did not predict them): each is a failed
    #: comparison, never counted as agreement.
    bn_not_compared: tuple[str, ...] = ()
    #: Measured BN layers whose ``call`` never ran in the steps: neither agreement nor
    #: disagreement, whatever inspect predicted for them.
    bn_not_called: tuple[str, ...] = ()

    @property
    def layers_compared(self) -> int:
        """Measured layers on which at least one check ran."""
        return len(self.compared_paths)

    @property
    def compared_paths(self) -> frozenset[str]:
        if self.prediction is None:
            return frozenset()
        predicted = {s.layer.path for s in self.prediction.layers}
        return frozenset(m.path for m in self.layers if m.path in predicted) - frozenset(
            self.bn_not_compared + self.bn_not_called
        )

    @property
    def batchnorm(self) -> tuple[LayerMeasurement, ...]:
        return tuple(m for m in self.layers if m.is_batchnorm)

    @property
    def bn_stats_moved(self) -> int:
        return sum(1 for m in self.batchnorm if m.moving_stats.changed)

    @property
    def agree(self) -> bool:
        """Every measured BN layer was compared, and every check agreed."""
        return not self.disagreements and not self.bn_not_compared

    @property
    def expectations_hold(self) -> bool:
        return all(not failures for _, failures in self.expectations)

    @property
    def exit_code(self) -> int:
        """0 when prediction and measurement agree and every expectation holds, else 1."""
        from bnfreeze.errors import EXIT_CHECK_FAILED, EXIT_OK

        return EXIT_OK if self.agree and self.expectations_hold else EXIT_CHECK_FAILED
