"""Which branch each built-in BatchNormalization layer took in a real training step.

Keras's ``BatchNormalization.call`` has two branches (the ``BatchNormalization`` docstring):
in training mode "the layer normalizes its output using the mean and standard deviation of the
current batch of inputs" and updates its moving statistics; in inference mode it "normalizes
its output using a moving average of the mean and standard deviation of the batches it has
seen during training". The branch is chosen by ``training and self.trainable``, with
``training`` as ``Layer.__call__`` resolved it.

Whether the moving statistics moved is *not* a measurement of the branch: with
``momentum=1.0`` the batch branch runs and the statistics stay bit-identical. So
:class:`BranchRecorder` wraps each layer's ``call`` on the instance, for the duration of a
``with`` block, and records the resolved ``training`` and the layer's ``trainable`` of every
call. The wrapper adds nothing to the computation: the output, the gradients and the updates
are those of the unwrapped layer.

Calls are recorded when Python runs the layer: every step when the step runs eagerly, and
once per trace when ``fit()`` compiles it (``tf.function`` on TensorFlow, ``jax.jit`` on JAX).
A step traced *before* the block (a second ``fit()`` without ``compile()``) runs no Python, so
no call is recorded and the branch is unknown (None). Symbolic calls are skipped: on JAX,
``fit()`` and ``train_on_batch()`` first call every layer with ``training=False`` on symbolic
tensors to build the model (``Trainer._symbolic_build``), which is not the training step.

Custom subclasses of BatchNormalization may override ``call``; only built-in layers and
bnfreeze's own ``FrozenStatsBatchNormalization`` are recorded (:func:`is_builtin_batchnorm`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bnfreeze.model.records import Normalization
from bnfreeze.runtime.instance_calls import distinct_layers, replaced_calls


@dataclass(frozen=True)
class Branch:
    """The calls of one BN layer recorded in a step: how many took each branch, and how many
    had a ``training`` that is not a Python value (a symbolic tensor: branch unknown)."""

    path: str
    batch: int = 0
    moving: int = 0
    unknown: int = 0

    @property
    def normalizes_with(self) -> Normalization | None:
        """BATCH when any recorded call took the batch branch (it then also updated the moving
        statistics, by ``momentum``), MOVING when every call took the inference branch, None
        when no call was recorded or one could not be told."""
        if self.batch:
            return Normalization.BATCH
        if self.moving and not self.unknown:
            return Normalization.MOVING
        return None

    @property
    def calls(self) -> int:
        return self.batch + self.moving + self.unknown


def is_builtin_batchnorm(keras: Any, layer: Any) -> bool:
    """A Keras built-in BatchNormalization (Keras 3 or tf_keras), whose ``call`` branches on
    ``training and self.trainable``; a subclass from elsewhere may not."""
    module = type(layer).__module__ or ""
    if isinstance(layer, keras.layers.BatchNormalization) and is_frozen_stats_layer(layer):
        return True
    return isinstance(layer, keras.layers.BatchNormalization) and module.split(".")[0] in (
        "keras",
        "tf_keras",
    )


def is_frozen_stats_layer(layer: Any) -> bool:
    """bnfreeze's ``FrozenStatsBatchNormalization``, whose ``call`` passes ``training=False``
    to ``BatchNormalization.call`` on every call: always the inference branch."""
    return getattr(type(layer), "bnfreeze_frozen_stats", False) is True


def _symbolic_scope() -> Any:
    """Keras's test for "inside compute_output_spec": None when this Keras has none."""
    try:
        from keras.src.backend.common.symbolic_scope import in_symbolic_scope
    except ImportError:  # tf_keras, or a Keras without it
        return None
    return in_symbolic_scope


class BranchRecorder:
    """Record the branch each given BN layer takes while the recorder is active.

    ``layers`` maps a layer path to a built-in BatchNormalization layer. Use as a context
    manager (:meth:`active`); read :meth:`branches` afterwards. A layer shared by two paths is
    recorded under its first path.
    """

    def __init__(self, layers: Mapping[str, Any]) -> None:
        self._layers = distinct_layers(layers)
        self._counts: dict[str, list[int]] = {p: [0, 0, 0] for p in self._layers}
        self._symbolic = _symbolic_scope()

    def _record(self, path: str, layer: Any, training: Any) -> None:
        if self._symbolic is not None and self._symbolic():
            return  # Keras building the model on symbolic tensors, not a training step
        counts = self._counts[path]
        if is_frozen_stats_layer(layer):
            counts[1] += 1  # its call hands training=False to BatchNormalization.call
            return
        if training is None and (type(layer).__module__ or "").startswith("tf_keras"):
            counts[2] += 1  # tf_keras reads the learning phase for None: not known here
            return
        if training is None or isinstance(training, bool | int):
            counts[0 if (bool(training) and bool(layer.trainable)) else 1] += 1
        else:
            try:  # a concrete tensor (an eager step with a tensor flag)
                value = bool(training)
            except Exception:
                counts[2] += 1
                return
            counts[0 if (value and bool(layer.trainable)) else 1] += 1

    def _wrap(self, path: str, layer: Any) -> Any:
        original = layer.call
        record = self._record

        def call(*args: Any, **kwargs: Any) -> Any:
            record(path, layer, kwargs.get("training"))
            return original(*args, **kwargs)

        return call

    @contextmanager
    def active(self) -> Iterator[BranchRecorder]:
        """Wrap every layer's ``call`` on the instance; restore it on exit, whatever happens
        (:func:`bnfreeze.runtime.instance_calls.replaced_calls`)."""
        with replaced_calls(self._layers, self._wrap):
            yield self

    def branches(self) -> dict[str, Branch]:
        return {
            path: Branch(path, batch=c[0], moving=c[1], unknown=c[2])
            for path, c in self._counts.items()
        }

    def reset(self) -> None:
        for counts in self._counts.values():
            counts[:] = [0, 0, 0]
