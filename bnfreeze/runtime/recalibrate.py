"""Re-estimating BatchNormalization moving statistics from data (PyTorch's
``torch.optim.swa_utils.update_bn``, for Keras).

After weight averaging (an optimizer with ``use_ema=True``, SWA), a change of input
resolution, pruning or quantization, or fine-tuning with BN in inference, a BN layer's moving
statistics no longer describe the inputs it receives. Keras's training-mode update is
(``BatchNormalization.call``)::

    mean, variance = self._moments(inputs, mask)
    moving_mean = moving_mean * momentum + mean * (1 - momentum)

so over many steps the moving statistics converge to an average of the per-batch ``mean``
and ``variance``. :func:`recalibrate` computes that average directly, with equal weight per
batch: for each selected layer, the mean over batches of exactly the ``_moments`` Keras's
update would use. ``variance`` is the **biased** batch variance (divided by the number of
values, not one less): measured on Keras 3.15 with TensorFlow and JAX by a ``fit()`` step with
``momentum=0`` (``tests/test_recalibrate.py``), and the same here since it is the same call.

During the pass each selected layer normalizes its output with the batch's statistics, as in a
training step, so that a layer further down sees the inputs it would see in training; every
other layer runs as in ``predict()`` (``training=False``: no dropout, a BN outside the
selection normalizes with its moving statistics). No variable is assigned until the pass is
over: then the selected layers' ``moving_mean`` and ``moving_variance``, and nothing else.
No gradient is computed, no flag changes, the optimizer is not touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bnfreeze.errors import DataError, SelectionError
from bnfreeze.runtime.instance_calls import replaced_calls

#: ``progress(batches_done, batches_total_or_None, samples_done)`` after every batch.
RecalibrateProgress = Callable[[int, int | None, int], None]


@dataclass(frozen=True)
class RecalibratedLayer:
    """One selected BN layer: how many calls its new statistics average."""

    path: str
    calls: int


@dataclass(frozen=True)
class Recalibration:
    """What :func:`recalibrate` did. ``layers`` were re-estimated; ``not_called`` were selected
    but never called by the model on this data (their statistics are unchanged)."""

    layers: tuple[RecalibratedLayer, ...]
    not_called: tuple[str, ...]
    batches: int
    samples: int


def select_batchnorm(
    model: Any, layers: Sequence[str] = (), *, up_to: str | None = None, from_: str | None = None
) -> dict[str, Any]:
    """The live BN layers of ``model`` chosen by the usual selection options (every BN layer
    when none is given), by path."""
    import keras

    from bnfreeze.model import selection
    from bnfreeze.runtime.live import live_model

    live = live_model(model)
    chosen = selection.select(live.records, layers=tuple(layers), up_to=up_to, from_=from_)
    out = {
        r.path: live.layers[r.path]
        for r in chosen
        if r.path in live.layers
        and isinstance(live.layers[r.path], keras.layers.BatchNormalization)
    }
    if not out:
        raise SelectionError("the selection matches no BatchNormalization layer to recalibrate.")
    renorm = [p for p, layer in out.items() if getattr(layer, "renorm", False)]
    if renorm:
        raise SelectionError(
            f"{renorm[0]} uses batch renormalization (renorm=True), whose extra statistics "
            "bnfreeze does not re-estimate.",
            hint="Leave it out of the selection with --layers.",
        )
    return out


def batches_of(data: Any, batch_size: int, limit: int | None = None) -> Iterator[Any]:
    """The model inputs of each batch: a NumPy array (or a dict/list of arrays) is cut into
    batches of ``batch_size`` (the last one may be smaller); anything else is iterated as
    batches (a ``tf.data.Dataset``, a generator, a ``keras.utils.PyDataset``), each either the
    inputs or Keras's ``(x, y)`` / ``(x, y, sample_weight)`` tuple. ``limit`` stops after
    that many batches."""
    import keras
    import numpy as np

    if batch_size < 1:
        raise DataError(f"the batch size must be at least 1, not {batch_size}.")
    if limit is not None and limit < 1:
        raise DataError(f"the number of batches must be at least 1, not {limit}.")

    def sliced(x: Any, start: int, stop: int) -> Any:
        if isinstance(x, dict):
            return {k: v[start:stop] for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [v[start:stop] for v in x]
        return np.asarray(x[start:stop])  # a memory-mapped .npy is read batch by batch

    first = data
    if isinstance(first, dict):
        first = next(iter(first.values()), None)
    elif isinstance(first, (list, tuple)) and first and isinstance(first[0], np.ndarray):
        first = first[0]
    if isinstance(first, np.ndarray):
        n = len(first)
        if n == 0:
            raise DataError("the data holds no samples.")
        for count, start in enumerate(range(0, n, batch_size)):
            if limit is not None and count >= limit:
                return
            yield sliced(data, start, start + batch_size)
        return
    if not isinstance(data, Iterable):
        raise DataError(
            f"cannot read batches from a {type(data).__name__}: give a NumPy array, a "
            "tf.data.Dataset or an iterable of batches."
        )
    for count, item in enumerate(data):
        if limit is not None and count >= limit:
            return
        x, _, _ = keras.utils.unpack_x_y_sample_weight(item)
        yield x


def _size(x: Any) -> int:
    if isinstance(x, dict):
        x = next(iter(x.values()))
    elif isinstance(x, (list, tuple)):
        x = x[0]
    return int(x.shape[0])


class _Accumulator:
    """Sums of the per-call batch statistics of each layer, in float64, kept in NumPy: the
    pass runs eagerly (JAX, or any backend)."""

    compiled = False

    def __init__(self, layers: dict[str, Any]) -> None:
        self.sums: dict[str, list[Any]] = {p: [None, None, 0] for p in layers}

    def add(self, path: str, mean: Any, variance: Any) -> None:
        import numpy as np
        from keras import ops

        entry = self.sums[path]
        m = np.asarray(ops.convert_to_numpy(mean), dtype=np.float64)
        v = np.asarray(ops.convert_to_numpy(variance), dtype=np.float64)
        entry[0] = m if entry[0] is None else entry[0] + m
        entry[1] = v if entry[1] is None else entry[1] + v
        entry[2] += 1

    def totals(self, path: str) -> tuple[Any, Any, int]:
        mean, variance, calls = self.sums[path]
        return mean, variance, calls


class _TensorFlowAccumulator:
    """The same sums in ``tf.Variable`` objects (float64), so that the pass can run as one
    ``tf.function``, as ``predict()`` does: measured on ResNet50, the eager pass took about
    10 times as long as ``predict()`` over the same batches."""

    compiled = True

    def __init__(self, layers: dict[str, Any]) -> None:
        import tensorflow as tf

        self.sums: dict[str, tuple[Any, Any, Any]] = {}
        for path, layer in layers.items():
            shape = tuple(layer.moving_mean.shape)
            self.sums[path] = (
                tf.Variable(tf.zeros(shape, tf.float64), trainable=False),
                tf.Variable(tf.zeros(shape, tf.float64), trainable=False),
                tf.Variable(0, dtype=tf.int64, trainable=False),
            )

    def add(self, path: str, mean: Any, variance: Any) -> None:
        import tensorflow as tf

        m, v, n = self.sums[path]
        m.assign_add(tf.reshape(tf.cast(mean, tf.float64), m.shape))
        v.assign_add(tf.reshape(tf.cast(variance, tf.float64), v.shape))
        n.assign_add(1)

    def totals(self, path: str) -> tuple[Any, Any, int]:
        m, v, n = self.sums[path]
        return m.numpy(), v.numpy(), int(n.numpy())


def _batch_call(layer: Any, path: str, acc: Any) -> Callable[..., Any]:
    """``BatchNormalization.call``'s training branch without the moving-statistics update:
    the batch's ``_moments``, recorded, and the output normalized with them."""
    from keras import backend, ops

    def call(inputs: Any, training: Any = None, mask: Any = None, **_: Any) -> Any:
        x = ops.cast(inputs, backend.result_type(inputs.dtype, "float32"))
        mean, variance = layer._moments(x, mask)
        acc.add(path, mean, variance)
        gamma = ops.cast(layer.gamma, x.dtype) if layer.scale else None
        beta = ops.cast(layer.beta, x.dtype) if layer.center else None
        out = ops.batch_normalization(
            x=x,
            mean=mean,
            variance=variance,
            axis=layer.axis,
            offset=beta,
            scale=gamma,
            epsilon=layer.epsilon,
        )
        return ops.cast(out, layer.compute_dtype)

    return call


def _accumulator_and_forward(
    model: Any, selected: dict[str, Any]
) -> tuple[Any, Callable[[Any], Any]]:
    """Where the batch statistics are summed, and the inference pass over one batch: a
    ``tf.function`` and a TensorFlow accumulator on TensorFlow, eager NumPy elsewhere."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        acc = _TensorFlowAccumulator(selected)
        return acc, tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def eager(x: Any) -> Any:
        return model(x, training=False)

    return _Accumulator(selected), eager


def recalibrate(
    model: Any,
    data: Any,
    *,
    batch_size: int = 32,
    batches: int | None = None,
    layers: Sequence[str] = (),
    up_to: str | None = None,
    from_: str | None = None,
    progress: RecalibrateProgress | None = None,
) -> Recalibration:
    """Reset the selected BN layers' moving statistics to the equal-weight average of their
    per-batch statistics over ``data`` (see the module doc). Changes nothing else."""
    import numpy as np

    selected = select_batchnorm(model, layers, up_to=up_to, from_=from_)
    acc, forward = _accumulator_and_forward(model, selected)
    total = batches
    first = data
    if isinstance(first, np.ndarray):
        n_batches = -(-len(first) // batch_size)
        total = n_batches if batches is None else min(batches, n_batches)
    done = samples = 0
    with replaced_calls(selected, lambda path, layer: _batch_call(layer, path, acc)):
        for x in batches_of(data, batch_size, batches):
            try:
                forward(x)
            except Exception as exc:
                raise DataError(
                    f"the model cannot run on batch {done + 1}: {_short(exc)}"
                ) from None
            done += 1
            samples += _size(x)
            if progress is not None:
                progress(done, total, samples)
    if not done:
        raise DataError("the data holds no batch.")
    out: list[RecalibratedLayer] = []
    not_called: list[str] = []
    for path, layer in selected.items():
        mean_sum, var_sum, calls = acc.totals(path)
        if not calls:
            not_called.append(path)
            continue
        layer.moving_mean.assign((mean_sum / calls).astype(layer.moving_mean.dtype))
        layer.moving_variance.assign((var_sum / calls).astype(layer.moving_variance.dtype))
        out.append(RecalibratedLayer(path, calls))
    return Recalibration(tuple(out), tuple(not_called), batches=done, samples=samples)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
