"""One data-parallel ``fit()`` step with ``BatchNormGuard``, in a fresh interpreter.

``python tests/support/replica_scenarios.py ENGINE SYNC [SAVE_TO]``, ENGINE one of ``mirrored``
(TensorFlow, 2 logical CPU devices, ``tf.distribute.MirroredStrategy``), ``data-parallel``
(JAX, 2 forced host devices, ``keras.distribution.DataParallel``) or ``none`` (TensorFlow, one
device); SYNC ``on`` or ``off`` (``BatchNormalization(synchronized=...)``). Prints one JSON
document; ``tests/runtime/test_replicas.py`` asserts on it.

The batch has 8 samples whose two halves have different means (and spreads). The model's
output is the BN layer's output, twice; the target holds, by hand, the batch normalized by
each half's own statistics (what each replica would compute alone) and by the global batch's.
SGD with learning rate 0 leaves gamma and beta alone, and two metrics measure the distance of
the layer's real output in ``fit()`` to each: the one near 0 is what the layer normalized over.
The moving statistics after the step are read from the layer.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

ENGINE, SYNC = sys.argv[1], sys.argv[2] == "on"
SAVE_TO = sys.argv[3] if len(sys.argv) > 3 else None
BACKEND = "jax" if ENGINE == "data-parallel" else "tensorflow"
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if BACKEND == "jax":
    flags = os.environ.get("XLA_FLAGS", "")  # the suite's compile flags (tests/conftest.py)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()
elif ENGINE == "mirrored":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bnfreeze  # noqa: E402

N, D, MOMENTUM, EPS = 8, 3, 0.5, 1e-3
RNG = np.random.default_rng(0)
X = RNG.normal(size=(N, D)).astype("float32")
X[: N // 2] += 5.0
X[N // 2 :] = 3.0 * (X[N // 2 :] - 3.0)


def normalized(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(0)) / np.sqrt(a.var(0) + EPS)


PER_HALF = np.concatenate([normalized(X[: N // 2]), normalized(X[N // 2 :])])
GLOBAL = normalized(X)
Y = np.concatenate([PER_HALF, GLOBAL], axis=1)


def build() -> keras.Model:
    inputs = keras.Input((D,))
    bn = keras.layers.BatchNormalization(
        momentum=MOMENTUM, epsilon=EPS, synchronized=SYNC, name="bn"
    )
    h = bn(inputs)
    model = keras.Model(inputs, keras.layers.Concatenate(name="twice")([h, h]), name="probe")

    def to_per_half(y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_true[:, :D] - y_pred[:, :D]))

    def to_global(y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_true[:, D:] - y_pred[:, D:]))

    model.compile(keras.optimizers.SGD(0.0), "mse", metrics=[to_per_half, to_global])
    return model


def main() -> None:
    doc: dict = {"engine": ENGINE, "synchronized": SYNC, "backend": keras.backend.backend()}
    try:
        if ENGINE == "mirrored":
            strategy = tf.distribute.MirroredStrategy()
            with strategy.scope():
                model = build()
        elif ENGINE == "data-parallel":
            devices = keras.distribution.list_devices()
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
            model = build()
        else:
            model = build()
    except ValueError as e:
        doc["refused"] = str(e)
        print(json.dumps(doc))
        return
    guard = bnfreeze.BatchNormGuard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            X, Y, batch_size=N, epochs=1, verbose=0, shuffle=False, callbacks=[guard]
        )
    bn = model.get_layer("bn")
    a, b = X[: N // 2], X[N // 2 :]
    report = guard.report.replicas
    doc.update(
        distance_to_per_half=float(history.history["to_per_half"][0]),
        distance_to_global=float(history.history["to_global"][0]),
        moving_mean=np.asarray(bn.moving_mean.numpy()).tolist(),
        moving_variance=np.asarray(bn.moving_variance.numpy()).tolist(),
        # moving = momentum * initial (0 and 1) + (1 - momentum) * batch statistics
        expected={
            "global": [
                ((1 - MOMENTUM) * X.mean(0)).tolist(),
                (MOMENTUM + (1 - MOMENTUM) * X.var(0)).tolist(),
            ],
            "first-replica": [
                ((1 - MOMENTUM) * a.mean(0)).tolist(),
                (MOMENTUM + (1 - MOMENTUM) * a.var(0)).tolist(),
            ],
            "second-replica": [
                ((1 - MOMENTUM) * b.mean(0)).tolist(),
                (MOMENTUM + (1 - MOMENTUM) * b.var(0)).tolist(),
            ],
        },
        guard={
            "engine": report.setup.engine.value,
            "replicas": report.setup.replicas,
            "layers": {
                x.path: {
                    "training": x.training,
                    "seen": x.seen,
                    "samples": x.samples,
                    "statistics": x.statistics.value,
                    "synchronized": x.synchronized,
                    "moving": x.moving.value,
                }
                for x in report.layers
            },
            "problems": list(report.problems),
        },
        warnings=[str(w.message) for w in caught if "BatchNormGuard" in str(w.message)],
    )
    if BACKEND == "jax":
        try:
            keras.layers.BatchNormalization(synchronized=True)
        except ValueError as e:
            doc["synchronized_refused"] = str(e)
    if SAVE_TO:
        model.save(SAVE_TO)
        np.savez(SAVE_TO + ".npz", **{v.path: np.asarray(v.numpy()) for v in model.weights})
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
