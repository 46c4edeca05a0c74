"""What each BatchNormalization layer normalizes over under data-parallel training.

Under data parallelism a BN layer in training mode normalizes either over the slice of the
batch its replica holds, or over the whole (global) batch. Which one depends on the engine and
on the layer's ``synchronized`` argument, and nothing in Keras says which one a run got. Measured
on Keras 3.15 (docs/semantics.md, rule 8), with the two halves of a batch of 8 having different
means, on 2 simulated devices:

* ``tf.distribute.MirroredStrategy`` (TensorFlow), ``synchronized=False``: each replica
  normalizes over its own slice (4 samples), and the moving statistics after the step are the
  **first replica's** batch statistics, not the global ones nor the replicas' average;
* the same with ``synchronized=True``: every replica normalizes over the global batch (an
  all-reduce of the sums), and the moving statistics are the global batch's;
* ``keras.distribution.DataParallel`` (JAX): the layer sees the global batch (the batch is one
  sharded array) and normalizes over all of it; the moving statistics are the global batch's.
  ``synchronized=True`` is refused on JAX when the layer is made (``ValueError``).

:class:`SampleRecorder` records, while the training step is traced or run, the batch size of
every call of each built-in BN layer and, on TensorFlow, how many replicas were in sync at that
call. :func:`replica_report` turns that into one :class:`BatchNormSamples` per layer: how many
samples it normalized over, whether its statistics were synchronized, and a warning below a
threshold.

The threshold defaults to 16 samples: Wu & He, "Group Normalization" (ECCV 2018), Figure 1,
shows BN's ImageNet error for ResNet-50 rising as the batch per worker falls below
16 (it is nearly flat from 32 to 16). ``min_samples`` changes it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bnfreeze.runtime.instance_calls import distinct_layers, replaced_calls

#: Below this many samples per normalization a training-mode BN gets a warning (Wu & He,
#: "Group Normalization", ECCV 2018: BN's error rises once the batch per worker is below 16).
DEFAULT_MIN_SAMPLES = 16


class Engine(enum.Enum):
    """The data-parallel engine a model trains under."""

    MIRRORED_STRATEGY = "MirroredStrategy"  # tf.distribute.MirroredStrategy
    TF_DISTRIBUTE = "tf.distribute"  # another tf.distribute strategy (TPU, multi-worker, ...)
    DATA_PARALLEL = "DataParallel"  # keras.distribution.DataParallel (JAX)
    KERAS_DISTRIBUTION = "keras.distribution"  # another keras.distribution (ModelParallel)
    NONE = "none"  # one device


class Statistics(enum.Enum):
    """Which samples a training-mode BN layer normalizes over."""

    PER_REPLICA = "per-replica"  # its replica's slice of the batch
    GLOBAL = "global"  # the whole batch, every replica


class MovingStatistics(enum.Enum):
    """What the moving statistics are updated with after a step (docs/semantics.md, rule 8)."""

    GLOBAL = "global"  # the global batch's statistics
    FIRST_REPLICA = "first-replica"  # the first replica's slice's statistics only


@dataclass(frozen=True)
class ReplicaSetup:
    """The engine and the number of replicas the batch is split over."""

    engine: Engine
    replicas: int
    #: The engine's class name as Keras or TensorFlow calls it, e.g. "MirroredStrategy".
    name: str

    @property
    def distributed(self) -> bool:
        return self.replicas > 1


@dataclass(frozen=True)
class BatchNormSamples:
    """One BN layer in the first batch of a data-parallel ``fit()``."""

    path: str
    #: True when it took the batch branch (training mode) in the first batch.
    training: bool
    #: The batch size of each call as the layer saw it (a replica's slice under
    #: tf.distribute, the global batch under keras.distribution); None when it is not static.
    seen: int | None
    #: Samples its batch statistics were computed over (seen x replicas when synchronized).
    samples: int | None
    statistics: Statistics
    synchronized: bool
    moving: MovingStatistics

    def below(self, threshold: int) -> bool:
        return self.training and self.samples is not None and self.samples < threshold


@dataclass(frozen=True)
class ReplicaReport:
    """The engine, the replicas and, per BN layer, what it normalized over."""

    setup: ReplicaSetup
    min_samples: int
    layers: tuple[BatchNormSamples, ...]

    @property
    def small(self) -> tuple[BatchNormSamples, ...]:
        """Training-mode BN layers that normalized over fewer than ``min_samples`` samples,
        under a distribution (on one device the batch size is the one the user chose)."""
        if not self.setup.distributed:
            return ()
        return tuple(b for b in self.layers if b.below(self.min_samples))

    @property
    def problems(self) -> tuple[str, ...]:
        small = self.small
        if not small:
            return ()
        counts = sorted({b.samples for b in small if b.samples is not None})
        shown = ", ".join(b.path for b in small[:3])
        more = f" and {len(small) - 3} more" if len(small) > 3 else ""
        per_replica = any(b.statistics is Statistics.PER_REPLICA for b in small)
        setup = f"{self.setup.name}, {self.setup.replicas} replicas"
        how = (
            f"each replica's slice of the batch ({setup}, not synchronized)"
            if per_replica
            else f"the global batch ({setup})"
        )
        fix = (
            " BatchNormalization(synchronized=True) normalizes over the global batch on "
            "TensorFlow (bnfreeze sync-bn MODEL on)."
            if per_replica and self.setup.engine in (Engine.MIRRORED_STRATEGY, Engine.TF_DISTRIBUTE)
            else ""
        )
        return (
            f"{len(small)} training-mode BatchNormalization layer"
            f"{'s' if len(small) != 1 else ''} normalized over "
            f"{'/'.join(map(str, counts))} samples, fewer than {self.min_samples}: over {how} "
            f"({shown}{more}). Batch statistics of so few samples are noisy (Wu & He, Group "
            "Normalization, 2018): use a larger batch per replica, or keep these layers in "
            "inference mode." + fix,
        )


# --------------------------------------------------------------------------- the engine


def replica_setup(keras: Any, model: Any) -> ReplicaSetup:
    """The engine ``model`` trains under, asked of Keras and TensorFlow themselves."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        if strategy is None:
            import importlib

            strategy = importlib.import_module("tensorflow").distribute.get_strategy()
        name = type(strategy).__name__
        replicas = int(getattr(strategy, "num_replicas_in_sync", 1) or 1)
        if name.startswith("_Default") or name == "OneDeviceStrategy":
            return ReplicaSetup(Engine.NONE, 1, "none")
        engine = Engine.MIRRORED_STRATEGY if name == "MirroredStrategy" else Engine.TF_DISTRIBUTE
        return ReplicaSetup(engine, replicas, name)
    distribution = getattr(keras, "distribution", None)
    current = distribution.distribution() if distribution is not None else None
    if current is None:
        return ReplicaSetup(Engine.NONE, 1, "none")
    name = type(current).__name__
    mesh = getattr(current, "device_mesh", None)
    axis = getattr(current, "batch_dim_name", None)
    replicas = 1
    if mesh is not None:
        shape = dict(zip(mesh.axis_names, mesh.shape, strict=False))
        replicas = int(shape.get(axis, 1)) if axis else 1
    engine = Engine.DATA_PARALLEL if name == "DataParallel" else Engine.KERAS_DISTRIBUTION
    return ReplicaSetup(engine, replicas, name)


# --------------------------------------------------------------------------- the recording


@dataclass(frozen=True)
class Seen:
    """The calls of one BN layer in a step: the batch sizes and the replicas in sync."""

    path: str
    sizes: tuple[int | None, ...] = ()
    in_sync: tuple[int, ...] = ()


def _in_sync() -> int:
    """Replicas in sync at this call (TensorFlow's replica context), 1 outside one."""
    import sys

    tf = sys.modules.get("tensorflow")
    if tf is None:
        return 1
    try:
        context = tf.distribute.get_replica_context()
    except Exception:
        return 1
    return int(getattr(context, "num_replicas_in_sync", 1) or 1) if context is not None else 1


def _batch_size(inputs: Any) -> int | None:
    shape = getattr(inputs, "shape", None)
    try:
        first = shape[0] if shape is not None else None
    except (TypeError, IndexError):
        return None
    try:
        return int(first) if first is not None else None
    except (TypeError, ValueError):
        return None


class SampleRecorder:
    """Record the batch size of each call of each given BN layer while active.

    ``layers`` maps a path to a built-in BatchNormalization layer. Like
    :class:`bnfreeze.runtime.branches.BranchRecorder`, it wraps ``call`` on the instance and
    restores it on exit; symbolic calls (Keras building the model) are skipped. The wrapper
    reads shapes only: the step computes what it computes without it."""

    def __init__(self, layers: Mapping[str, Any]) -> None:
        from bnfreeze.runtime.branches import _symbolic_scope

        self._layers = distinct_layers(layers)
        self._sizes: dict[str, list[int | None]] = {p: [] for p in self._layers}
        self._sync: dict[str, list[int]] = {p: [] for p in self._layers}
        self._symbolic = _symbolic_scope()

    def _wrap(self, path: str, layer: Any) -> Any:
        original = layer.call

        def call(*args: Any, **kwargs: Any) -> Any:
            if not (self._symbolic is not None and self._symbolic()):
                inputs = args[0] if args else kwargs.get("inputs")
                self._sizes[path].append(_batch_size(inputs))
                self._sync[path].append(_in_sync())
            return original(*args, **kwargs)

        return call

    @contextmanager
    def active(self) -> Iterator[SampleRecorder]:
        with replaced_calls(self._layers, self._wrap):
            yield self

    def seen(self) -> dict[str, Seen]:
        return {p: Seen(p, tuple(self._sizes[p]), tuple(self._sync[p])) for p in self._sizes}


# --------------------------------------------------------------------------- the report


def batchnorm_samples(
    *,
    path: str,
    layer_synchronized: bool,
    training: bool,
    seen: Seen,
    setup: ReplicaSetup,
) -> BatchNormSamples:
    """What one BN layer normalized over, from what its calls saw.

    A tf.distribute replica calls the layer with its slice; with ``synchronized=True`` Keras
    all-reduces the sums over the replicas in sync, so the statistics cover ``seen x replicas``
    samples. A keras.distribution step calls it once with the global (sharded) batch."""
    sizes = [s for s in seen.sizes if s is not None]
    size = min(sizes) if sizes and len(sizes) == len(seen.sizes) else None
    in_sync = max(seen.in_sync) if seen.in_sync else 1
    tf_replicas = setup.engine in (Engine.MIRRORED_STRATEGY, Engine.TF_DISTRIBUTE)
    synchronized = bool(layer_synchronized) and tf_replicas and in_sync > 1
    if tf_replicas and in_sync > 1 and not synchronized:
        statistics, moving = Statistics.PER_REPLICA, MovingStatistics.FIRST_REPLICA
        samples = size
    else:
        statistics, moving = Statistics.GLOBAL, MovingStatistics.GLOBAL
        samples = size * in_sync if (size is not None and synchronized) else size
    return BatchNormSamples(
        path=path,
        training=training,
        seen=size,
        samples=samples,
        statistics=statistics,
        synchronized=synchronized,
        moving=moving,
    )


def replica_report(
    *,
    setup: ReplicaSetup,
    layers: Mapping[str, Any],
    seen: Mapping[str, Seen],
    training: Sequence[str],
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> ReplicaReport:
    """One :class:`BatchNormSamples` per recorded BN layer; ``training`` lists the paths that
    took the batch branch in the first batch."""
    batch = set(training)
    out = []
    for path, s in seen.items():
        if not s.sizes:
            continue  # never called in the step
        layer = layers[path]
        out.append(
            batchnorm_samples(
                path=path,
                layer_synchronized=bool(getattr(layer, "synchronized", False)),
                training=path in batch,
                seen=s,
                setup=setup,
            )
        )
    return ReplicaReport(setup=setup, min_samples=int(min_samples), layers=tuple(out))


def check_min_samples(value: Any) -> int:
    """``min_samples`` as given by a user: a positive int, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"min_samples takes a positive whole number of samples, not {value!r}")
    return value


# --------------------------------------------------------------------------- the guard's hooks


def start_sampling(
    state: dict[str, Any], keras: Any, model: Any, layers: Mapping[str, Any]
) -> None:
    """``BatchNormGuard`` before the first step: record every built-in BN's batch sizes in
    ``state`` (the guard's state) while the step is traced or run."""
    from bnfreeze.runtime.branches import is_builtin_batchnorm

    builtin = {p: layer for p, (layer, _) in layers.items() if is_builtin_batchnorm(keras, layer)}
    recorder = SampleRecorder(builtin)
    state.update(
        builtin=builtin,
        setup=replica_setup(keras, model),
        samples=recorder,
        sampling=recorder.active(),
    )
    state["sampling"].__enter__()


def finish_sampling(
    state: dict[str, Any], measured: Sequence[Any], min_samples: int
) -> ReplicaReport:
    """``BatchNormGuard`` after the first batch: the :class:`ReplicaReport` of ``state``;
    ``measured`` holds the first batch's measurements (the branch each BN took)."""
    from bnfreeze.model.records import Normalization

    return replica_report(
        setup=state["setup"],
        layers=state["builtin"],
        seen=state["samples"].seen(),
        training=[m.path for m in measured if m.normalizes_with is Normalization.BATCH],
        min_samples=min_samples,
    )
